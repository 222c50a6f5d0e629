"""SPEC §5: "Changing BRIDGE_UPSTREAM starts fresh conversations". `openai`'s conversation is
the history the bridge keeps: a session that was handed to another upstream and comes back
to `openai` must not be given the turns of its earlier `openai` conversation."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.fakes.dify import DifyFake
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

SESSION_KEY = "chatbridge:{{{bot}}}:session:yach:g:g1:u:u1"


async def test_back_to_openai_after_another_upstream_starts_a_fresh_history(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
    redis_client: aioredis.Redis,
) -> None:
    key = SESSION_KEY.format(bot=bot_id)
    dify = await DifyFake.start(seed=1)
    try:
        envs = [
            bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url)),
            bridge_env(redis_url, bot_id, yach, **dify.env()),
            bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url)),
        ]
        for turn, env in enumerate(envs, start=1):
            async with running_bridge(env) as bridge:
                assert (await bridge.post(group_message(f"turn {turn}")))[0] == 200
                await wait_until(lambda count=turn: len(yach.shown) == count)
                await wait_recorded(redis_client, key, turn)
    finally:
        await dify.close()
    # The first openai conversation is not continued after the change to dify and back.
    assert yach.texts()[0] == "You said: turn 1. (history: 0 messages)"
    assert yach.texts()[2] == "You said: turn 3. (history: 0 messages)"
