"""`bench/soak.py --quick`: a small soak (two bridge processes, a private Redis, duplicate
deliveries, a SIGKILL, a clean Redis restart) loses, doubles and reorders nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_quick_soak_loses_doubles_and_reorders_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sent"] >= 100 and report["duplicate_deliveries"] > 0, report
    assert (report["kills"], report["redis_restarts"]) == (1, 1), report
    assert report["distinct_replies"] == report["sent"], report
    assert (report["lost"], report["duplicated"], report["out_of_order"], report["busy"]) == (
        0,
        0,
        0,
        0,
    ), report
    assert report["drained_exit_codes"] == [0, 0], report
    assert result.returncode == 0, result.stderr[-3000:]
