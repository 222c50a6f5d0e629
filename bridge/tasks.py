"""Background tasks that are tracked, logged and cancelled for sure.

`cancel_and_wait` cancels again until the task has finished: redis-py can swallow a
cancellation that lands inside one of its internal timeouts (redis/redis-py#2028, #2551),
which would otherwise leave a loop or a stopped turn running for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import structlog

__all__ = ["TaskGroup", "cancel_and_wait", "cancel_requested", "complete_shielded"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
_RECANCEL_S = 0.2


def cancel_requested() -> bool:
    """Whether the running task was asked to stop. redis-py can swallow a cancellation: a
    cancelled blocking command (XREADGROUP BLOCK) sometimes returns a reply instead of
    raising (redis/redis-py#2028), so a loop around one must ask, or it never ends."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, within_s: float | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel tasks and wait until every one has finished, cancelling again as needed; with
    `within_s`, for that long at most. The tasks still running then are returned (work they
    shield from cancellation, `complete_shielded`, may outlast any number of cancels)."""
    pending = {task for task in tasks if not task.done()}
    give_up = None if within_s is None else time.monotonic() + within_s
    while pending:
        for task in pending:
            task.cancel()
        wait_s = _RECANCEL_S if give_up is None else min(_RECANCEL_S, give_up - time.monotonic())
        if wait_s <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=wait_s)
    return pending


async def complete_shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end though the caller be cancelled meanwhile, and raise the caller's
    cancellation only then. (`asyncio.shield` alone raises at once: what the caller does on
    cancellation — give a session lock up — could overtake the work it shielded.)"""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class TaskGroup:
    """Strong references to background tasks; a failure is logged with the task's name."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), exc_info=task.exception())

    def named(self, name: str) -> list[asyncio.Task[Any]]:
        return [task for task in self._tasks if task.get_name() == name]

    async def cancel(self, tasks: Iterable[asyncio.Task[Any]] | None = None) -> None:
        await cancel_and_wait(list(self._tasks) if tasks is None else tasks)

    def __len__(self) -> int:
        return len(self._tasks)
