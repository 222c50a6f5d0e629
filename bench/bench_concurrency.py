"""Concurrency and cost: 1,000 simultaneous streaming turns in one bridge process.

    python bench/bench_concurrency.py                 # 1000 turns × 200 tokens over ~10 s
    python bench/bench_concurrency.py --processes 2   # the same, plus two bridges on one Redis
    python bench/bench_concurrency.py --profile       # plus a py-spy profile (another run)
    python bench/bench_concurrency.py --quick         # a smoke run; records nothing

A fake OpenAI-compatible upstream, in a process of its own, answers every question with
`--tokens` tokens (words, a sentence every 12), one SSE chunk every `--interval-ms`. The bench
posts `--turns` signed webhooks at once, each from its own sender in its own group (distinct
sessions), to a real `python -m bridge run` with BRIDGE_WORKERS=1000 on a private
redis-server (append-only), and waits until the fake Yach has received every answer, whole
and in order, and the inbox is empty (every entry acknowledged). The reply mode and flush
policy are the defaults (stream, 300 characters or 6 s at a boundary); the send rate is
unlimited (BRIDGE_YACH_SEND_RATE=0).

Measured on the bridge process(es): CPU seconds (user + system) from the first webhook to the
last acknowledgement, per 1,000 tokens relayed; resident memory when idle (after a few
warm-up turns), its peak during the run (sampled every 50 ms), and the difference per turn.

Baseline, same invocation, same fake upstream: a bare client in a process of its own
(aiohttp on uvloop, as the bridge) reads the same number of streams at once, each body to
its end with `readany` as the bridge reads it, and throws the bytes away. Its CPU per 1,000
tokens is what this machine charges any bridge on these libraries just to receive the
tokens; the bridge's ratio to it, and the difference, are its own work (parsing, composing,
journalling, sending), comparable across machines where the absolute target is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    BridgeSet,
    Child,
    MachineLoad,
    ProcessMeter,
    TimedYach,
    add_priority_option,
    answer_text,
    apply_priority,
    bench_env,
    child,
    command_line,
    entry_head,
    percentiles,
    profile_pid,
    read_streams,
    record_run,
    top_functions,
)

from bridge.messages import MESSAGES
from tests.harness import group_message, signed_headers

TARGET_KB_PER_TURN, TARGET_CPU_MS = 100.0, 50.0


_NOTICES = {text.strip(): key for key, text in MESSAGES["en"].items() if "{" not in text}


@dataclass
class Answers:
    """What the fake Yach shows, per group, and when each turn's last token arrived. The
    bot's own notices ("Thinking…" when a first token takes over BRIDGE_THINKING_NOTICE_S,
    a cut-off notice) are counted apart: they are not part of the answer."""

    tokens: int
    texts: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notices: Counter[str] = field(default_factory=Counter)
    finished: dict[str, int] = field(default_factory=dict)  # group → monotonic ns
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def on_piece(self, arrived: int, group: str, text: str) -> None:
        notice = _NOTICES.get(text.strip())
        if notice is not None:
            self.notices[notice] += 1
            return
        self.texts[group].append(text)
        if f"fin{group}." in text:
            self.finished[group] = arrived
            if len(self.finished) >= self.expected:
                self.all_done.set()

    def whole(self, groups: Sequence[str]) -> int:
        """How many answers arrived whole and in order (whitespace aside)."""
        return sum(
            1 for g in groups
            if "".join(self.texts[g]).split() == answer_text(g, self.tokens).split()
        )  # fmt: skip


@dataclass
class Run:
    name: str
    processes: int
    turns: int
    whole: int
    tokens: int
    seconds: float
    cpu_s: float
    redis_cpu_s: float
    idle_rss: int
    peak_rss: int
    turn_s: list[float]
    per_process: list[int]
    upstream_cpu_s: float
    notices: dict[str, int]

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_s * 1000 / max(self.tokens, 1) * 1000

    @property
    def kb_per_turn(self) -> float:
        return (self.peak_rss - self.idle_rss) / 1024 / max(self.turns, 1)


async def post_all(urls: Sequence[str], keys: Sequence[str], posted: dict[str, int]) -> None:
    """Every webhook at once (64 connections), round robin over the bridges."""
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(n: int, key: str) -> None:
            payload = group_message(key, msg_id=f"{key}-{uuid.uuid4().hex[:8]}",
                                    sender=f"u{key}", group=key, work_code=f"W{n}")
            posted[key] = time.monotonic_ns()
            async with session.post(f"{urls[n % len(urls)]}/webhook/yach",
                                    data=json.dumps(payload),
                                    headers={"Content-Type": "application/json",
                                             **signed_headers()}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"webhook answered {response.status}")

        await asyncio.gather(*(post(n, key) for n, key in enumerate(keys)))


async def inbox_empty(redis_url: str, timeout_s: float) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while await client.xlen("chatbridge:{bench}:inbox") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def one_config(
    args: argparse.Namespace, services: BridgeSet, upstream: Child, processes: int,
    label: str, profile_to: Path | None = None,
) -> tuple[Run, list[str]]:
    upstream_url = f"http://127.0.0.1:{upstream.port}/v1"
    answers = Answers(args.tokens)
    yach = await TimedYach(answers.on_piece).start()
    try:
        services.fresh_redis()
        env = bench_env(services.redis.url, yach, upstream_url,
                        BRIDGE_WORKERS=str(args.workers))
        bridges = await services.start(env, processes)
        urls = [b.url for b in bridges]
        warm = [f"w{label}{n}" for n in range(args.warmup)]
        answers.expected = len(warm)
        await post_all(urls, warm, {})
        await asyncio.wait_for(answers.all_done.wait(), args.timeout)
        await inbox_empty(services.redis.url, args.timeout)
        await asyncio.sleep(0.5)  # let the warm-up turns' garbage go
        done_before = [len(b.events("turn_done")) for b in bridges]
        meter, redis_meter = ProcessMeter(services.pids), ProcessMeter([services.redis_pid])
        upstream_meter = ProcessMeter([upstream.pid])
        idle_rss = meter.rss()
        answers.finished.clear()
        answers.all_done.clear()
        keys = [f"k{label}{n}" for n in range(args.turns)]
        answers.expected = len(keys)
        posted: dict[str, int] = {}
        spy = None
        if profile_to is not None:
            seconds = args.tokens * args.interval_ms / 1000 + 1
            spy = asyncio.get_running_loop().create_task(
                profile_pid(bridges[0].pid, seconds, profile_to))
        answers.notices.clear()
        cpu0, redis0, started = sum(meter.cpu()), sum(redis_meter.cpu()), time.monotonic()
        upstream0 = sum(upstream_meter.cpu())
        meter.start_sampling()
        await post_all(urls, keys, posted)
        try:
            await asyncio.wait_for(answers.all_done.wait(), args.timeout)
        except TimeoutError:
            print(f"not every turn finished within {args.timeout:g} s", flush=True)
        await inbox_empty(services.redis.url, 30)
        peak = await meter.stop_sampling()
        seconds = time.monotonic() - started
        cpu, redis_cpu = sum(meter.cpu()) - cpu0, sum(redis_meter.cpu()) - redis0
        turn_s = [(answers.finished[k] - posted[k]) / 1e9 for k in keys if k in answers.finished]
        per_process = [len(b.events("turn_done")) - before
                       for b, before in zip(bridges, done_before, strict=True)]
        profile: list[str] = []
        if spy is not None:
            profile = top_functions(profile_to) if await spy and profile_to else \
                ["(py-spy is not installed or could not attach: `pip install py-spy`)"]
        run = Run(label, processes, len(keys), answers.whole(keys),
                  sum(1 for k in keys if k in answers.finished) * args.tokens, seconds, cpu,
                  redis_cpu, idle_rss, peak, turn_s, per_process,
                  sum(upstream_meter.cpu()) - upstream0, dict(answers.notices))
        await services.stop()
    finally:
        await yach.close()
    return run, profile


@dataclass
class Baseline:
    """The same streams read by a bare client (`_common._read_streams`), in the same run."""

    turns: int
    tokens: int
    ended: int
    cpu_s: float

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_s * 1000 / max(self.tokens, 1) * 1000


async def run_all(
    args: argparse.Namespace, work: Path
) -> tuple[list[Run], Baseline, list[str]]:
    plan = {"tokens": args.tokens, "interval_s": args.interval_ms / 1000, "timed": False}
    services = BridgeSet(work)
    runs: list[Run] = []
    profile: list[str] = []
    try:
        services.start_redis()
        async with child("upstream", json.dumps(plan)) as upstream:
            counts = [1] + ([args.processes] if args.processes > 1 else [])
            for processes in counts:
                run, _ = await one_config(args, services, upstream, processes, f"p{processes}x")
                print(*table([run])[2:], sep="\n", flush=True)
                runs.append(run)
            read = await read_streams(f"http://127.0.0.1:{upstream.port}/v1/chat/completions",
                                      args.turns, "base")
            baseline = Baseline(args.turns, args.turns * args.tokens, int(read["ended"]),
                                read["cpu_s"])
            if args.profile:
                raw = args.profile_raw or work / "concurrency.pyspy"
                _, profile = await one_config(args, services, upstream, 1, "prof", profile_to=raw)
    finally:
        services.close()
    return runs, baseline, profile


# -- report -----------------------------------------------------------------------------------


def table(runs: Sequence[Run]) -> list[str]:
    head = ["bridges", "turns", "whole", "tokens", "seconds", "turn p50 s", "turn max s",
            "CPU s", "CPU ms / 1000 tokens", "redis CPU s", "fake upstream CPU s",
            "idle RSS MB", "peak RSS MB", "KB / turn", "turns per process", "notices"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        (p50,) = percentiles(r.turn_s, (50,))
        cells = [str(r.processes), str(r.turns), str(r.whole), f"{r.tokens:,}",
                 f"{r.seconds:.1f}", f"{p50:.2f}", f"{max(r.turn_s, default=0):.2f}",
                 f"{r.cpu_s:.1f}", f"{r.cpu_ms_per_1000:.1f}", f"{r.redis_cpu_s:.1f}",
                 f"{r.upstream_cpu_s:.1f}", f"{r.idle_rss / 2**20:.0f}",
                 f"{r.peak_rss / 2**20:.0f}", f"{r.kb_per_turn:.0f}",
                 " + ".join(map(str, r.per_process)),
                 ", ".join(f"{k} × {v}" for k, v in sorted(r.notices.items())) or "none"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def verdicts(runs: Sequence[Run], baseline: Baseline) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    one = runs[0]
    reading = baseline.cpu_ms_per_1000
    out = [
        f"one process: {one.whole} of {one.turns} turns complete, whole and in order "
        f"({met(one.whole == one.turns)})",
        f"CPU per 1,000 relayed tokens: {one.cpu_ms_per_1000:.1f} ms "
        f"(target ≤ {TARGET_CPU_MS:g}: {met(one.cpu_ms_per_1000 <= TARGET_CPU_MS)})",
        f"baseline, same run: a bare client (aiohttp on uvloop) reading the same "
        f"{baseline.turns} streams at once to their ends, nothing parsed, sent or stored "
        f"({baseline.ended} of {baseline.turns} ended): {reading:.1f} ms CPU per 1,000 "
        f"tokens; the bridge {one.cpu_ms_per_1000 / max(reading, 1e-9):.2f}× that, its own "
        f"work {one.cpu_ms_per_1000 - reading:.1f} ms per 1,000 tokens",
        f"RSS per in-flight turn above idle: {one.kb_per_turn:.0f} KB "
        f"(target ≤ {TARGET_KB_PER_TURN:g}: {met(one.kb_per_turn <= TARGET_KB_PER_TURN)})",
    ]
    for more in runs[1:]:
        (p50_one,), (p50_more,) = percentiles(one.turn_s, (50,)), percentiles(more.turn_s, (50,))
        out.append(
            f"scale-out, {more.processes} processes: {more.whole} of {more.turns} whole; "
            f"CPU {more.cpu_ms_per_1000:.1f} ms per 1,000 tokens (all processes), turn p50 "
            f"{p50_more:.2f} s vs {p50_one:.2f} s in one, RSS {more.kb_per_turn:.0f} KB/turn"
        )
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a few short turns, nothing recorded")
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="between tokens")
    parser.add_argument("--workers", type=int, default=1000, help="BRIDGE_WORKERS")
    parser.add_argument("--warmup", type=int, default=10, help="turns before measuring")
    parser.add_argument("--processes", type=int, default=1,
                        help="also run with this many bridges on one Redis (scale-out)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="how long the turns may take before the run gives up")
    parser.add_argument("--profile", action="store_true",
                        help="one more one-process run while py-spy samples the bridge")
    parser.add_argument("--profile-raw", type=Path, default=None,
                        help="keep py-spy's collapsed stacks in this file (implies --profile)")
    add_priority_option(parser)
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(None if argv is None else list(argv))
    args.profile = args.profile or args.profile_raw is not None
    if args.quick:
        args.turns, args.tokens, args.interval_ms, args.workers, args.warmup = 20, 10, 10, 50, 2
        args.timeout = 30.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or (None if args.quick else RESULTS)
    priority, load = apply_priority(args.nice), MachineLoad()
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        runs, baseline, profile = asyncio.run(run_all(args, Path(tmp)))
    lines, said = table(runs), [*verdicts(runs, baseline), load.describe(), priority]
    print("", *lines, "", *said, sep="\n")
    if profile:
        print("\npy-spy, one bridge relaying every turn:", *profile, sep="\n")
    if results is not None:
        entry = [
            *entry_head("Concurrency and cost", command_line("bench_concurrency.py", argv)),
            f"- load: {args.turns} turns posted at once, distinct sessions, {args.tokens} "
            f"tokens each, one every {args.interval_ms:g} ms (≈ "
            f"{args.tokens * args.interval_ms / 1000:g} s per answer); {args.warmup} warm-up "
            "turns first",
            f"- bridge: `python -m bridge run`, BRIDGE_WORKERS={args.workers}, default reply "
            "mode and flush policy, BRIDGE_YACH_SEND_RATE=0, app-API route, log level info; "
            "fake upstream in its own process; private redis-server, appendonly everysec",
            "- CPU: user + system of the bridge process(es) from the first webhook to the last "
            "acknowledgement; RSS: sum over the bridge process(es), sampled every 50 ms",
            *[f"- {line}" for line in said],
            "", *lines,
        ]
        record_run(results, entry, profile, "one bridge relaying every turn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
