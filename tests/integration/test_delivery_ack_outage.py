"""Redis out of reach at the very moment an answered entry is acknowledged (a proxy in
front of Redis cuts every connection as the ack script is sent), for longer than 10 s.

The ack rides the outage out as long as the entry's lock lives, as the turn's other writes
do: a command's reply, which no journal records, is not sent again when Redis is back.
Longer, the entry is redelivered: its journal says the answer was delivered in full, so
the redelivery shows nothing — on the robot route, which does not deduplicate, as on the
app API — and acknowledges it, never dead-lettering an answered message for its attempt
count."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from bridge.inbox import _ACK  # its SHA: the command that meets the outage
from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach
from tests.harness import RunningBridge, bridge_env, group_message, openai_env, running_bridge
from tests.procs import RedisProxy, RedisServer, wait_acknowledged, wait_for

EN = MESSAGES["en"]
ACK_SCRIPT = hashlib.sha1(_ACK.encode()).hexdigest().encode()
OUTAGE_S = 11.0  # longer than the ack's patience was (10 s)
ANSWER = "You said: hello. (history: 0 messages)"


@asynccontextmanager
async def _bridge_behind(
    proxy: RedisProxy, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, **extra: str
) -> AsyncIterator[RunningBridge]:
    env = bridge_env(proxy.url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_LANG="en", **extra)  # fmt: skip
    async with running_bridge(env) as bridge:
        yield bridge


async def _outage_at_the_ack(proxy: RedisProxy, yach: FakeYach, shown: int) -> None:
    """Cut Redis off as the ack is sent, once `shown` messages showed; back `OUTAGE_S` later."""
    await asyncio.wait_for(proxy.lost.wait(), 10)
    assert len(yach.shown) == shown
    await asyncio.sleep(OUTAGE_S)
    proxy.heal()


async def test_a_commands_ack_rides_out_an_outage_as_long_as_the_lock_lives(
    bot_id: str, yach: FakeYach, redis_server: RedisServer
) -> None:
    """BRIDGE_CLAIM_IDLE_S=15: the lock lives 15 s. The ack of `/help` meets an 11 s
    outage: it lands when Redis is back, and the reply (robot route) shows once."""
    proxy = await RedisProxy(redis_server.socket).start()
    upstream = await FakeOpenAI().start()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with _bridge_behind(proxy, bot_id, yach, upstream, BRIDGE_CLAIM_IDLE_S="15"
                                  ) as bridge:  # fmt: skip
            proxy.cut_before(ACK_SCRIPT)
            assert (await bridge.post(group_message("/help")))[0] == 200
            await _outage_at_the_ack(proxy, yach, shown=1)
            await wait_acknowledged(client, Keys(bot_id).inbox, timeout=25)
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()
        await upstream.close()
        await proxy.close()
    assert yach.texts() == [EN["help"]]


@pytest.mark.parametrize(
    ("route", "max_attempts"), [("robot", "3"), ("robot", "1"), ("app", "1")]
)
async def test_an_answer_whose_ack_failed_is_redelivered_without_showing_anything(
    bot_id: str, yach: FakeYach, redis_server: RedisServer, route: str, max_attempts: str
) -> None:
    """BRIDGE_CLAIM_IDLE_S=2: the ack gives up before Redis is back, and the entry is
    claimed again. Its journal is complete, every piece confirmed, the turn recorded: the
    redelivery sends nothing and asks nothing — also on its last allowed attempt, where it
    was dead-lettered, with the dead-letter notice after the answer."""
    proxy = await RedisProxy(redis_server.socket).start()
    upstream = await FakeOpenAI().start()
    client = aioredis.Redis.from_url(redis_server.url)
    keys = Keys(bot_id)
    app = {"BRIDGE_YACH_APP_KEY": APP_KEY, "BRIDGE_YACH_APP_SECRET": APP_SECRET}
    try:
        async with _bridge_behind(
            proxy, bot_id, yach, upstream, BRIDGE_CLAIM_IDLE_S="2",
            BRIDGE_MAX_ATTEMPTS=max_attempts, **(app if route == "app" else {}),
        ) as bridge:  # fmt: skip
            proxy.cut_before(ACK_SCRIPT)
            assert (await bridge.post(group_message("hello")))[0] == 200
            await _outage_at_the_ack(proxy, yach, shown=1)
            await wait_acknowledged(client, keys.inbox, timeout=15)
            await wait_for(lambda: bool(bridge.bridge.worker and bridge.bridge.worker.healthy),
                           5, "workers up")  # fmt: skip
            await asyncio.sleep(2.5)  # past BRIDGE_CLAIM_IDLE_S: anything more would show
            dead = await client.xlen(keys.dead)
    finally:
        await client.aclose()
        await upstream.close()
        await proxy.close()
    assert {shown.route for shown in yach.shown} == {route}
    assert yach.texts() == [ANSWER]
    assert len(upstream.bodies) == 1
    assert dead == 0
