"""Webhook ingest: signed webhooks into `chatbridge run`, against a bare aiohttp app.

    python bench/bench_ingest.py                  # 250, 500, 1000, 2000/s and the maximum
    python bench/bench_ingest.py --processes 2    # the same, plus two bridges on one Redis
    python bench/bench_ingest.py --profile        # plus a py-spy profile of the bridge at max
    python bench/bench_ingest.py --bare-store     # plus the bare app storing with one XADD
    python bench/bench_ingest.py --pairs 4        # the share from 1 + 4 back-to-back pairs
    python bench/bench_ingest.py --quick          # a smoke run; records nothing

Signed webhooks with distinct message ids (1000 senders in 100 groups) go to a real
`python -m bridge run` on a private redis-server (append-only, fsync every second, as the
embedded one); 200 comes once Redis has stored the entry. The same client, in a process of
its own, drives a bare aiohttp app answering 200 with no work (`bench/_common.py bare`).

Each offered rate runs open-loop for `--seconds`: requests leave on schedule whatever the
answers do; a request that finds every connection waiting on the server is timed from its
scheduled send time, one sent at once from when it was written (the generator's own lateness
is the "loadgen lag" column). The maximum is closed-loop: each of `--max-connections`
connections sends again as soon as it is answered. CPU per answer is read from /proc for the
server, Redis and the generator over each step.

The share of the bare app's maximum is the median over back-to-back pairs: the first bare
loop's maximum and the bridge's from the full runs, then `--pairs` more of the two maxima in
turn. A VM's speed drifts by a quarter within minutes here; one pair apart in time measures
the drift as much as the bridge.

Workers are parked, to measure ingest alone: the upstream is a fake on loopback that holds
every stream open without a token, so BRIDGE_WORKERS (32) turns wait on it, using no CPU, and
the rest of the inbox waits unread. Each configuration starts on an empty Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    BridgeSet,
    MachineLoad,
    Step,
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
    profile_pid,
    record_run,
    run_loadgen,
    top_functions,
)

TARGET_ACKS, TARGET_P99_S, TARGET_SHARE = 3000.0, 0.010, 0.60


@dataclass(frozen=True)
class Pair:
    """The maxima of the bare app and of one bridge, measured one right after the other."""

    bare: float
    bridge: float

    @property
    def share(self) -> float:
        return self.bridge / self.bare if self.bare else 0.0


@dataclass
class Config:
    name: str
    steps: list[Step]

    @property
    def max_rate(self) -> float:
        return max((s.result.achieved for s in self.steps if s.result.name == "max"), default=0)

    @property
    def per_core(self) -> float:
        """1 / (server CPU seconds per answer at the maximum): a core's capacity."""
        step = next((s for s in self.steps if s.result.name == "max"), None)
        if step is None or not step.result.ok or not step.cpu_s.get("server"):
            return 0.0
        return step.result.ok / step.cpu_s["server"]

    def at(self, rate: float) -> Step | None:
        return next((s for s in self.steps if s.result.offered == rate), None)


def spec(args: argparse.Namespace, prefix: str, ports: Sequence[int]) -> dict[str, object]:
    steps: list[dict[str, object]] = [{"rate": r, "seconds": args.seconds} for r in args.rates]
    steps.append({"max": True, "seconds": args.seconds, "connections": args.max_connections})
    return {
        "targets": [["127.0.0.1", port] for port in ports],
        "prefix": prefix,
        "connections": args.connections,
        "warmup_s": args.warmup,
        "steps": steps,
    }


async def measure_pairs(
    args: argparse.Namespace, services: BridgeSet, env: dict[str, str]
) -> list[Pair]:
    """`--pairs` more maxima of the first bare loop and of one bridge, in turn."""
    max_only = argparse.Namespace(**{**vars(args), "rates": []})
    pairs = []
    for _ in range(args.pairs):
        bare = await measure_bare(max_only, args.bare_loops[0])
        one, _ = await measure_bridge(max_only, services, env, 1, None)
        pairs.append(Pair(bare.max_rate, one.max_rate))
    return pairs


async def measure_bare(args: argparse.Namespace, loop: str) -> Config:
    async with child("bare", json.dumps({"loop": loop})) as bare:
        steps = await run_loadgen(spec(args, f"bare-{loop}", [bare.port]), {"server": [bare.pid]})
    return Config("bare aiohttp" if loop == "asyncio" else f"bare aiohttp on {loop}", steps)


async def measure_bare_store(args: argparse.Namespace, services: BridgeSet) -> Config:
    """The bare app on uvloop with one XADD per request before the 200: what storing alone
    costs on this machine (not a target's baseline; the bridge batches its writes)."""
    services.fresh_redis()
    setup = {"loop": "uvloop", "store": services.redis.url}
    async with child("bare", json.dumps(setup)) as bare:
        watch = {"server": [bare.pid], "redis": [services.redis_pid]}
        steps = await run_loadgen(spec(args, "bare-store", [bare.port]), watch)
    return Config("bare aiohttp on uvloop + one XADD", steps)


