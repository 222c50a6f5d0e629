"""A turn that took its session's lock but waits for a turn slot (BRIDGE_WORKERS busy with
other sessions) has not run: a SIGKILL then costs it no attempt (SPEC §5: waiting never
counts as an attempt and never dead-letters a message that has not run)."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_acknowledged, wait_for


def one_slot_one_attempt(
    redis_url: str, bot_id: str, yach: FakeYach, upstream_url: str
) -> dict[str, str]:
    """One turn slot, one attempt per message: an attempt lost to waiting dead-letters it."""
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1", BRIDGE_WORKERS="1",
        BRIDGE_MAX_ATTEMPTS="1", BRIDGE_THINKING_NOTICE_S="0",
    )  # fmt: skip


async def test_a_turn_waiting_for_a_turn_slot_loses_no_attempt_to_a_sigkill(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, session: aiohttp.ClientSession,
) -> None:  # fmt: skip
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "slow" else 0.0).start()
    keys = Keys(bot_id)
    env = one_slot_one_attempt(redis_url, bot_id, yach, upstream.base_url)
    try:
        bridge = await spawn(env).start()
        assert await post_webhook(session, bridge.url, group_message("slow")) == 200
        await wait_for(lambda: upstream.started == ["slow"], 10, "the slow turn started")
        other = group_message("waiting", sender="u2", group="g2")
        assert await post_webhook(session, bridge.url, other) == 200
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


async def test_turns_read_together_for_one_free_slot_count_only_the_one_that_runs(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, session: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Turns read together with one turn slot free: only the one that gets the slot counts
    its attempt. Every one of them saw the slot free when it tried to start, and all counted:
    the ones left waiting for the slot lost an attempt to a SIGKILL without having run."""
    slow = {"on": True}
    upstream = await PacedOpenAI(pace=lambda _q: 30.0 if slow["on"] else 0.0).start()
    keys = Keys(bot_id)
    env = one_slot_one_attempt(redis_url, bot_id, yach, upstream.base_url)
    try:
        first = await spawn(env).start()
        assert await post_webhook(session, first.url, group_message("s1")) == 200
        await wait_for(lambda: upstream.started == ["s1"], 10, "s1 started")
        for text, group in (("w2", "g2"), ("w3", "g3")):
            message = group_message(text, sender="u-" + text, group=group)
            assert await post_webhook(session, first.url, message) == 200
        await asyncio.sleep(1.0)  # w2 and w3 read, waiting for the slot
        first.kill()
        # The next process claims all three at once, its one slot free.
        second = await spawn(env).start()
        await wait_for(lambda: len(upstream.started) == 2, 15, "one of w2/w3 started")
        await asyncio.sleep(0.5)
        ran = upstream.started[1]
        waiter = "w3" if ran == "w2" else "w2"
        second.kill()
        slow["on"] = False
        await spawn(env).start()
        await wait_for(lambda: f"You said: {waiter}." in " ".join(yach.texts()), 15, "waiter")
        await wait_acknowledged(redis_client, keys.inbox)
    finally:
        await upstream.close()
    assert upstream.started.count(waiter) == 1, upstream.started
