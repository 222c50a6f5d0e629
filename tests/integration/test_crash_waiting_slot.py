"""A turn that took its session's lock but waits for a turn slot (BRIDGE_WORKERS busy with
other sessions) has not run: a SIGKILL then costs it no attempt (SPEC §5: waiting never
counts as an attempt and never dead-letters a message that has not run)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_acknowledged, wait_for


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_turn_waiting_for_a_turn_slot_loses_no_attempt_to_a_sigkill(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "slow" else 0.0).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1", BRIDGE_WORKERS="1",
        BRIDGE_MAX_ATTEMPTS="1", BRIDGE_THINKING_NOTICE_S="0",
    )  # fmt: skip
    try:
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("slow")) == 200
        await wait_for(lambda: upstream.started == ["slow"], 10, "the slow turn started")
        other = group_message("waiting", sender="u2", group="g2")
        assert await post_webhook(http, bridge.url, other) == 200
        await asyncio.sleep(1.0)  # read, its session's lock taken: waits for the slot
        assert upstream.started == ["slow"]
        bridge.kill()
        await spawn(env).start()
        await wait_for(lambda: len(yach.shown) >= 2, 15, "two replies")
        await wait_acknowledged(redis_client, keys.inbox)
    finally:
        await upstream.close()
    texts = yach.texts()
    assert "You said: waiting. (history: 0 messages)" in texts, texts
    assert upstream.started == ["slow", "waiting"]