async def measure_bridge(
    args: argparse.Namespace, services: BridgeSet, env: dict[str, str], processes: int,
    profile_to: Path | None,
) -> tuple[Config, list[str]]:
    """One configuration: `processes` bridges on a fresh Redis; the profile's top lines."""
    services.fresh_redis()
    bridges = await services.start(env, processes)
    watch = {"server": [b.pid for b in bridges], "redis": [services.redis_pid]}
    try:
        steps = await run_loadgen(spec(args, f"p{processes}", [b.port for b in bridges]), watch)
        profile: list[str] = []
        if profile_to is not None:
            profile = await _profile(args, bridges[0].pid, bridges[0].port, profile_to)
    finally:
        await services.stop()
    label = "chatbridge" if processes == 1 else f"chatbridge ×{processes}"
    return Config(label, steps), profile


async def _profile(args: argparse.Namespace, pid: int, port: int, out: Path) -> list[str]:
    """A closed-loop run at the maximum while py-spy samples the bridge (not timed)."""
    seconds = args.profile_seconds
    profiling: list[asyncio.Task[bool]] = []

    def start_profiler(step: dict[str, object]) -> None:
        loop = asyncio.get_running_loop()
        profiling.append(loop.create_task(profile_pid(pid, seconds, out)))

    run = {"targets": [["127.0.0.1", port]], "prefix": "profile", "connections": 8,
           "steps": [{"max": True, "seconds": seconds + 1, "connections": args.max_connections}]}
    await run_loadgen(run, {}, on_start=start_profiler)
    if not (profiling and all(await asyncio.gather(*profiling))):
        return ["(py-spy is not installed or could not attach: `pip install py-spy`)"]
    return top_functions(out)


# -- report -----------------------------------------------------------------------------------


