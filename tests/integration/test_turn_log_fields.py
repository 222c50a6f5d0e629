"""Every log line about a turn carries `bot`, `chat_session_id`, `msg_id` and `upstream`
(SPEC §9), also the lines the worker's background loops write about it: an entry taken over
from a stalled process, and the stalled process finding it gone."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_for

pytestmark = pytest.mark.slow

TURN_FIELDS = ("bot", "chat_session_id", "msg_id", "upstream")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_turn_taken_over_from_a_stalled_process_is_logged_with_its_fields(
    redis_url: str, bot_id: str, yach: FakeYach, spawn: Spawner, http: aiohttp.ClientSession
) -> None:
    slow = {"first": True}
    upstream = await PacedOpenAI(pace=lambda _q: 30.0 if slow["first"] else 0.0).start()
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_CLAIM_IDLE_S="1")  # fmt: skip
    stalled = await spawn(env, "stalled").start()
    taker = None
    try:
        message = group_message("are you there?", msg_id="m-fields-1")
        assert await post_webhook(http, stalled.url, message) == 200
        await wait_for(lambda: len(upstream.started) == 1, 10, "the turn asked the upstream")
        stalled.signal(signal.SIGSTOP)  # stalled mid-turn: its claim is not renewed
        slow["first"] = False
        taker = await spawn(env, "taker").start()
        await wait_for(lambda: len(yach.shown) >= 1, 15, "the answer from the other process")
        stalled.signal(signal.SIGCONT)
        await wait_for(lambda: stalled.events("entry_lost"), 10, "the stalled process gives up")
        lines = taker.events("entry_claimed") + stalled.events("entry_lost")
        assert taker.events("entry_claimed"), taker.events()
    finally:
        stalled.signal(signal.SIGCONT)
        await upstream.close()
    for line in lines:
        missing = [name for name in TURN_FIELDS if name not in line]
        assert not missing, (missing, line)
        assert line["msg_id"] == "m-fields-1" and line["upstream"] == "openai", line


async def test_the_webhooks_own_lines_about_a_message_carry_the_turns_fields(
    redis_url: str, bot_id: str, yach: FakeYach, spawn: Spawner, http: aiohttp.ClientSession
) -> None:
    """A duplicate delivery and a message from a group outside the allow list are logged by
    the webhook, with the fields of a turn's lines (`upstream` was missing)."""
    upstream = await PacedOpenAI().start()
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_ALLOW_GROUPS="g1")  # fmt: skip
    try:
        bridge = await spawn(env).start()
        message = group_message("once", msg_id="m-fields-dup")
        for _ in range(2):
            assert await post_webhook(http, bridge.url, message) == 200
        outside = group_message("elsewhere", group="g-other", msg_id="m-fields-out")
        assert await post_webhook(http, bridge.url, outside) == 200
        await wait_for(
            lambda: bridge.events("webhook_duplicate") and bridge.events("webhook_ignored"),
            10, "both lines",
        )  # fmt: skip
        lines = bridge.events("webhook_duplicate") + bridge.events("webhook_ignored")
    finally:
        await upstream.close()
    for line in lines:
        missing = [name for name in TURN_FIELDS if name not in line]
        assert not missing, (missing, line)
        assert line["upstream"] == "openai", line
