"""`_unless_stopped` (bridge/cli.py): a start given up at Ctrl-C or SIGTERM ends at once, even
when the start swallows the cancellation, as Python 3.11's `asyncio.wait_for` does when the
write it wraps (redis-py sends each command under one) has just completed."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from bridge.cli import _unless_stopped


async def _swallows_the_first_cancel(then: BaseException | None = None) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # swallowed, as `wait_for` does
        await asyncio.sleep(30)  # a Redis that accepts and never answers
    await asyncio.sleep(30)  # the next read of the same silent Redis
    if then is not None:
        raise then


@pytest.mark.parametrize("then", [None, RuntimeError("Redis does not answer")])
async def test_a_stopped_start_that_swallows_a_cancel_still_ends_at_once(
    then: BaseException | None,
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    began = time.monotonic()
    await asyncio.wait_for(_unless_stopped(_swallows_the_first_cancel(then), stop), 5)
    assert time.monotonic() - began < 2  # cancelled again until it took, not after 30 s


async def test_a_start_that_ends_first_gives_its_failure() -> None:
    async def fails() -> None:
        raise RuntimeError("no such host")

    with pytest.raises(RuntimeError, match="no such host"):
        await _unless_stopped(fails(), asyncio.Event())
