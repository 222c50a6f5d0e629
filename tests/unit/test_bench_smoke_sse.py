"""bench/bench_sse.py runs: its quick mode, end to end, with no timing asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_sse.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sse", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sse"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_and_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "RESULTS.md"
    assert load_bench().main(["--quick", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "chatbridge" in out and "httpx-sse layer" in out and "× layer" in out
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "## SSE parsing" in text and "--quick" in text and "| all fixtures |" in text


def test_quick_run_records_nothing_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    real_results = BENCH.parent / "RESULTS.md"
    before = real_results.read_bytes() if real_results.exists() else None
    assert load_bench().main(["--quick"]) == 0
    after = real_results.read_bytes() if real_results.exists() else None
    assert before == after
    assert "appended" not in capsys.readouterr().out
