"""Turn cost in instructions: what one turn, one token and one relayed piece cost the bridge,
counted by valgrind's callgrind rather than timed.

    python bench/bench_turn_cost.py          # appends to RESULTS.md
    python bench/bench_turn_cost.py --quick  # a smoke run; records nothing

A real `python -m bridge run` runs under `valgrind --tool=callgrind` (private redis-server,
the fakes of the other benchmarks, the app-API route). In each phase, after warm-up turns,
its counters are zeroed, `--turns` turns run one at a time, and the counters are dumped:
- BRIDGE_REPLY_MODE=final (one piece per answer, however many tokens): one-token answers,
  then answers of `--tokens` tokens. Instructions per turn are the first count over the
  turns; per token, the difference between the two over the extra tokens.
- In another process, the relay bench's setting (stream mode, BRIDGE_FLUSH_MIN_CHARS=0,
  BRIDGE_FLUSH_MAX_WAIT_S=0: every token a sentence, each sent as a piece of its own), one-
  then `--piece-tokens`-token answers: per piece, the difference over the extra pieces (a
  token read, composed, journalled and sent). The same for `_floor.py`, the relay bench's
  floor (only the hops SPEC requires: per piece one Redis write and the POST), counted the
  same way: what the bridge spends per piece above it is its own.

Timed CPU on a shared VM drifts by a quarter within minutes (RESULTS.md, the passes of
2026-11-30), more than most changes move it; instruction counts repeat within a percent, so
two commits compare in one run each (run the script of one from a worktree of the other, with
PYTHONPATH pointing at it). The counts are the process's alone, at every instruction in it,
the interpreter's included; not the loop's waiting, not the kernel's share of a syscall.
Under callgrind a process runs ~50× slower, so the fake upstream spaces its tokens 5 ms apart
(each is read on its own, as on a real network), and 80 ms apart where each is to leave as a
piece of its own (its send has finished before the next arrives).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
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
    child,
    command_line,
    entry_head,
    record,
)

from tests.harness import group_message, signed_headers
from tests.procs import BridgeProcess

TOKEN_INTERVAL_S = 0.005
PIECE_INTERVAL_S = 0.08
WARMUP_TURNS = 10  # before a process's first phase; later phases find it warm
RESETTLE_TURNS = 2  # before each later phase (answers of the new length)
# the relay bench's flush policy: every token (a sentence each) a piece as soon as it is read
FINAL = {"BRIDGE_REPLY_MODE": "final"}
EVERY_PIECE = {"BRIDGE_REPLY_MODE": "stream", "BRIDGE_FLUSH_MIN_CHARS": "0",
               "BRIDGE_FLUSH_MAX_WAIT_S": "0"}  # fmt: skip


@dataclass(frozen=True)
class Counted:
    instructions: int
    seconds: float
    pieces: int


async def instructions(
    work: Path,
    phases: Sequence[tuple[int, int]],
    *,
    interval_s: float = TOKEN_INTERVAL_S,
    settings: Mapping[str, str] = FINAL,
    floor: bool = False,
) -> list[Counted]:
    """One process, under callgrind: the bridge with `settings`, or the floor. Per phase
    (answers of `tokens` tokens, `turns` turns one at a time, after warm-up turns not
    counted): the instructions it spent, the seconds they took (under callgrind) and the
    pieces the fake Yach received."""
    name = f"{'floor' if floor else 'bridge'}-{settings.get('BRIDGE_REPLY_MODE')}"
    answered: dict[str, asyncio.Event] = {}
    pieces = 0

    def on_piece(arrived: int, group: str, text: str) -> None:
        nonlocal pieces
        pieces += 1
        if f"t{upstream.plan.tokens - 1}@" in text and group in answered:
            answered[group].set()

    upstream = await TokenUpstream(TokenPlan(interval_s=interval_s)).start()
    yach = await TimedYach(on_piece).start()
    services = BridgeSet(work / name)
    out = work / f"callgrind-{name}.out"
    # Counting nothing until told: the start-up runs several times faster uninstrumented.
    wrapper = ("valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}",
               "--dump-instr=no", "--instr-atstart=no")  # fmt: skip
    counted: list[Counted] = []
    try:
        services.start_redis()
        async with (
            _counted(services, floor, settings, yach, upstream.base_url, wrapper) as (url, pid),
            aiohttp.ClientSession() as session,
        ):

            async def turn(label: str) -> None:
                group = f"g-{label}"
                answered[group] = asyncio.Event()
                payload = group_message(label, msg_id=uuid.uuid4().hex, group=group)
                async with session.post(f"{url}/webhook/yach", json=payload,
                                        headers=signed_headers()) as response:
                    assert response.status == 200, response.status
                await asyncio.wait_for(answered[group].wait(), 120)

            callgrind_control("--instr=on", pid)
            for phase, (tokens, turns) in enumerate(phases):
                upstream.plan.tokens = tokens
                for n in range(RESETTLE_TURNS if phase else WARMUP_TURNS):
                    await turn(f"w{tokens}-{n}")
                await asyncio.sleep(0.5)  # the last warm-up turn's record and ack
                callgrind_control("-z", pid)
                pieces, started = 0, time.monotonic()
                for n in range(turns):
                    await turn(f"r{tokens}-{n}")
                await asyncio.sleep(0.5)
                seconds = time.monotonic() - started
                callgrind_control("-d", pid)
                counted.append(Counted(callgrind_total(out), seconds, pieces))
        return counted
    finally:
        services.close()
        await yach.close()
        await upstream.close()


@contextlib.asynccontextmanager
async def _counted(
    services: BridgeSet,
    floor: bool,
    settings: Mapping[str, str],
    yach: TimedYach,
    upstream_url: str,
    wrapper: Sequence[str],
) -> AsyncIterator[tuple[str, int]]:
    """The bridge, or the floor, started under `wrapper`: its URL and pid. The bridge is
    killed at the end (a clean exit would write a dump of its own)."""
    if floor:
        spec = {"redis": services.redis.url, "upstream": upstream_url, "yach": yach.url}
        async with child("floor", json.dumps(spec), wrapper=wrapper) as process:
            yield f"http://127.0.0.1:{process.port}", process.pid
        return
    env = bench_env(services.redis.url, yach, upstream_url, **settings)
    bridge = await BridgeProcess(env, services.work / "bridge.log", tuple(wrapper)).start(600)
    services.bridges.append(bridge)
    try:
        yield bridge.url, bridge.pid
    finally:
        bridge.kill()


async def count_all(args: argparse.Namespace) -> dict[str, list[Counted]]:
    final_phases = [(1, args.turns), (args.tokens, args.turns)]
    piece_phases = [(1, args.piece_turns), (args.piece_tokens, args.piece_turns)]
    with tempfile.TemporaryDirectory(prefix="bench-turn-cost-") as tmp:
        work = Path(tmp)
        return {
            "final": await instructions(work, final_phases),
            "stream": await instructions(work, piece_phases,
                                         interval_s=PIECE_INTERVAL_S, settings=EVERY_PIECE),
            "floor": await instructions(work, piece_phases,
                                        interval_s=PIECE_INTERVAL_S, floor=True),
        }  # fmt: skip


def per_piece(one: Counted, many: Counted) -> float:
    """Instructions per piece beyond a one-token turn's."""
    extra = many.pieces - one.pieces
    if extra <= 0:
        raise RuntimeError(f"no extra pieces: {one.pieces} and {many.pieces}")
    return (many.instructions - one.instructions) / extra


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; records nothing")
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=101,
                        help="tokens per answer of the second final-mode run (the first: one)")
    parser.add_argument("--piece-turns", type=int, default=20,
                        help="turns of each stream-mode run, bridge and floor")
    parser.add_argument("--piece-tokens", type=int, default=11,
                        help="tokens (pieces) per answer of the second stream-mode run")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.tokens, args.piece_turns, args.piece_tokens = 3, 4, 2, 3
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind (with callgrind_control) is not installed: nothing measured")
        return 0
    found = asyncio.run(count_all(args))
    (one, many), (stream_one, stream_many) = found["final"], found["stream"]
    floor_one, floor_many = found["floor"]
    per_turn = one.instructions / args.turns
    per_token = (many.instructions - one.instructions) / args.turns / (args.tokens - 1)
    bridge_piece, floor_piece = per_piece(stream_one, stream_many), per_piece(floor_one, floor_many)
    lines = [
        f"instructions per one-token turn (webhook to acknowledgement): {per_turn:,.0f}",
        f"instructions per further token (read, parsed, composed): {per_token:,.0f}",
        f"turns of {args.tokens} tokens: {many.instructions / args.turns:,.0f} instructions "
        f"each; under callgrind {one.seconds / args.turns * 1000:.0f} ms a one-token turn, "
        f"{many.seconds / args.turns * 1000:.0f} ms a {args.tokens}-token one",
        f"instructions per piece in stream mode (a token read, composed, journalled, sent): "
        f"{bridge_piece:,.0f}; the floor's (`_floor.py`: one Redis write and the POST) "
        f"{floor_piece:,.0f}: the bridge {bridge_piece / floor_piece:.2f}× the floor "
        f"({stream_many.pieces} and {floor_many.pieces} pieces for "
        f"{args.piece_turns * args.piece_tokens} tokens)",
    ]
    print(*lines, sep="\n")
    results = args.results or (None if args.quick else RESULTS)
    if results is not None:
        head = entry_head("Turn cost in instructions", command_line("bench_turn_cost.py", argv))
        load = (f"- load: {args.turns} turns one at a time, answers of 1 and of {args.tokens} "
                f"tokens ({TOKEN_INTERVAL_S * 1000:g} ms apart), {WARMUP_TURNS} warm-up turns "
                f"first ({RESETTLE_TURNS} before the second length); BRIDGE_REPLY_MODE=final, "
                f"app-API route; then {args.piece_turns} turns "
                f"of 1 and of {args.piece_tokens} tokens ({PIECE_INTERVAL_S * 1000:g} ms "
                f"apart) in stream mode, every token a piece, through the bridge and through "
                f"the floor; valgrind --tool=callgrind")
        record(results, [*head, load, *(f"- {line}" for line in lines)])
        print(f"\nappended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
