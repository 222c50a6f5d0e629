"""A turn cancelled (a drain's deadline, the entry given up) in the moment between its last
piece going out and its record: the answer is whole, and the record — which marks the
journal complete and the last piece sent — still runs. Without it, the redelivered entry's
replay sent that piece again (shown twice through the custom robot URL, which does not
deduplicate) and added a cut-off notice to the whole answer."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from bridge.app import STATE
from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until


async def test_a_turn_cancelled_once_its_answer_went_out_is_still_recorded(
    redis_url: str,
    bot_id: str,
    redis_client: aioredis.Redis,
    yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:
    upstream.first_byte_delay_s = 0.3  # time to find the turn's tasks before it answers
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url))  # robot URL
    async with running_bridge(env) as bridge:
        worker = bridge.server.app[STATE].worker
        assert worker is not None
        assert (await bridge.post(group_message("hello")))[0] == 200
        await wait_until(lambda: any(h.task is not None for h in worker.held.values()))
        (held,) = worker.held.values()
        turn = held.task
        assert turn is not None
        await wait_until(lambda: any(t.get_name().startswith("send-") for t in asyncio.all_tasks()))
        (sender,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("send-")]
        # Registered before the turn awaits its sender: it runs first once the sender ends,
        # and the turn wakes up cancelled, its answer whole and not yet recorded.
        sender.add_done_callback(lambda _: turn.cancel())

        await wait_until(lambda: bool(yach.shown))
        # Claimed again past BRIDGE_CLAIM_IDLE_S (2 s), replayed, acknowledged.
        inbox = Keys(bot_id).inbox
        for _ in range(500):
            if not await redis_client.xlen(inbox):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the cancelled turn's entry was never acknowledged")
    texts = yach.texts()
    assert len(texts) == 1 and "hello" in texts[0], texts
    assert MESSAGES["zh"]["cut_off"] not in "".join(texts)
