"""A process with no room for more turns still reads the commands and notices stored after
them (SPEC §5: never queued behind turns), and with them the turns stored before them. Those
turns wait here for a turn slot: how many it takes in so is bounded, however many commands
come, or one busy process would hold every turn of a burst (and its session locks) while
the other processes idle, and its memory would grow with the burst."""

from __future__ import annotations

import asyncio

import pytest

from bridge import worker as worker_module
from bridge.messages import MESSAGES
from tests.fakes.yach import FakeYach
from tests.harness import running_bridge, wait_until
from tests.integration.test_commands import SlowOpenAI, env, say, slow  # noqa: F401

ZH = MESSAGES["zh"]
SCAN = 4


async def test_commands_among_turns_do_not_take_every_turn_in(
    redis_url: str, bot_id: str, yach: FakeYach, slow: SlowOpenAI,  # noqa: F811
    redis_client: object, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "_UNQUEUED_SCAN", SCAN)
    extra = {"BRIDGE_WORKERS": "1", "BRIDGE_SESSION_QUEUE_MAX": "1", "BRIDGE_DRAIN_TIMEOUT_S": "1"}
    async with running_bridge(env(redis_url, bot_id, yach, slow.base_url, **extra)) as bridge:
        worker = bridge.bridge.worker
        assert worker is not None
        await say(bridge, "tell me a long story")
        await wait_until(lambda: len(yach.shown) >= 1)  # the one turn slot is taken
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, worker._active())
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            for n in range(30):  # other sessions' questions, each followed by a command
                await say(bridge, f"question {n}", sender=f"asker{n}")
                await say(bridge, "/help", sender=f"helper{n}")
            await asyncio.sleep(1.0)
        finally:
            watcher.cancel()
        assert ZH["help"] in yach.texts()  # commands were still read with no room for turns
        # (BRIDGE_WORKERS * 2 + BRIDGE_SESSION_QUEUE_MAX, and at most one scan beyond it)
        assert most <= worker._max_held + SCAN + 1, most
