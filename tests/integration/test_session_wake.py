"""The `wake` a finished turn publishes for its session's next turn (on the bot's control
channel, which every process of the bot reads): sent when another entry waits for the
session, and only then."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until


@pytest.fixture
async def control(
    redis_client: aioredis.Redis, keys: Keys
) -> AsyncIterator[aioredis.client.PubSub]:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.control)
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # confirmed: listening
    try:
        yield pubsub
    finally:
        await pubsub.aclose()


async def wakes(pubsub: aioredis.client.PubSub) -> list[str]:
    """The sessions of the wake messages published since the last call."""
    found = []
    while message := await pubsub.get_message(timeout=0.2):
        command = json.loads(message["data"])
        if command.get("type") == "wake":
            found.append(command["session"])
    return found


async def test_a_turn_wakes_the_next_one_of_its_session_and_only_when_one_waits(
    redis_url: str,
    bot_id: str,
    yach: FakeYach,
    upstream: FakeOpenAI,
    control: aioredis.client.PubSub,
) -> None:
    upstream.first_byte_delay_s = 0.3  # the second question comes while the first runs
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    async with running_bridge(env) as bridge:
        assert (await bridge.post(group_message("first")))[0] == 200
        await wait_until(lambda: len(upstream.bodies) == 1)
        assert (await bridge.post(group_message("second")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 2)
        # The first turn ended with the second waiting: woken. The second ended alone.
        assert await wakes(control) == ["yach:g:g1:u:u1"]

        assert (await bridge.post(group_message("third", group="g2")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 3)
        assert await wakes(control) == []
        worker = bridge.bridge.worker
        assert worker is not None
        await wait_until(lambda: not worker.held)
        assert not worker._wakers  # kept only while a turn waits
    assert [("first" in text, "second" in text, "third" in text) for text in yach.texts()] == [
        (True, False, False), (False, True, False), (False, False, True)
    ]


async def test_a_waiting_turn_given_up_in_the_tick_its_wake_comes_stops_there(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI
) -> None:
    """A turn waiting for its session is given up (its entry claimed by another process) with
    one cancel. Landing in the very tick its wake completed the wait, that cancel was
    swallowed by Python 3.11's `wait_for`: the lost turn went on waiting, and then ran."""
    upstream.first_byte_delay_s = 3.0  # the first turn holds the session meanwhile
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    async with running_bridge(env) as bridge:
        worker = bridge.bridge.worker
        assert worker is not None
        assert (await bridge.post(group_message("first")))[0] == 200
        await wait_until(lambda: len(upstream.bodies) == 1)
        assert (await bridge.post(group_message("second")))[0] == 200
        await wait_until(lambda: any(h.queued for h in worker.held.values()))
        second = next(h for h in worker.held.values() if h.queued)
        assert second.task is not None
        # The wake's wait completes first (its task runs in the next tick), then the cancel:
        (waker,) = worker._wakers[second.entry.chat_session_id]
        waker.set()
        asyncio.get_running_loop().call_soon(worker._lose, second.entry.entry_id, "test")
        await wait_until(second.task.done, timeout=1.5)
        assert len(upstream.bodies) == 1
        assert not worker._wakers  # the given-up waiter let go
