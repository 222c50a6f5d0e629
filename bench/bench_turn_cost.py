"""Turn cost in instructions: what one turn, and one token of it, costs the bridge, counted
by valgrind's callgrind rather than timed.

    python bench/bench_turn_cost.py          # appends to RESULTS.md
    python bench/bench_turn_cost.py --quick  # a smoke run; records nothing

A real `python -m bridge run` runs under `valgrind --tool=callgrind` (private redis-server,
the fakes of the other benchmarks, the app-API route, BRIDGE_REPLY_MODE=final: one piece per
answer, however many tokens). After warm-up turns its counters are zeroed; then `--turns`
turns, one at a time, each a one-token answer; the counters are dumped; then the same with
answers of `--tokens` tokens, in a fresh process. Instructions per turn are the first count
over the turns; per token, the difference between the two over the extra tokens.

Timed CPU on a shared VM drifts by a quarter within minutes (RESULTS.md, the passes of
2026-11-30), more than most changes move it; instruction counts repeat within a percent, so
two commits compare in one run each (run the script of one from a worktree of the other, with
PYTHONPATH pointing at it). The counts are the bridge process's alone, at every instruction
in it, the interpreter's included; not the loop's waiting, not the kernel's share of a
syscall. Under callgrind the bridge runs ~50× slower, so the fake upstream spaces its tokens
5 ms apart: each is read on its own, as on a real network.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    BridgeSet,
    TimedYach,
    TokenPlan,
    TokenUpstream,
    bench_env,
    callgrind_control,
    callgrind_total,
    command_line,
    entry_head,
    record,
)

from tests.harness import group_message, signed_headers
from tests.procs import BridgeProcess

TOKEN_INTERVAL_S = 0.005
WARMUP_TURNS = 10


async def instructions(work: Path, tokens: int, turns: int) -> tuple[int, float]:
    """Instructions the bridge spent on `turns` turns of `tokens`-token answers, and the
    seconds they took (under callgrind)."""
    answered: dict[str, asyncio.Event] = {}

    def on_piece(arrived: int, group: str, text: str) -> None:
        if group in answered:
            answered[group].set()

    upstream = await TokenUpstream(TokenPlan(tokens=tokens, interval_s=TOKEN_INTERVAL_S)).start()
    yach = await TimedYach(on_piece).start()
    services = BridgeSet(work / f"t{tokens}")
    out = work / f"callgrind-{tokens}.out"
    try:
        services.start_redis()
        env = bench_env(services.redis.url, yach, upstream.base_url, BRIDGE_REPLY_MODE="final")
        # Counting nothing until told: the start-up runs several times faster uninstrumented.
        wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   "--dump-instr=no", "--instr-atstart=no")  # fmt: skip
        bridge = await BridgeProcess(env, work / f"bridge-{tokens}.log", wrapper).start(600)
        services.bridges.append(bridge)
        async with aiohttp.ClientSession() as session:

            async def turn(n: int) -> None:
                group = f"g{tokens}-{n}"
                answered[group] = asyncio.Event()
                payload = group_message(f"r{n}", msg_id=uuid.uuid4().hex, group=group)
                async with session.post(f"{bridge.url}/webhook/yach", json=payload,
                                        headers=signed_headers()) as response:
                    assert response.status == 200, response.status
                await asyncio.wait_for(answered[group].wait(), 120)

            callgrind_control("--instr=on", bridge.pid)
            for n in range(WARMUP_TURNS):
                await turn(-1 - n)
            await asyncio.sleep(0.5)  # the last warm-up turn's record and ack
            callgrind_control("-z", bridge.pid)
            started = time.monotonic()
            for n in range(turns):
                await turn(n)
            await asyncio.sleep(0.5)
            seconds = time.monotonic() - started
            callgrind_control("-d", bridge.pid)
        bridge.kill()
        return callgrind_total(out), seconds
    finally:
        services.close()
        await yach.close()
        await upstream.close()


async def run(turns: int, tokens: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-turn-cost-") as tmp:
        work = Path(tmp)
        one, one_s = await instructions(work, 1, turns)
        many, many_s = await instructions(work, tokens, turns)
    return {"one": one, "one_s": one_s, "many": many, "many_s": many_s}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; records nothing")
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=101,
                        help="tokens per answer of the second run (the first: one)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.tokens = 3, 4
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind (with callgrind_control) is not installed: nothing measured")
        return 0
    found = asyncio.run(run(args.turns, args.tokens))
    per_turn = found["one"] / args.turns
    per_token = (found["many"] - found["one"]) / args.turns / (args.tokens - 1)
    lines = [
        f"instructions per one-token turn (webhook to acknowledgement): {per_turn:,.0f}",
        f"instructions per further token (read, parsed, composed): {per_token:,.0f}",
        f"turns of {args.tokens} tokens: {found['many'] / args.turns:,.0f} instructions each; "
        f"under callgrind {found['one_s'] / args.turns * 1000:.0f} ms a one-token turn, "
        f"{found['many_s'] / args.turns * 1000:.0f} ms a {args.tokens}-token one",
    ]
    print(*lines, sep="\n")
    results = args.results or (None if args.quick else RESULTS)
    if results is not None:
        head = entry_head("Turn cost in instructions", command_line("bench_turn_cost.py", argv))
        load = (f"- load: {args.turns} turns one at a time, answers of 1 and of {args.tokens} "
                f"tokens ({TOKEN_INTERVAL_S * 1000:g} ms apart), {WARMUP_TURNS} warm-up turns "
                f"first; BRIDGE_REPLY_MODE=final, app-API route; valgrind --tool=callgrind")
        record(results, [*head, load, *(f"- {line}" for line in lines)])
        print(f"\nappended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
