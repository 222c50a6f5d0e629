"""SPEC §5: "The session hash holds `upstream`, `conversation` (the upstream's reference as
a JSON object …), `created_at`, `last_active`, `turns`" — every field, whatever the upstream:
also for `openai`, which has no reference of its own (an empty object), after a change of
upstream that dropped the old one, and after a first turn that failed once its reference
was saved (no turn counted yet: 0)."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from tests.fakes.dify import CONVERSATION_ID, DifyFake, failing, render
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import (
    bridge_env,
    group_message,
    openai_env,
    running_bridge,
    wait_recorded,
    wait_until,
)

FIELDS = {"upstream", "conversation", "created_at", "last_active", "turns"}


def _key(bot_id: str) -> str:
    return f"chatbridge:{{{bot_id}}}:session:yach:g:g1:u:u1"


async def _session(redis: aioredis.Redis, key: str) -> dict[str, str]:
    raw = await redis.hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}



async def test_an_openai_session_holds_every_field(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
    redis_client: aioredis.Redis,
) -> None:
    key = _key(bot_id)
    async with running_bridge(bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
                              ) as bridge:
        assert (await bridge.post(group_message("hello")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
        await wait_recorded(redis_client, key, 1)
    state = await _session(redis_client, key)
    assert set(state) >= FIELDS
    assert state["upstream"] == "openai"
    assert json.loads(state["conversation"]) == {}


async def test_a_change_of_upstream_leaves_an_empty_reference_not_an_empty_string(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
    redis_client: aioredis.Redis,
) -> None:
    key = _key(bot_id)
    dify = {"upstream": "dify", "conversation": json.dumps({"conversation_id": "d-1"}),
            "created_at": "1", "last_active": "1", "turns": "2"}  # fmt: skip
    await redis_client.hset(key, mapping=dify)
    async with running_bridge(bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))
                              ) as bridge:
        assert (await bridge.post(group_message("hello")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
        await wait_recorded(redis_client, key, 3)
    state = await _session(redis_client, key)
    assert state["upstream"] == "openai"
    assert json.loads(state["conversation"]) == {}


async def test_a_failed_first_turn_leaves_a_whole_session(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis,
) -> None:
    key = _key(bot_id)
    async with DifyFake() as dify, running_bridge(
        bridge_env(redis_url, bot_id, yach, **dify.env())
    ) as bridge:
        dify.stream = render(failing())  # the conversation id, some text, then an error
        assert (await bridge.post(group_message("first")))[0] == 200
        await wait_until(lambda: len(yach.shown) >= 1)
        for _ in range(250):
            if await redis_client.xlen(f"chatbridge:{{{bot_id}}}:inbox") == 0:
                break
            await asyncio.sleep(0.02)
    state = await _session(redis_client, key)
    assert set(state) >= FIELDS
    assert json.loads(state["conversation"]) == {"conversation_id": CONVERSATION_ID}
    assert state["turns"] == "0"
