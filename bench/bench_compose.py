"""Piece cutting: CPU per token of the Composer in stream mode, prose against code.

    python bench/bench_compose.py          # appends to RESULTS.md
    python bench/bench_compose.py --quick  # a smoke run of short answers; records nothing

An answer is fed as 4-character deltas under the default flush policy (300 characters, 6 s
max wait, 5,000 per message), as a streaming turn feeds it. While the buffer waits for a
place to cut, each delta looks for one: a code block, where no cut may fall, is where that
look costs most, and so is a table, and text with no boundary at all (CJK without
punctuation, a long URL), which waits for the 5,000-character split. Prose of about the same
length is the baseline. A long answer (25× as long; in stream mode, and in final mode, where
the whole answer is held to the end) shows whether a delta's cost grows with the answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import command_line, entry_head, record  # noqa: E402
from bridge.compose import Composer, FlushPolicy  # noqa: E402
from bridge.events import TextDelta  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
DELTA_CHARS = 4


def code_answer(lines: int) -> str:
    body = "".join(f"x{i} = compute(x{i - 1}) + 1  # step {i}.\n" for i in range(1, lines + 1))
    return f"Here is the code:\n\n```python\n{body}```\n\nThat is all.\n"


def table_answer(rows: int) -> str:
    body = "".join(f"| {i} | {i * i} | fine, and more. |\n" for i in range(rows))
    return f"Results:\n\n| n | square | note |\n|---|---|---|\n{body}\nThat is all.\n"


def boundless_answer(chars: int) -> str:
    clause = "这是一段没有任何标点符号的很长的中文文本"
    return clause * (chars // len(clause)) + "。"


def prose_answer(chars: int) -> str:
    words = (f"Sentence number {i} says a little more." for i in range(chars))
    text = ""
    for sentence in words:
        if len(text) >= chars:
            return text
        text += sentence + " "
    return text


def cpu_per_token(
    text: str, repeat: int, policy: FlushPolicy | None = None
) -> tuple[float, int]:
    """The best CPU µs per delta over `repeat` turns, and the pieces one turn sends."""
    deltas = [TextDelta(text[i : i + DELTA_CHARS]) for i in range(0, len(text), DELTA_CHARS)]
    best, pieces = float("inf"), 0
    for _ in range(repeat):
        composer = Composer(policy or FlushPolicy())
        started = time.process_time()
        sent = [piece for delta in deltas for piece in composer.feed(delta, 0.0)]
        sent += composer.finish()
        best = min(best, time.process_time() - started)
        pieces = len(sent)
        assert "".join(sent) == text
    return best / len(deltas) * 1e6, pieces


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; records nothing")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the entry (default bench/RESULTS.md; "
                             "--quick records only when this is given)")
    args = parser.parse_args(argv)
    lines, repeat = (20, 1) if args.quick else (120, 5)  # the block fits one message
    code = code_answer(lines)
    prose = prose_answer(len(code))
    long_prose = prose_answer(25 * len(code))
    rows = []
    answers = [("prose", prose, None), ("one code block", code, None),
               ("one table", table_answer(lines), None),
               ("no boundary", boundless_answer(len(code)), None),
               ("long prose", long_prose, None),
               ("long prose, final mode", long_prose, FlushPolicy(mode="final"))]
    for name, text, policy in answers:
        micros, pieces = cpu_per_token(text, repeat, policy)
        rows.append((name, len(text), micros, pieces))
    table = [
        "| answer | characters | CPU µs per delta | pieces |",
        "|---|---|---|---|",
        *(f"| {name} | {size:,} | {micros:.1f} | {n} |" for name, size, micros, n in rows),
    ]
    verdict = "per delta, " + ", ".join(
        f"{name} {micros / rows[0][2]:.1f}× prose" for name, _, micros, _ in rows[1:]
    )
    print(*table, "", verdict, sep="\n")
    results = args.results or (None if args.quick else RESULTS)
    if results is not None:
        head = entry_head("Piece cutting", command_line("bench_compose.py", argv))
        load = f"- load: {DELTA_CHARS}-character deltas, default flush policy, best of {repeat}"
        record(results, [*head, load, f"- result: {verdict}", "", *table])
        print(f"\nappended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
