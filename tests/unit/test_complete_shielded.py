"""`complete_shielded`: the shielded work ends before the caller's cancellation is raised
(with `asyncio.shield` alone, the caller's clean-up could overtake it)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.tasks import complete_shielded


async def test_a_cancelled_caller_raises_only_once_the_work_has_ended() -> None:
    steps: list[str] = []
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(0.05)
        steps.append("work ended")

    async def caller() -> None:
        try:
            await complete_shielded(work())
        except asyncio.CancelledError:
            steps.append("caller cancelled")
            raise

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()  # cancelled again while it waits: still the work ends first
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["work ended", "caller cancelled"]


async def test_without_cancellation_it_is_the_work_result_or_error() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def failing() -> None:
        raise ValueError("refused")

    assert await complete_shielded(answer()) == 42
    with pytest.raises(ValueError, match="refused"):
        await complete_shielded(failing())


async def test_work_cancelled_itself_is_a_cancellation_of_the_caller() -> None:
    async def work() -> None:
        current = asyncio.current_task()
        assert current is not None
        current.cancel()
        await asyncio.sleep(1)

    with pytest.raises(asyncio.CancelledError):
        await complete_shielded(work())