def table(configs: Sequence[Config]) -> list[str]:
    head = ["server", "offered/s", "acks/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
            "server CPU µs/ack", "redis CPU µs/ack", "loadgen CPU µs/req", "loadgen lag p99 ms"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in configs:
        for step in config.steps:
            r = step.result
            per = 1e6 / max(r.ok, 1)
            cells = [
                config.name,
                f"{r.offered:g}" if r.offered else f"max ({r.connections} conns)",
                f"{r.achieved:,.0f}", ms(r.p50), ms(r.p99), ms(r.p999), str(r.errors),
                f"{step.cpu_s.get('server', 0) * per:.0f}",
                f"{step.cpu_s['redis'] * per:.0f}" if "redis" in step.cpu_s else "–",
                f"{step.cpu_s['loadgen'] * 1e6 / max(r.sent, 1):.0f}",
                ms(r.lag_p99) if r.offered else "–",
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    return out


def verdicts(
    bares: Sequence[Config],
    one: Config,
    more: Config | None,
    stored: Config | None,
    pairs: Sequence[Pair] = (),
) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = [f"max acks/s in one process: {one.max_rate:,.0f} "
           f"(target ≥ {TARGET_ACKS:,.0f}: {met(one.max_rate >= TARGET_ACKS)})"]
    at_1000 = one.at(1000)
    if at_1000 is not None:
        p99 = at_1000.result.p99
        out.append(f"p99 at 1000/s: {ms(p99)} ms (target ≤ {TARGET_P99_S * 1000:g} ms: "
                   f"{met(p99 <= TARGET_P99_S)})")
    for index, bare in enumerate(bares):
        first = Pair(bare.max_rate, one.max_rate)
        if index == 0 and pairs:
            measured = [first, *pairs]
            share = statistics.median(p.share for p in measured)
            each = ", ".join(f"{p.bare:,.0f} → {p.bridge:,.0f}/s {p.share:.0%}" for p in measured)
            out.append(f"share of the maximum of the {bare.name}, median of {len(measured)} "
                       f"back-to-back pairs: {share:.0%} (target ≥ {TARGET_SHARE:.0%}: "
                       f"{met(share >= TARGET_SHARE)}); the pairs (bare → chatbridge): {each}")
        else:
            share = first.share
            out.append(f"share of the maximum of the {bare.name} ({bare.max_rate:,.0f}/s): "
                       f"{share:.0%} (target ≥ {TARGET_SHARE:.0%}: {met(share >= TARGET_SHARE)})")
        ours, theirs = one.per_core, bare.per_core
        out.append(f"what one core would carry at the maximum's CPU cost per request "
                   f"(independent of how busy the machine was): chatbridge {ours:,.0f}/s, "
                   f"{bare.name} {theirs:,.0f}/s, {ours / max(theirs, 1):.0%}")
    if stored is not None and bares:
        out.append(f"{stored.name}: {stored.max_rate:,.0f}/s, "
                   f"{stored.max_rate / max(bares[0].max_rate, 1):.0%} of the {bares[0].name}; "
                   f"chatbridge {one.max_rate / max(stored.max_rate, 1):.2f}× it")
    if more is not None:
        out.append(f"scale-out: {more.name} {more.max_rate:,.0f}/s = "
                   f"{more.max_rate / max(one.max_rate, 1):.2f}× one process")
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny rates and steps, nothing recorded")
    parser.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",")],
                        default=[250.0, 500.0, 1000.0, 2000.0], help="offered rates, per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each step")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before the steps")
    parser.add_argument("--connections", type=int, default=32,
                        help="connections opened before the open-loop steps (more as needed)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="connections of the closed-loop maximum step")
    parser.add_argument("--processes", type=int, default=1,
                        help="also measure this many bridges on one Redis (scale-out)")
    parser.add_argument("--bare-loops", type=lambda t: t.split(","),
                        default=["uvloop", "asyncio"],
                        help="event loops to run the bare app on (default uvloop,asyncio; "
                             "the bridge runs on uvloop, so that is the like-for-like baseline)")
    parser.add_argument("--bare-store", action="store_true",
                        help="also the bare app on uvloop storing each request with one XADD")
    parser.add_argument("--pairs", type=int, default=2,
                        help="more back-to-back maxima of the first bare loop and one bridge, "
                             "for the share (the median over these and the full runs' pair)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one bridge with py-spy at the maximum (a separate run)")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    add_priority_option(parser)
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        args.rates, args.seconds, args.warmup = [100.0, 200.0], 0.5, 0.2
        args.connections, args.max_connections, args.profile_seconds = 4, 8, 1.0
        args.pairs = min(args.pairs, 1)
    return args


async def run(
    args: argparse.Namespace, work: Path
) -> tuple[list[Config], list[Pair], list[str]]:
    upstream = await TokenUpstream(TokenPlan(tokens=1, first_delay_s=3600)).start()
    yach = await TimedYach().start()
    services = BridgeSet(work)
    try:
        services.start_redis()
        env = bench_env(services.redis.url, yach, upstream.base_url)
        # The first loop last, so that its run and the bridge's make a back-to-back pair.
        bares = [await measure_bare(args, loop) for loop in reversed(args.bare_loops)][::-1]
        print(*table(bares), sep="\n", flush=True)
        one, profile = await measure_bridge(
            args, services, env, 1, work / "ingest.pyspy" if args.profile else None
        )
        print(*table([one])[2:], sep="\n", flush=True)
        configs = [*bares, one]
        if args.bare_store:
            stored = await measure_bare_store(args, services)
            print(*table([stored])[2:], sep="\n", flush=True)
            configs.append(stored)
        if args.processes > 1:
            more, _ = await measure_bridge(args, services, env, args.processes, None)
            print(*table([more])[2:], sep="\n", flush=True)
            configs.append(more)
        pairs = await measure_pairs(args, services, env)
    finally:
        services.close()
        await yach.close()
        await upstream.close()
    return configs, pairs, profile


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or (None if args.quick else RESULTS)
    priority, load = apply_priority(args.nice), MachineLoad()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        configs, pairs, profile = asyncio.run(run(args, Path(tmp)))
    lines = table(configs)
    bares, (one, *others) = configs[: len(args.bare_loops)], configs[len(args.bare_loops) :]
    more = next((c for c in others if c.name.startswith("chatbridge")), None)
    stored = next((c for c in others if not c.name.startswith("chatbridge")), None)
    found = [*verdicts(bares, one, more, stored, pairs), load.describe(), priority]
    print("", *lines, "", *found, sep="\n")
    if profile:
        print("\npy-spy, one bridge at the maximum:", *profile, sep="\n")
    if results is not None:
        entry = [
            *entry_head("Webhook ingest", command_line("bench_ingest.py", argv)),
            f"- steps: {args.seconds:g} s each, open-loop at the offered rates "
            f"({args.connections} connections to start, more as needed), then closed-loop "
            f"on {args.max_connections} connections; a request that waits for a free "
            "connection is timed from its scheduled send time",
            "- bridge: `python -m bridge run`, log level info (JSON to a file), workers parked "
            "on a fake upstream that holds every stream (ingest alone); private redis-server "
            "with appendonly yes, appendfsync everysec, over a unix socket",
            *[f"- {line}" for line in found],
            "", *lines,
        ]
        record_run(results, entry, profile, "one bridge at the maximum")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
