"""Relay overhead: from a token's emission upstream to its arrival at the fake Yach.

    python bench/bench_relay.py             # 100 turns × 50 tokens, 5 at a time
    python bench/bench_relay.py --profile   # plus a py-spy profile of the bridge relaying
    python bench/bench_relay.py --quick     # a smoke run; records nothing

A fake OpenAI-compatible upstream streams each answer as `--tokens` SSE chunks, one every
`--interval-ms`, the first as soon as the request arrives; every token carries its emission
time (`<key>t<i>@<monotonic ns>. `, comparable across processes on one machine). A real
`python -m bridge run` (private redis-server, append-only) relays the turns to a fake Yach
that notes when each piece arrives (app API; BRIDGE_YACH_SEND_RATE=0).

Flush policy: the Yach adapter has no "every delta" setting (only the terminal has one), so
the closest is used: BRIDGE_REPLY_MODE=stream, BRIDGE_FLUSH_MIN_CHARS=0 and
BRIDGE_FLUSH_MAX_WAIT_S=0: a piece leaves as soon as a sentence boundary is known, and each
token here is one sentence, so each token becomes one piece (the table counts pieces per
token: tokens that queued behind a send in progress are merged, as the bridge does).

Baseline, same invocation, same fake: a client calls the fake upstream directly (aiohttp,
as many at a time) and notes when each token arrives. The first-token overhead is the time
from posting the webhook to the first token's arrival at the fake Yach, minus the time from
calling the upstream directly to the first token's arrival (medians). Both fakes run in the
bench's own event loop, as does the client: the direct row is the floor that setup puts
under every number (one loopback hop through aiohttp on this machine).

Floor, same invocation, same fakes, same Redis: the same turns through `_floor.py`, a relay
in a process of its own that makes only the hops SPEC requires of any bridge (per webhook one
Redis write before the 200; per piece one Redis write, then the POST) and nothing else. What
the bridge shows above the floor is its own cost; the floor itself is this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    BridgeSet,
    MachineLoad,
    ProcessMeter,
    TimedYach,
    TokenPlan,
    TokenUpstream,
    add_priority_option,
    apply_priority,
    bench_env,
    child,
    command_line,
    entry_head,
    ms,
    percentiles,
    profile_pid,
    record_run,
    top_functions,
)

from tests.fakes.yach import FakeYach
from tests.harness import group_message, signed_headers

TARGET_P50_S, TARGET_P99_S, TARGET_FIRST_S = 0.001, 0.005, 0.003
TOKEN = re.compile(r"(r\d+)t(\d+)@(\d+)\. ")
TOKEN_BYTES = re.compile(rb"(r\d+)t(\d+)@(\d+)\. ")


@dataclass
class Measured:
    """What one way of reading the answers measured."""

    name: str
    first: list[float] = field(default_factory=list)  # request → first token, seconds
    latency: list[float] = field(default_factory=list)  # emission → arrival, seconds
    to_upstream: list[float] = field(default_factory=list)  # webhook → upstream request, s

    def note_upstream(self, tracker: Tracker, upstream: TokenUpstream, keys: Iterable[str]) -> None:
        self.to_upstream = [(upstream.requested[key] - tracker.posted[key]) / 1e9 for key in keys]


@dataclass
class Tracker:
    """Follows the turns through the bridge, from the pieces the fake Yach receives."""

    tokens: int
    measured: Measured = field(default_factory=lambda: Measured("through chatbridge"))
    posted: dict[str, int] = field(default_factory=dict)
    done: dict[str, asyncio.Event] = field(default_factory=dict)
    pieces: Counter[str] = field(default_factory=Counter)
    token_count: int = 0

    def on_piece(self, arrived: int, group: str, text: str) -> None:
        matches = TOKEN.findall(text)
        if not matches:
            return
        key = matches[0][0]
        self.pieces[key] += 1
        for _, index, emitted in matches:
            self.token_count += 1
            self.measured.latency.append((arrived - int(emitted)) / 1e9)
            if int(index) == 0 and key in self.posted:
                self.measured.first.append((arrived - self.posted[key]) / 1e9)
            if int(index) == self.tokens - 1 and key in self.done:
                self.done[key].set()


async def direct_call(session: aiohttp.ClientSession, url: str, key: str, into: Measured) -> None:
    body = {"model": "fake-model", "stream": True,
            "messages": [{"role": "user", "content": key}]}
    started = time.monotonic_ns()
    buffer = b""
    async with session.post(url, json=body) as response:
        async for chunk in response.content.iter_any():
            arrived = time.monotonic_ns()
            buffer += chunk
            complete, _, buffer = buffer.rpartition(b"\n\n")
            for _, index, emitted in TOKEN_BYTES.findall(complete):
                into.latency.append((arrived - int(emitted)) / 1e9)
                if index == b"0":
                    into.first.append((arrived - started) / 1e9)


async def bridge_turn(session: aiohttp.ClientSession, url: str, key: str, n: int,
                      tracker: Tracker, timeout_s: float) -> None:
    payload = group_message(key, msg_id=f"{key}-{uuid.uuid4().hex[:8]}",
                            sender=f"u{n}", group=f"g{n}", work_code=f"W{n}")
    tracker.done[key] = asyncio.Event()
    tracker.posted[key] = time.monotonic_ns()
    async with session.post(f"{url}/webhook/yach", data=json.dumps(payload),
                            headers={"Content-Type": "application/json",
                                     **signed_headers()}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"webhook answered {response.status}")
    await asyncio.wait_for(tracker.done[key].wait(), timeout_s)


async def in_batches(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def gated(n: int) -> None:
        async with gate:
            await one(n)

    await asyncio.gather(*(gated(n) for n in range(count)))


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    plan = TokenPlan(tokens=args.tokens, interval_s=args.interval_ms / 1000)
    tracker = Tracker(args.tokens)
    upstream = await TokenUpstream(plan).start()
    yach = await TimedYach(tracker.on_piece).start()
    services = BridgeSet(work)
    turn_timeout = 30 + args.tokens * plan.interval_s
    try:
        services.start_redis()
        env = bench_env(services.redis.url, yach, upstream.base_url,
                        BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="0",
                        BRIDGE_FLUSH_MAX_WAIT_S="0")
        (bridge,) = await services.start(env, 1)
        direct = Measured("direct (client → fake upstream)")
        async with aiohttp.ClientSession() as session:
            url = f"{upstream.base_url}/chat/completions"
            await in_batches(args.concurrency, args.concurrency,
                             lambda n: direct_call(session, url, f"r{90000 + n}", Measured("warm")))
            await in_batches(args.turns, args.concurrency,
                             lambda n: direct_call(session, url, f"r{n}", direct))

            async def turn(n: int) -> None:
                await bridge_turn(session, bridge.url, f"r{n}", n, tracker, turn_timeout)

            await in_batches(args.warmup, min(args.warmup, args.concurrency),
                             lambda n: turn(10000 + n))
            tracker.measured = Measured(tracker.measured.name)
            tracker.pieces.clear()
            tracker.token_count = 0
            meter = ProcessMeter([bridge.pid])
            cpu_before = sum(meter.cpu())
            await in_batches(args.turns, args.concurrency, turn)
            cpu = sum(meter.cpu()) - cpu_before
            measured, pieces, tokens = tracker.measured, sum(tracker.pieces.values()), \
                tracker.token_count
            measured.note_upstream(tracker, upstream, (f"r{n}" for n in range(args.turns)))
            floor, floor_cpu = await _floor(args, session, tracker, services.redis.url, upstream,
                                            yach, turn_timeout)
            profile: list[str] = []
            if args.profile:
                tracker.measured = Measured("profiled, not counted")
                profile = await _profile(args, bridge.pid, turn, work / "relay.pyspy")
        await services.stop()
    finally:
        services.close()
        await yach.close()
        await upstream.close()
    return {"direct": direct, "bridge": measured, "floor": floor, "pieces": pieces,
            "tokens": tokens, "cpu_s": cpu, "floor_cpu_s": floor_cpu, "profile": profile}


async def _floor(args: argparse.Namespace, session: aiohttp.ClientSession, tracker: Tracker,
                 redis_url: str, upstream: TokenUpstream, yach: FakeYach,
                 turn_timeout: float) -> tuple[Measured, float]:
    """The same turns through the floor (`_floor.py`): the required hops and nothing else;
    with its CPU seconds per piece sent."""
    spec = {"redis": redis_url, "upstream": upstream.base_url, "yach": yach.url}
    async with child("floor", json.dumps(spec)) as floor:
        url = f"http://127.0.0.1:{floor.port}"

        async def turn(n: int) -> None:
            await bridge_turn(session, url, f"r{n}", n, tracker, turn_timeout)

        tracker.measured = Measured("floor warm-up, not counted")
        await in_batches(args.warmup, min(args.warmup, args.concurrency),
                         lambda n: turn(50000 + n))
        tracker.measured = Measured("floor (the hops SPEC requires, nothing else)")
        tracker.pieces.clear()
        meter = ProcessMeter([floor.pid])
        cpu_before = sum(meter.cpu())
        await in_batches(args.turns, args.concurrency, lambda n: turn(40000 + n))
        cpu_s = sum(meter.cpu()) - cpu_before
    tracker.measured.note_upstream(tracker, upstream, (f"r{40000 + n}" for n in range(args.turns)))
    return tracker.measured, cpu_s / max(sum(tracker.pieces.values()), 1)


async def _profile(
    args: argparse.Namespace, pid: int, turn: Callable[[int], Awaitable[None]], out: Path
) -> list[str]:
    """Another batch of turns (not timed) while py-spy samples the bridge."""
    seconds = max(1.0, args.turns / args.concurrency * args.tokens * args.interval_ms / 1000)
    spy = asyncio.get_running_loop().create_task(profile_pid(pid, seconds, out))
    await in_batches(args.turns, args.concurrency, lambda n: turn(20000 + n))
    if not await spy:
        return ["(py-spy is not installed or could not attach: `pip install py-spy`)"]
    return top_functions(out)


# -- report -----------------------------------------------------------------------------------


def table(paths: Sequence[Measured]) -> list[str]:
    head = ["path", "turns", "first token p50 ms", "p99 ms", "tokens",
            "token latency p50 ms", "p99 ms", "p99.9 ms", "max ms"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        f50, f99 = percentiles(path.first, (50, 99))
        l50, l99, l999 = percentiles(path.latency)
        cells = [path.name, str(len(path.first)), ms(f50), ms(f99), str(len(path.latency)),
                 ms(l50), ms(l99), ms(l999), ms(max(path.latency, default=float("nan")))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def verdicts(found: dict[str, object]) -> list[str]:
    direct, bridge = found["direct"], found["bridge"]
    assert isinstance(direct, Measured) and isinstance(bridge, Measured)

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    floor = found["floor"]
    assert isinstance(floor, Measured)
    p50, p99 = percentiles(bridge.latency, (50, 99))
    floor50, floor99 = percentiles(floor.latency, (50, 99))
    (first_floor,) = percentiles(floor.first, (50,))
    hop50, hop99 = percentiles(direct.latency, (50, 99))
    (first_direct,) = percentiles(direct.first, (50,))
    (first_bridge,) = percentiles(bridge.first, (50,))
    overhead = first_bridge - first_direct
    (upstream,) = percentiles(bridge.to_upstream, (50,))
    (floor_upstream,) = percentiles(floor.to_upstream, (50,))
    tokens, pieces, cpu = found["tokens"], found["pieces"], found["cpu_s"]
    floor_cpu = found["floor_cpu_s"]
    assert isinstance(tokens, int) and isinstance(pieces, int) and isinstance(cpu, float)
    assert isinstance(floor_cpu, float)
    return [
        f"added latency (emission → fake Yach): p50 {ms(p50)} ms (target ≤ "
        f"{TARGET_P50_S * 1000:g}: {met(p50 <= TARGET_P50_S)}), p99 {ms(p99)} ms "
        f"(target ≤ {TARGET_P99_S * 1000:g}: {met(p99 <= TARGET_P99_S)}); for scale, one "
        f"loopback hop on this machine (the upstream read directly): p50 {ms(hop50)} ms, "
        f"p99 {ms(hop99)} ms",
        f"first-token overhead vs the upstream called directly: {ms(overhead)} ms "
        f"(target ≤ {TARGET_FIRST_S * 1000:g}: {met(overhead <= TARGET_FIRST_S)}); of the "
        f"bridge's first token, webhook posted → upstream request arrived: p50 {ms(upstream)} ms",
        f"the floor on this machine (`_floor.py`: per webhook one Redis write, per piece one "
        f"Redis write and the POST, nothing else): added latency p50 {ms(floor50)} ms, p99 "
        f"{ms(floor99)} ms, first-token overhead {ms(first_floor - first_direct)} ms, webhook "
        f"posted → upstream request arrived {ms(floor_upstream)} ms; the bridge above it: "
        f"p50 {ms(p50 - floor50)} ms, p99 {ms(p99 - floor99)} ms, first token "
        f"{ms(first_bridge - first_floor)} ms",
        f"pieces: {pieces} for {tokens} tokens ({pieces / max(tokens, 1):.2f} per token); "
        f"CPU per piece sent, the turn's own work included: bridge {cpu * 1e6 / max(pieces, 1):.0f}"
        f" µs, floor {floor_cpu * 1e6:.0f} µs",
    ]


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a few short turns, nothing recorded")
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=5, help="turns at a time")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between tokens")
    parser.add_argument("--warmup", type=int, default=5, help="turns before measuring")
    parser.add_argument("--profile", action="store_true",
                        help="profile the bridge with py-spy over another batch of turns")
    add_priority_option(parser)
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        args.turns, args.concurrency, args.tokens, args.interval_ms, args.warmup = 4, 2, 5, 10, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or (None if args.quick else RESULTS)
    priority, load = apply_priority(args.nice), MachineLoad()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        found = asyncio.run(run(args, Path(tmp)))
    direct, bridge = found["direct"], found["bridge"]
    assert isinstance(direct, Measured) and isinstance(bridge, Measured)
    floor = found["floor"]
    assert isinstance(floor, Measured)
    lines = table([direct, bridge, floor])
    said = [*verdicts(found), load.describe(), priority]
    profile = found["profile"]
    assert isinstance(profile, list)
    print(*lines, "", *said, sep="\n")
    if profile:
        print("\npy-spy, the bridge relaying:", *profile, sep="\n")
    if results is not None:
        entry = [
            *entry_head("Relay overhead", command_line("bench_relay.py", argv)),
            f"- load: {args.turns} turns, {args.concurrency} at a time, {args.tokens} tokens "
            f"each, one every {args.interval_ms:g} ms; {args.warmup} warm-up turns first",
            "- bridge: `python -m bridge run`, BRIDGE_REPLY_MODE=stream, "
            "BRIDGE_FLUSH_MIN_CHARS=0, BRIDGE_FLUSH_MAX_WAIT_S=0 (the closest to every delta "
            "at once: Yach has no every-delta setting), BRIDGE_YACH_SEND_RATE=0, app-API "
            "route, log level info; private redis-server, appendonly everysec",
            *[f"- {line}" for line in said],
            "", *lines,
        ]
        record_run(results, entry, profile, "the bridge relaying")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
