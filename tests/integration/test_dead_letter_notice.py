"""The dead-letter notice reaches the user even when the IM is down as the entry is
dead-lettered (SPEC §6 "the user is told", §8 "never silence"): the notice that cannot be
sent leaves the entry pending, and its next delivery sends the notice again — only the
notice, under the same message_id, once — without running the turn again. Through the
custom robot URL, which does not deduplicate, a notice sent twice would show twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

EN = MESSAGES["en"]
SEND_TRIES = 5  # of one message by the outbox, before the entry is left pending
SEND_BACKOFF_S = 0.01  # the outbox's first wait after a failed send (the tests count tries)
APP_ROUTE = {"BRIDGE_YACH_APP_KEY": APP_KEY, "BRIDGE_YACH_APP_SECRET": APP_SECRET}


def _env(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
         **extra: str) -> dict[str, str]:  # fmt: skip
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url), BRIDGE_LANG="en",
        BRIDGE_CLAIM_IDLE_S="1", BRIDGE_MAX_ATTEMPTS="1", **extra,
    )  # fmt: skip


@pytest.mark.parametrize("route", ["robot", "app"])
async def test_a_dead_letter_notice_the_im_refused_is_sent_once_it_is_back(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, route: str
) -> None:
    """BRIDGE_MAX_ATTEMPTS=1. The IM refuses every try of the answer (the one attempt) and
    of the dead-letter notice at the redelivery; then it is back. The notice shows once,
    the upstream was asked once, the entry is in the dead letters and acknowledged; the
    session's next question is answered after it."""
    upstream = await FakeOpenAI().start()
    keys = Keys(bot_id)
    yach.fail_next(500, times=2 * SEND_TRIES)  # the answer's tries, then the notice's
    env = _env(redis_url, bot_id, yach, upstream, **(APP_ROUTE if route == "app" else {}))
    try:
        async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
            assert (await bridge.post(group_message("never delivered")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1, timeout=20)
            await asyncio.sleep(1.5)  # past BRIDGE_CLAIM_IDLE_S: nothing more comes
            assert yach.texts() == [EN["dead_letter"]]
            assert await redis_client.xlen(keys.inbox) == 0
            assert (await bridge.post(group_message("and now?")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 2, timeout=10)
    finally:
        await upstream.close()
    assert {shown.route for shown in yach.shown} == {route}
    assert yach.texts() == [EN["dead_letter"], "You said: and now?. (history: 0 messages)"]
    assert [body["messages"][-1]["content"] for body in upstream.bodies] == [
        "never delivered", "and now?"
    ]  # fmt: skip
    dead = await redis_client.xrange(keys.dead)
    assert [fields[b"reason"] for _, fields in dead] == [b"1 attempts"]


async def test_a_commands_dead_letter_notice_the_im_refused_is_sent_once_it_is_back(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """The same for a command, whose deliveries count: its reply never got through, and
    neither did the dead-letter notice of its second delivery."""
    upstream = await FakeOpenAI().start()
    keys = Keys(bot_id)
    yach.fail_next(500, times=2 * SEND_TRIES)
    env = _env(redis_url, bot_id, yach, upstream)
    help_command: dict[str, Any] = group_message("/help")
    try:
        async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
            assert (await bridge.post(help_command))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1, timeout=20)
            await asyncio.sleep(1.5)
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()
    assert yach.texts() == [EN["dead_letter"]]
    assert await redis_client.xlen(keys.dead) == 1


@pytest.mark.parametrize("kind", ["turn", "command"])
async def test_a_dead_letter_notice_the_im_never_takes_does_not_hold_the_entry_for_ever(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, kind: str
) -> None:
    """An IM that refuses every send to the group for good (the robot removed, its token
    revoked): the notice is tried again on BRIDGE_MAX_ATTEMPTS more deliveries, then the
    entry goes to the dead letters all the same (SPEC §6), logged at error level, instead of
    being redelivered for ever with the session's later questions stuck behind it."""
    upstream = await FakeOpenAI().start()
    keys = Keys(bot_id)
    yach.fail_next(500, times=10**6)
    env = _env(redis_url, bot_id, yach, upstream)
    try:
        async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
            text = "never delivered" if kind == "turn" else "/help"
            assert (await bridge.post(group_message(text)))[0] == 200
            for _ in range(100):  # 20 s
                if await redis_client.xlen(keys.dead):
                    break
                await asyncio.sleep(0.2)
            assert await redis_client.xlen(keys.dead) == 1
            assert await redis_client.xlen(keys.inbox) == 0
            yach.failures.clear()  # the IM is back: the session goes on
            assert (await bridge.post(group_message("and now?")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1, timeout=10)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: and now?. (history: 0 messages)"]
    dead = await redis_client.xrange(keys.dead)
    assert [fields[b"reason"] for _, fields in dead] == [b"1 attempts"]
