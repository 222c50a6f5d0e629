"""A command whose process dies after it took effect, before it was acknowledged (SPEC §5,
§6): its redelivery must not take effect again on what came after it — a `/reset` or a
`/stop` run again would stop the turn of a later question, which is then never answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_acknowledged, wait_for

EN = MESSAGES["en"]
PACE = {"first": 60.0, "second": 5.0}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("command", ["/reset", "/stop"])
async def test_a_command_redelivered_after_a_sigkill_does_not_stop_the_next_turn(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession, command: str,
) -> None:  # fmt: skip
    """The turn "first" runs in one process, "second" waits for it in another. The
    command is read by the first process: it stops "first" (and, for `/reset`, forgets the
    conversation), "second" starts in the other process; the command's own reply cannot
    get through, and the process dies. The command is claimed by the other process while
    "second" runs: it must not stop "second", which it was never meant for."""
    upstream = await PacedOpenAI(pace=lambda q: PACE.get(q, 0.0)).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1", BRIDGE_THINKING_NOTICE_S="0",
    )  # fmt: skip
    try:
        reader = await spawn(env, "reader").start()
        other = await spawn(env, "other").start()
        assert await post_webhook(http, reader.url, group_message("first")) == 200
        await wait_for(lambda: upstream.started == ["first"], 10, "the first turn started")
        assert await post_webhook(http, other.url, group_message("second")) == 200
        await asyncio.sleep(0.3)  # held by the other process, waiting behind "first"
        yach.fail_next(500, times=1000)  # the command's reply does not get through
        assert await post_webhook(http, reader.url, group_message(command)) == 200
        await wait_for(lambda: "second" in upstream.started, 10, "the second turn started")
        await wait_for(lambda: reader.events("turn_stopped"), 5, "the first turn stopped")
        reader.kill()
        yach.failures.clear()
        await wait_for(
            lambda: len(yach.shown) >= 2 or other.events("turn_stopped"),
            20,
            "the command's reply and the answer",
        )
        await asyncio.sleep(1.0)
        await wait_acknowledged(redis_client, keys.inbox)
        await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    reply = EN["reset_done"] if command == "/reset" else EN["stopped"]
    assert not other.events("turn_stopped"), "the redelivered command stopped the next turn"
    assert sorted(yach.texts()) == sorted([reply, "You said: second. (history: 0 messages)"])
    assert upstream.started == ["first", "second"]
