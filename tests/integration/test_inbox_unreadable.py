"""An inbox row no process of this version can read (written by another version of the
bridge, say) is set aside to the dead letters — and out of its session's queue, or the
turns behind it would wait for it for ever."""

from __future__ import annotations

import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

SESSION = "yach:g:g1"


async def test_an_unreadable_turn_does_not_block_its_session(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:  # fmt: skip
    keys = Keys(bot_id)
    unreadable = await redis_client.xadd(
        keys.inbox, {"m": '{"from": "another version"}', "k": "turn", "s": SESSION}
    )
    await redis_client.rpush(keys.queue(SESSION), unreadable)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_SESSION_SCOPE="group", BRIDGE_CLAIM_IDLE_S="1",
    )  # fmt: skip
    async with running_bridge(env) as bridge:
        assert (await bridge.post(group_message("hello")))[0] == 200
        await wait_until(lambda: len(yach.shown) >= 1, timeout=8)
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
    assert await redis_client.lrange(keys.queue(SESSION), 0, -1) == []
    [dead] = await redis_client.xrange(keys.dead)
    assert dead[1][b"reason"] == b"unreadable"
