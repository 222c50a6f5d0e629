"""The end-to-end benchmarks run: each `--quick` mode, end to end, with no timing asserted.

Each runs as a process of its own (as it is run by hand), with two bridges where it has a
scale-out mode, and records into a file of the test's own; bench/RESULTS.md is never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
RESULTS = BENCH / "RESULTS.md"

pytestmark = pytest.mark.slow


def run_quick(script: str, results: Path, *extra: str, timeout_s: float = 100) -> str:
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--results", str(results), *extra],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before
    return done.stdout


def test_ingest_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_ingest.py", results, "--processes", "2", "--bare-store")
    assert "| bare aiohttp | max" in out and "| chatbridge ×2 |" in out
    assert "| bare aiohttp on uvloop + one XADD | max" in out
    assert re.search(r"one XADD: [\d,]+/s, \d+% of the bare aiohttp on uvloop; chatbridge "
                     r"[\d.]+× it", out), out[-1500:]
    text = results.read_text()
    assert "## Webhook ingest" in text and "--quick" in text and "max acks/s" in text
    # every webhook was answered 200: no errors column other than 0
    rows = [line for line in text.splitlines() if line.startswith("| chatbridge")]
    assert rows and all(line.split(" | ")[6] == "0" for line in rows), rows


def test_relay_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_relay.py", results)
    assert "| through chatbridge | 4 |" in out and "first-token overhead" in out
    # the floor relayed every token of its 4 turns (5 each), merged or not
    assert "| floor (the hops SPEC requires, nothing else) | 4 |" in out
    assert "the bridge above it" in out
    assert re.search(r"CPU per piece sent, the turn's own work included: bridge \d+ µs, floor "
                     r"\d+ µs", out), out[-1500:]
    assert "## Relay overhead" in results.read_text()


def test_concurrency_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_concurrency.py", results, "--processes", "2")
    assert "20 of 20 turns complete, whole and in order (met)" in out
    assert "scale-out, 2 processes: 20 of 20 whole" in out
    assert "reading the same 20 streams at once to their ends, nothing parsed, sent or stored " \
           "(20 of 20 ended)" in out
    assert "## Concurrency and cost" in results.read_text()


@pytest.mark.skipif(not (shutil.which("valgrind") and shutil.which("callgrind_control")),
                    reason="valgrind is not installed")
def test_turn_cost_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_turn_cost.py", results, timeout_s=300)  # ~50× slower under valgrind
    per_turn = re.search(r"instructions per one-token turn \(webhook to acknowledgement\): "
                         r"([\d,]+)", out)
    per_token = re.search(r"instructions per further token \(read, parsed, composed\): ([\d,]+)",
                          out)
    assert per_turn and per_token, out[-1500:]
    # a turn is millions of instructions, a token far fewer: both were counted, not zero
    assert int(per_turn[1].replace(",", "")) > 10 * int(per_token[1].replace(",", "")) > 0
    per_piece = re.search(r"instructions per piece in stream mode .*?: ([\d,]+); the floor's "
                          r".*? ([\d,]+): the bridge [\d.]+× the floor \((\d+) and (\d+) "
                          r"pieces", out)
    assert per_piece, out[-1500:]
    bridge, floor, bridge_pieces, floor_pieces = (
        int(n.replace(",", "")) for n in per_piece.groups()
    )
    # A piece is a Redis write and an HTTP POST: hundreds of thousands of instructions. (On a
    # loaded machine tokens may merge into fewer pieces: counted, not assumed.)
    assert bridge > 100_000 and floor > 100_000
    assert bridge_pieces > 0 and floor_pieces > 0
    assert "## Turn cost in instructions" in results.read_text()


def test_ingest_cost_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_ingest_cost.py", results, timeout_s=300)  # under valgrind
    bridge = re.search(r"chatbridge: ([\d,]+) instructions per acknowledged webhook", out)
    bare = re.search(r"bare aiohttp on uvloop: ([\d,]+) instructions per webhook", out)
    assert bridge and bare, out[-1500:]
    # Both counted over the load (an aiohttp request is some 200,000 instructions, not the
    # few thousand of the dump a process writes as it exits), and the bridge verifies,
    # parses and stores: it costs more than answering.
    assert int(bridge[1].replace(",", "")) > int(bare[1].replace(",", "")) > 100_000
    assert re.search(r"share of the bare app's rate per core: \d+%", out)
    assert "## Ingest cost in instructions" in results.read_text()


def test_compose_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_quick("bench_compose.py", results)
    assert "| prose |" in out and "| one code block |" in out and "| one table |" in out
    assert "| no boundary |" in out
    text = results.read_text()
    assert "## Piece cutting" in text and "--quick" in text


def test_profile_summary(tmp_path: Path) -> None:
    """py-spy's raw output, summed the way RESULTS.md shows it (own and total share)."""
    sys.path.insert(0, str(BENCH))
    from _common import top_functions

    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (/x/bridge/app.py:1);handle (/x/bridge/app.py:9);write (/usr/asyncio/t.py:3) 6\n"
        "main (/x/bridge/app.py:1);parse (/x/adapters/yach.py:5) 4\n"
    )
    lines = top_functions(raw)
    assert lines[0].startswith("10 samples")
    assert lines[2].split() == ["60.0", "60.0", "write", "(asyncio/t.py:3)"]
    assert lines[3].split() == ["40.0", "40.0", "parse", "(adapters/yach.py:5)"]
