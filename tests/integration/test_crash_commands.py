"""A command whose process dies after it took effect, before it was acknowledged (SPEC §5,
§6): its redelivery must not take effect again on what came after it — a `/reset` or a
`/stop` run again would stop the turn of a later question, which is then never answered."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import GROUP, Keys
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


async def test_a_reset_whose_process_died_midway_holds_the_session_no_longer_than_its_redelivery(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """The `/reset` is read by one process while the turn it stops runs in another, frozen
    (SIGSTOP), so the reset is still waiting for that turn to let go when its own process
    is SIGKILLed; the frozen one is killed too. A new process carries the command out again
    and confirms it: the question sent after the `/reset` is answered then, in the new
    conversation. It used to wait for the dead delivery's hold of the session to expire as
    well (BRIDGE_CLAIM_IDLE_S + 10 s after it began): ten seconds more of silence after the
    confirmation that said the reset was done."""
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "stopped" else 0.0).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="3",
    )  # fmt: skip
    # One turn slot and no queue room: the frozen process holds all it may (the turn, and
    # another session's turn waiting for the slot), so it does not swallow the `/reset`.
    full = {**env, "BRIDGE_WORKERS": "1", "BRIDGE_SESSION_QUEUE_MAX": "0"}
    try:
        frozen = await spawn(full, "frozen").start()
        assert await post_webhook(http, frozen.url, group_message("before")) == 200
        await wait_for(lambda: len(yach.shown) == 1, 10, "the first answer")
        await wait_acknowledged(redis_client, keys.inbox)
        assert await post_webhook(http, frozen.url, group_message("stopped")) == 200
        await wait_for(lambda: "stopped" in upstream.started, 10, "the turn to stop started")
        other = group_message("elsewhere", sender="u2", group="g2")
        assert await post_webhook(http, frozen.url, other) == 200
        # The frozen process reads it, and is full; the resetter, started only then, cannot
        # read it first (it did, now and then, and started that turn itself).
        await _wait_pending(redis_client, keys.inbox, 2)
        resetter = await spawn(env, "resetter").start()
        frozen.signal(signal.SIGSTOP)
        assert await post_webhook(http, resetter.url, group_message("/reset")) == 200
        assert await post_webhook(http, resetter.url, group_message("after")) == 200
        await wait_for(lambda: resetter.events("command"), 5, "the reset begun")
        await asyncio.sleep(0.3)  # it waits for the frozen turn to let go
        assert not resetter.events("turn_started")
        resetter.kill()
        frozen.kill()
        await spawn(env, "next").start()
        await wait_for(lambda: EN["reset_done"] in yach.texts(), 15, "the reset confirmed")
        await wait_for(
            lambda: any(text.startswith("You said: after.") for text in yach.texts()),
            4, "the question after the reset answered once the reset was confirmed",
        )  # fmt: skip
        await wait_acknowledged(redis_client, keys.inbox)
        await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    assert sorted(yach.texts()) == sorted([
        "You said: before. (history: 0 messages)", EN["reset_done"],
        "You said: after. (history: 0 messages)", "You said: elsewhere. (history: 0 messages)",
    ])  # fmt: skip
    assert upstream.started.count("stopped") == 1


async def _wait_pending(
    client: aioredis.Redis, inbox: str, count: int, timeout: float = 10
) -> None:
    """Poll until `count` entries of the inbox have been read by a consumer (pending)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.xpending(inbox, GROUP))["pending"] < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {count} entries read")
        await asyncio.sleep(0.05)
