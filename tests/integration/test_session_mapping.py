"""The session's conversation mapping through the bridge (SPEC §5, §7), against the fake
Dify: the reference is saved as soon as the upstream reveals it — kept when that turn then
fails, and continued by the next turn — and it belongs to its upstream: after a change of
BRIDGE_UPSTREAM the conversation starts afresh."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.dify import CONVERSATION_ID, PATH, DifyFake, chatflow, failing, render
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, running_bridge, wait_until

SESSION = "yach:g:g1:u:u1"  # of `group_message`'s sender and group


async def _answered(redis: aioredis.Redis, keys: Keys, yach: FakeYach, shown: int) -> None:
    """`shown` messages are in the group and every entry is acknowledged."""
    await wait_until(lambda: len(yach.shown) >= shown)
    for _ in range(250):
        if await redis.xlen(keys.inbox) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("an entry is still pending")


async def _session(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    raw = await redis.hgetall(keys.session(SESSION))
    return {key.decode(): value.decode() for key, value in raw.items()}


async def test_a_conversation_learnt_in_a_failed_turn_is_continued_by_the_next(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    keys = Keys(bot_id)
    async with DifyFake() as dify, running_bridge(
        bridge_env(redis_url, bot_id, yach, **dify.env())
    ) as bridge:
        dify.stream = render(failing())  # the conversation id, some text, then an error
        assert (await bridge.post(group_message("first")))[0] == 200
        await _answered(redis_client, keys, yach, 1)
        assert json.loads((await _session(redis_client, keys))["conversation"]) == {
            "conversation_id": CONVERSATION_ID
        }
        shown = len(yach.shown)
        dify.stream = render(chatflow())
        assert (await bridge.post(group_message("second")))[0] == 200
        await _answered(redis_client, keys, yach, shown + 1)
    assert [r.json()["conversation_id"] for r in dify.server.on(PATH)] == ["", CONVERSATION_ID]
    # Only the turn that completed is counted as one.
    assert (await _session(redis_client, keys))["turns"] == "1"


async def test_a_change_of_upstream_starts_a_fresh_conversation(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """The session was Coze's (whose reference is a `conversation_id` too): Dify must not be
    handed it."""
    keys = Keys(bot_id)
    coze = {"upstream": "coze", "conversation": json.dumps({"conversation_id": "coze-7"}),
            "created_at": "1", "last_active": "1", "turns": "3"}  # fmt: skip
    await redis_client.hset(keys.session(SESSION), mapping=coze)
    async with DifyFake() as dify, running_bridge(
        bridge_env(redis_url, bot_id, yach, **dify.env())
    ) as bridge:
        assert (await bridge.post(group_message("hello")))[0] == 200
        await _answered(redis_client, keys, yach, 1)
    assert [r.json()["conversation_id"] for r in dify.server.on(PATH)] == [""]
    session = await _session(redis_client, keys)
    assert session["upstream"] == "dify"
    assert json.loads(session["conversation"]) == {"conversation_id": CONVERSATION_ID}
