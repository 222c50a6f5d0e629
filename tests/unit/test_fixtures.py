"""The recordings the tests replay are the workspace's recorded real streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.base import FIXTURES

SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def test_the_recordings_are_there() -> None:
    assert {path.name for path in FIXTURES.glob("*.sse")} >= {
        "aimaster-scenario.sse",
        "hiagent-chat_query.sse",
    }


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/fixtures beside this clone")
def test_the_recordings_equal_the_shared_fixtures() -> None:
    for fixture in SHARED.glob("*.sse"):
        assert (FIXTURES / fixture.name).read_bytes() == fixture.read_bytes(), fixture.name
