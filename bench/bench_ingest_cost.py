"""Ingest cost in instructions: what one acknowledged webhook costs the bridge, next to what
it costs the bare aiohttp app, counted by valgrind's callgrind rather than timed.

    python bench/bench_ingest_cost.py          # appends to RESULTS.md
    python bench/bench_ingest_cost.py --quick  # a smoke run; records nothing

`bench_ingest.py` times the bridge's maximum against the bare app's; on a shared VM that
share moves by a quarter between runs (RESULTS.md, 2026-11-30), more than most changes do.
Here each server runs under `valgrind --tool=callgrind`, one after the other, driven by the
same load generator as there (signed webhooks with distinct ids, closed loop on
`--connections` connections) for `--seconds` after a warm-up; the counters are zeroed before
and dumped after. Instructions per acknowledged webhook are the count over the 200 answers,
and the share is the bare app's count over the bridge's: what the rate would be on a core
that runs nothing else. Counts repeat within a few percent.

The bridge is `python -m bridge run` on a private redis-server, 200 once Redis has stored the
entry. Its worker is parked on an upstream that never answers (as in `bench_ingest.py`), and
only one (BRIDGE_WORKERS=1) with no thinking notice, so that little runs beside the ingest.
What does (the parked turn's lock renewals, the loop's timers) is counted over a quiet window
as long as the load's, in the same process right after it, and taken off. The bare app is
`bench/_common.py bare` on uvloop, as the bridge runs. Under callgrind both run ~50× slower,
so each answers fewer webhooks per second than at full speed, and the bridge stores more of
them per Redis call; the counts are the process's own, not Redis's, nor the kernel's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    BridgeSet,
    LoadGen,
    TimedYach,
    TokenPlan,
    TokenUpstream,
    bench_env,
    callgrind_control,
    callgrind_total,
    child,
    command_line,
    entry_head,
    record,
)

from tests.harness import WEBHOOK_SECRET
from tests.procs import BridgeProcess

TARGET_SHARE = 0.60
WARMUP_S = 3.0


@dataclass(frozen=True)
class Count:
    webhooks: int  # acknowledged (200) during the counted window
    instructions: int  # in that window, the background taken off

    @property
    def per_webhook(self) -> float:
        return self.instructions / self.webhooks if self.webhooks else float("nan")


def _wrapper(out: Path) -> tuple[str, ...]:
    """Callgrind, counting nothing until told (`--instr=on`): the start-up (imports, Redis,
    the fakes) runs several times faster uninstrumented."""
    return ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--instr-atstart=no", f"--log-file={out}.log")  # fmt: skip


async def _load(host: str, port: int, pid: int, seconds: float, connections: int) -> int:
    """Warm up, zero the counters, load for `seconds`, dump them: the webhooks answered 200."""
    gen = LoadGen([(host, port)], "ingest-cost", WEBHOOK_SECRET)
    callgrind_control("--instr=on", pid)
    await gen.closed_loop(min(WARMUP_S, seconds), connections)
    gen.resign()
    callgrind_control("-z", pid)
    result = await gen.closed_loop(seconds, connections)
    callgrind_control("-d", pid)
    if result.errors:
        raise RuntimeError(f"{result.errors} webhooks not answered 200")
    return result.ok


async def bridge_count(work: Path, seconds: float, connections: int) -> tuple[Count, int]:
    """The bridge's count, and the background instructions taken off it."""
    upstream = await TokenUpstream(TokenPlan(tokens=1, first_delay_s=3600)).start()
    yach = await TimedYach().start()
    services = BridgeSet(work)
    out = work / "bridge.callgrind"
    try:
        services.start_redis()
        env = bench_env(services.redis.url, yach, upstream.base_url,
                        BRIDGE_WORKERS="1", BRIDGE_THINKING_NOTICE_S="0")  # fmt: skip
        bridge = await BridgeProcess(env, work / "bridge.log", _wrapper(out)).start(600)
        services.bridges.append(bridge)
        host, port = bridge.url.removeprefix("http://").rsplit(":", 1)
        webhooks = await _load(host, int(port), bridge.pid, seconds, connections)
        loaded = callgrind_total(out)
        callgrind_control("-z", bridge.pid)
        await asyncio.sleep(seconds)
        callgrind_control("-d", bridge.pid)
        background = callgrind_total(out)
        bridge.kill()
        return Count(webhooks, loaded - background), background
    finally:
        services.close()
        await yach.close()
        await upstream.close()


async def bare_count(work: Path, seconds: float, connections: int) -> Count:
    out = work / "bare.callgrind"
    async with child("bare", json.dumps({"loop": "uvloop"}), wrapper=_wrapper(out)) as bare:
        webhooks = await _load("127.0.0.1", bare.port, bare.pid, seconds, connections)
        return Count(webhooks, callgrind_total(out))  # before the dump it writes as it exits


async def run(seconds: float, connections: int) -> tuple[Count, int, Count]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-cost-") as tmp:
        work = Path(tmp)
        bridge, background = await bridge_count(work, seconds, connections)
        bare = await bare_count(work, seconds, connections)
    return bridge, background, bare


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; records nothing")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the count")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind (with callgrind_control) is not installed: nothing measured")
        return 0
    bridge, background, bare = asyncio.run(run(args.seconds, args.connections))
    share = bare.per_webhook / bridge.per_webhook
    verdict = "met" if share >= TARGET_SHARE else "missed"
    lines = [
        f"chatbridge: {bridge.per_webhook:,.0f} instructions per acknowledged webhook "
        f"({bridge.webhooks:,} webhooks; {background / args.seconds:,.0f} a second of "
        f"background taken off)",
        f"bare aiohttp on uvloop: {bare.per_webhook:,.0f} instructions per webhook "
        f"({bare.webhooks:,} webhooks)",
        f"share of the bare app's rate per core: {share:.0%} (target ≥ {TARGET_SHARE:.0%}: "
        f"{verdict})",
    ]
    print(*lines, sep="\n")
    results = args.results or (None if args.quick else RESULTS)
    if results is not None:
        head = entry_head("Ingest cost in instructions",
                          command_line("bench_ingest_cost.py", argv))  # fmt: skip
        load = (f"- load: signed webhooks with distinct ids, closed loop on {args.connections} "
                f"connections for {args.seconds:g} s after {min(WARMUP_S, args.seconds):g} s of "
                f"warm-up, each "
                f"server under valgrind --tool=callgrind; the bridge with one parked worker "
                f"and no thinking notice")  # fmt: skip
        record(results, [*head, load, *(f"- {line}" for line in lines)])
        print(f"\nappended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
