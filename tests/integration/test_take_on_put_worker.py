"""The worker's side of the put that takes what it stores: a drain that begins while such a
put is on its way, and an entry of the batch that cannot be taken — on a real Redis, through
the bridge's own webhook route and worker."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from bridge.inbox import EntryKind
from bridge.interfaces import InboundMessage, Sender
from bridge.store import GROUP, Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import PacedOpenAI


def message(msg_id: str, group: str) -> InboundMessage:
    return InboundMessage(
        im_msg_id=msg_id,
        text=f"question {msg_id}",
        sender=Sender("u1", "Tester", "W001"),
        conversation_id=group,
        is_direct=False,
        dedupe_key="id:" + msg_id,
    )


@pytest.fixture
def env(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI) -> dict[str, str]:
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url), BRIDGE_CLAIM_IDLE_S="60"
    )


async def test_a_turn_a_put_took_while_the_drain_began_is_left_claimable_at_once(
    env: dict[str, str], bot_id: str, upstream: FakeOpenAI, redis_client: aioredis.Redis
) -> None:
    async with running_bridge(env) as running:
        await redis_client.execute_command("CLIENT", "PAUSE", 500, "WRITE")  # the put waits
        post = asyncio.create_task(running.post(group_message("late question")))
        await asyncio.sleep(0.1)  # its script is in Redis, held
        drain = asyncio.create_task(running.bridge.worker.drain(5))  # SIGTERM now
        status, _ = await asyncio.wait_for(post, 5)
        await asyncio.wait_for(drain, 10)
        assert status == 200  # stored: it was on its way before the drain
    [pending] = await redis_client.xpending_range(Keys(bot_id).inbox, GROUP, "-", "+", 10)
    # not run here, and released as the drain does with every turn it did not start: another
    # process claims it at once, not after BRIDGE_CLAIM_IDLE_S
    assert pending["time_since_delivered"] > 60_000
    assert upstream.bodies == []



async def test_a_put_made_once_the_drain_began_takes_nothing(
    env: dict[str, str], bot_id: str, upstream: FakeOpenAI, redis_client: aioredis.Redis
) -> None:
    """A webhook whose put comes after the drain began (the draining process answers 503
    only once it has set its own flag) is stored and left new, for any process to read at
    once: not taken here, where it could not run, at the cost of a counted attempt."""
    keys = Keys(bot_id)
    async with running_bridge(env) as running:
        worker = running.bridge.worker
        assert worker is not None
        await wait_until(lambda: worker.healthy)  # the read loop made the group, and read
        await worker.drain(5)
        status, _ = await running.post(group_message("after the drain began"))
        assert status == 200
        [(entry_id, _)] = await redis_client.xrange(keys.inbox)
        assert await redis_client.xpending_range(keys.inbox, GROUP, "-", "+", 10) == []
        assert not await redis_client.exists(keys.journal(entry_id.decode()))
        assert await redis_client.llen(keys.queue("yach:g:g1:u:u1")) == 1
    assert upstream.bodies == []


async def test_an_entry_that_cannot_be_taken_does_not_hold_up_the_others_of_its_batch(
    env: dict[str, str], bot_id: str, yach: FakeYach, redis_client: aioredis.Redis
) -> None:
    await redis_client.rpush(Keys(bot_id).history("sx"), '{"unexpected": 1}')  # a bad row
    async with running_bridge(env) as running:
        inbox = running.bridge.inbox
        await asyncio.gather(
            inbox.put(message("x1", "gx"), EntryKind.TURN, "sx"),
            inbox.put(message("y1", "gy"), EntryKind.TURN, "sy"),
        )
        # session sy has nothing wrong with it: its turn is answered at once
        await wait_until(lambda: any("question y1" in text for text in yach.texts()), timeout=5)


async def test_the_put_script_is_loaded_before_the_first_webhook(
    env: dict[str, str], redis_client: aioredis.Redis
) -> None:
    await redis_client.script_flush()  # a Redis that never saw this version's script
    async with running_bridge(env) as running:
        sha = running.bridge.inbox._put_script.sha
        for _ in range(100):
            if (await redis_client.script_exists(sha))[0]:
                break
            await asyncio.sleep(0.02)
        assert (await redis_client.script_exists(sha))[0]


async def test_a_put_takes_no_more_than_its_process_can_start_at_once(
    redis_url: str, bot_id: str, yach: FakeYach
) -> None:
    """One turn slot, one turn running: the next question is left in the stream for the
    read loops of every process, not held here behind the running one."""
    upstream = await PacedOpenAI(pace=lambda _q: 1.0).start()
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), BRIDGE_WORKERS="1")
    try:
        async with running_bridge(env) as running:
            await running.post(group_message("first", group="g1"))
            await wait_until(lambda: len(upstream.started) == 1, timeout=5)
            take = running.bridge.inbox._take_on_put
            assert take is not None and take.room() == 0
            await running.post(group_message("second", group="g2"))
            await wait_until(lambda: len(yach.texts()) == 2, timeout=10)  # read, and run next
            # its slot is free once the turn has also saved and acknowledged, just after
            await wait_until(lambda: take.room() == 1, timeout=5)
    finally:
        await upstream.close()
