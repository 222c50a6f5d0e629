"""The commands `check` and the start verify a Redis user may run: every one of the scripts'."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.access import needed_commands

CODE = Path(__file__).resolve().parents[2] / "bridge"


def test_every_command_of_the_scripts_is_verified() -> None:
    """Redis checks each `redis.call` of a script against the user's ACL as it runs it: a
    command a script starts to call must be verified too, or a user missing it passes."""
    called = {
        match.upper()
        for path in CODE.glob("*.py")
        for match in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", path.read_text())
    }
    assert len(called) > 30  # the scripts were found
    verified = {call[0] for call in needed_commands("k", "c")}
    assert called <= verified, sorted(called - verified)
