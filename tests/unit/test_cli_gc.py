"""The daemon tunes the garbage collector once it has started (bridge/cli.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from bridge.cli import YOUNG_COLLECTION_THRESHOLD, collect_less_often


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored")
def test_startup_objects_frozen_young_collections_rarer() -> None:
    _, older, oldest = gc.get_threshold()
    collect_less_often()
    assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 0
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1  # cycles are still collected
