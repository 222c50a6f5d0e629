"""The platform delivers the same webhook again (new header timestamp each time): stored
and answered once (SPEC §4). Replies go through the custom robot URL, which — unlike the
app API — does not deduplicate, so a second answer would show."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, signed_headers

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeYach, FakeOpenAI]]:
    yach, upstream = await FakeYach().start(), await FakeOpenAI().start()
    try:
        yield yach, upstream
    finally:
        await yach.close()
        await upstream.close()


async def _settle(yach: FakeYach, upstream: FakeOpenAI, replies: int) -> None:
    """Wait for `replies` replies, then a little more: a duplicate would show by then."""
    deadline = time.monotonic() + 10
    while len(yach.shown) < replies and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)


async def test_same_webhook_three_times_is_answered_once(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, fakes: tuple[FakeYach, FakeOpenAI]
) -> None:
    yach, upstream = fakes
    payload = group_message("how many times?", msg_id="msg-dup-1")
    async with running_bridge(
        bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    ) as b:
        statuses = []
        for delay_ms in (0, 1500, 3000):  # a new header timestamp on every delivery
            statuses.append(
                await b.post(
                    payload, headers=signed_headers(now_ms=int(time.time() * 1000) + delay_ms)
                )
            )
            await asyncio.sleep(0.1)
        await _settle(yach, upstream, 1)
    assert [status for status, _ in statuses] == [200, 200, 200]
    assert yach.texts() == ["You said: how many times?. (history: 0 messages)"]
    assert len(upstream.bodies) == 1
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0


async def test_concurrent_deliveries_are_stored_once(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, fakes: tuple[FakeYach, FakeOpenAI]
) -> None:
    """Three deliveries in the same event-loop tick share one group commit: SET NX decides."""
    yach, upstream = fakes
    payload = group_message("all at once", msg_id="msg-dup-2")
    async with running_bridge(
        bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    ) as b:
        results = await asyncio.gather(*(b.post(payload) for _ in range(3)))
        await _settle(yach, upstream, 1)
    assert [status for status, _ in results] == [200, 200, 200]
    assert len(yach.shown) == 1
    assert len(upstream.bodies) == 1


async def test_without_message_id_sender_conversation_createat_and_text_dedupe(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, fakes: tuple[FakeYach, FakeOpenAI]
) -> None:
    yach, upstream = fakes
    with_created = group_message("no id here", createAt=1767225600123)
    del with_created["msgId"]
    without_created = group_message("no id, no time")
    del without_created["msgId"]
    async with running_bridge(
        bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    ) as b:
        for _ in range(3):
            assert (await b.post(with_created))[0] == 200
        await _settle(yach, upstream, 1)
        assert len(yach.shown) == 1
        # Without createAt either, a message cannot be told from a new one: each is answered.
        for _ in range(2):
            assert (await b.post(without_created))[0] == 200
        await _settle(yach, upstream, 3)
    assert yach.texts().count("You said: no id here. (history: 0 messages)") == 1
    assert sum("no id, no time" in text for text in yach.texts()) == 2


async def test_a_delivery_after_the_answer_was_acknowledged_is_not_answered_again(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, fakes: tuple[FakeYach, FakeOpenAI]
) -> None:
    """The platform retries late (its first delivery timed out on its side): the entry is
    gone from the inbox by then, the message is still known."""
    yach, upstream = fakes
    payload = group_message("late retry", msg_id="msg-dup-3")
    keys = Keys(bot_id)
    async with running_bridge(
        bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    ) as b:
        assert (await b.post(payload))[0] == 200
        await _settle(yach, upstream, 1)
        assert await redis_client.xlen(keys.inbox) == 0  # answered and acknowledged
        assert (await b.post(payload))[0] == 200
        assert await redis_client.xlen(keys.inbox) == 0  # not stored again
        await _settle(yach, upstream, 1)
    assert yach.texts() == ["You said: late retry. (history: 0 messages)"]
    assert len(upstream.bodies) == 1


async def test_a_message_is_remembered_for_24_hours(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, fakes: tuple[FakeYach, FakeOpenAI]
) -> None:
    """"The same message delivered twice … within 24 h is acknowledged and answered once":
    what tells it again is kept that long (and no longer: a day's ids, not every id ever)."""
    yach, upstream = fakes
    keys = Keys(bot_id)
    with_created = group_message("timed", createAt=1767225600123)
    del with_created["msgId"]
    async with running_bridge(
        bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
    ) as b:
        assert (await b.post(group_message("by id", msg_id="msg-day")))[0] == 200
        assert (await b.post(with_created))[0] == 200
        await _settle(yach, upstream, 2)
    remembered = [key async for key in redis_client.scan_iter(match=keys.dedupe("*"))]
    assert len(remembered) == 2 and keys.dedupe("id:msg-day").encode() in remembered
    for key in remembered:
        assert 86400 - 60 <= await redis_client.ttl(key) <= 86400
