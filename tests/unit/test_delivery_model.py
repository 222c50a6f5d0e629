"""The Promela model of the delivery protocol (docs/delivery.pml), checked exhaustively by
spin, under crashes and stalls and, in a second search, under the IM's refusal of a send and
stalls: no assertion fails (order per session, one answer per message, every stored message
answered, never "dropped" under a whole answer the journal knew complete) and no invalid end
state; and each variant that drops one safeguard is caught. Skipped when spin or a C
compiler is not installed (Debian/Ubuntu: `apt-get install spin`).
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


# One crash and one stall (the defaults); one refusal and one stall (both with a crash: 240
# million states, minutes).
BOUNDS = [(), ("REFUSALS=1", "CRASHES=0")]


@pytest.mark.parametrize("bounds", BOUNDS, ids=["crash", "refusal"])
def test_the_protocol_holds_its_safety_properties_exhaustively(
    tmp_path: Path, bounds: tuple[str, ...]
) -> None:
    report = _check(tmp_path, *bounds)
    assert "errors: 0" in report, report
    assert "Search not completed" not in report, report
    assert "assertion violations\t+" in report and "invalid end states\t+" in report, report


@pytest.mark.parametrize(
    "variant",
    [
        ("NO_FENCE",),
        ("NO_JOURNAL",),
        ("NO_HEAD",),
        ("ACK_FIRST",),
        ("NOTICE_UNFENCED",),
        ("DEAD_LETTER_COMPLETE",),
        ("STICKY_REFUSAL", *BOUNDS[1]),
    ],
    ids=lambda variant: variant[0],
)
def test_dropping_a_safeguard_is_caught(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """The model has teeth: without the lock's fence on the journal, without the journal,
    without the queue's head rule, acknowledging first, sending the cut-off notice of a
    replay without journalling it under the lock, dead-lettering a complete journal past the
    limit, or keeping every refused send in the journal for good (the code before the
    refusal was made the first send's and a replay's resend cleared it), spin finds a
    violation."""
    report = _check(tmp_path, *variant)
    assert "assertion violated" in report, report
