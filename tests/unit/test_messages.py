"""The message catalogue's formatting of quantities people read (`/status`)."""

from __future__ import annotations

import pytest

from bridge.messages import Catalogue


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0 min"), (61, "1 min"), (3 * 3600 + 5, "3 h"), (2 * 86400, "2 d"),
    (-30, "0 min"),  # made by a host whose clock runs ahead of this one's: not "-1 min"
])  # fmt: skip
def test_a_sessions_age(seconds: float, shown: str) -> None:
    assert Catalogue("en").age(seconds) == shown
