"""A turn left with reasoning and no answer (Dify's moderation replaced the answer with
nothing) whose quoted reasoning went to the sender before the end, and waits there for the
send budget: the reasoning shows, once, and no "empty answer" notice after it — as when the
reasoning is still queued at the end (SPEC §4)."""

from __future__ import annotations

import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.dify import DifyFake, end, event, render
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, running_bridge, wait_until
from tests.procs import wait_acknowledged

EN = MESSAGES["en"]
BUDGET_S = 3  # one send per window: the quoted reasoning waits for it


async def test_reasoning_held_for_the_budget_gets_no_empty_answer_notice(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis
) -> None:
    fake = await DifyFake.start(seed=3)
    fake.delay_s = 0.05  # the flushed reasoning reaches the sender before the replacement
    fake.script.then(fake.sse(render([
        event("message", answer="<think>Let me think.</think>\n\nDraft answer"),
        event("message_replace", answer=""),
        end(),
    ])))  # fmt: skip
    env = bridge_env(redis_url, bot_id, yach, **fake.env(), BRIDGE_LANG="en",
                     BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="1",
                     BRIDGE_FLUSH_MAX_WAIT_S="0", BRIDGE_SHOW_REASONING="quote",
                     BRIDGE_YACH_SEND_RATE=f"1/{BUDGET_S}")  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            seconds, micros = await redis_client.time()  # the budget spent, by the clock it uses
            await redis_client.zadd(Keys(bot_id).send_budget_group,
                                    {"spent": seconds * 1000 + micros // 1000})  # fmt: skip
            assert (await bridge.post(group_message("think")))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1)
            await wait_acknowledged(redis_client, Keys(bot_id).inbox, timeout=10)
    finally:
        await fake.close()
    assert EN["empty_answer"] not in yach.texts()
    assert [text.strip() for text in yach.texts()] == ["> Let me think."]
