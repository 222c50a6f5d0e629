"""The Promela model of the delivery protocol (docs/delivery.pml), checked exhaustively by
spin: no assertion fails (order per session, one answer per message, every stored message
answered) and no invalid end state; and each variant that drops one safeguard is caught.
Skipped when spin or a C compiler is not installed (Debian/Ubuntu: `apt-get install spin`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2] / "docs" / "delivery.pml"
CC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(
    shutil.which("spin") is None or CC is None, reason="spin and a C compiler are needed"
)


def _check(directory: Path, *defines: str, timeout: float = 100) -> str:
    """Generate the verifier, compile it, run an exhaustive safety search; its report."""
    model = directory / MODEL.name
    shutil.copy(MODEL, model)
    flags = [f"-D{define}" for define in defines]
    subprocess.run(["spin", *flags, "-a", model.name], cwd=directory, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    assert CC is not None
    subprocess.run([CC, "-O2", "-DSAFETY", "-DCOLLAPSE", "-o", "pan", "pan.c"], cwd=directory,
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    result = subprocess.run(["./pan", "-m100000"], cwd=directory, capture_output=True,
                            text=True, timeout=timeout, check=False)  # fmt: skip
    return result.stdout + result.stderr


def test_the_protocol_holds_its_safety_properties_exhaustively(tmp_path: Path) -> None:
    report = _check(tmp_path)
    assert "errors: 0" in report, report
    assert "Search not completed" not in report, report
    assert "assertion violations\t+" in report and "invalid end states\t+" in report, report


@pytest.mark.parametrize(
    "variant", ["NO_FENCE", "NO_JOURNAL", "NO_HEAD", "ACK_FIRST", "NOTICE_UNFENCED"]
)
def test_dropping_a_safeguard_is_caught(tmp_path: Path, variant: str) -> None:
    """The model has teeth: without the lock's fence on the journal, without the journal,
    without the queue's head rule, acknowledging first, or sending the cut-off notice of a
    replay without journalling it under the lock, spin finds a violation."""
    report = _check(tmp_path, variant)
    assert "assertion violated" in report, report
