"""When a sent piece is marked confirmed in its journal (docs/delivery.md): through the app
API, which shows a message_id once, the mark waits for the next journal write; through a
route that does not deduplicate (the custom robot URL), it is written as soon as the
platform confirmed the send, so a replay never resends a piece that showed."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.openai import MIDWAY_HEAD as HEAD
from tests.fakes.openai import MIDWAY_TAIL as TAIL
from tests.fakes.openai import SilentMidway
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

APP = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}


async def _journal(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    (key,) = [key async for key in redis.scan_iter(match=keys.journal("*"))]
    raw = await redis.hgetall(key)
    return {field.decode(): value.decode() for field, value in raw.items()}


@pytest.mark.parametrize(("credentials", "route", "marked_at_once"), [
    (APP, "app", False),
    ({}, "robot", True),
])  # fmt: skip
async def test_the_first_piece_is_marked_at_once_only_where_a_resend_could_show_twice(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    silent: SilentMidway, credentials: dict[str, str], route: str, marked_at_once: bool,
) -> None:  # fmt: skip
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(silent.base_url), **credentials,
        BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="0", BRIDGE_FLUSH_MAX_WAIT_S="0",
        BRIDGE_THINKING_NOTICE_S="0",
    )  # fmt: skip
    keys = Keys(bot_id)
    async with running_bridge(env) as bridge:
        assert (await bridge.post(group_message("q")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1, timeout=10)  # HEAD's sentence
        journal = await _journal(redis_client, keys)
        for _ in range(20):  # the mark, if any, follows the platform's answer
            if "s:0" in journal:
                break
            await asyncio.sleep(0.025)
            journal = await _journal(redis_client, keys)
        assert "p:0" in journal and "p:1" not in journal
        assert ("s:0" in journal) is marked_at_once
        silent.release.set()
        await wait_until(lambda: len(yach.shown) == 2, timeout=10)
    assert [shown.route for shown in yach.shown] == [route, route]
    assert "".join(yach.texts()).replace(" ", "") == (HEAD + TAIL).replace(" ", "")
