"""A drain's deadline that comes while a refused turn refreshes its session (Redis out of
reach a moment, from the very refresh): the refusal notice was sent and is not journalled,
so the entry must be acknowledged, not left pending — its redelivery would send the notice
again, and the robot route, which does not deduplicate, would show it twice."""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.sessions import _REFRESH  # its SHA: the command that meets the outage
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge
from tests.procs import RedisProxy, RedisServer, wait_acknowledged

EN = MESSAGES["en"]
REFRESH_SCRIPT = hashlib.sha1(_REFRESH.encode()).hexdigest().encode()
OUTAGE_S = 1.5  # longer than the drain's window, shorter than the lock lives
CLAIM_IDLE_S = "3"


async def test_a_refusal_whose_refresh_outlasts_the_drain_shows_once(
    bot_id: str, yach: FakeYach, redis_server: RedisServer
) -> None:
    proxy = await RedisProxy(redis_server.socket).start()
    upstream = await FakeOpenAI().start()
    client = aioredis.Redis.from_url(redis_server.url)
    env = bridge_env(proxy.url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_IMAGE_PIPELINE="none", BRIDGE_LANG="en",
                     BRIDGE_CLAIM_IDLE_S=CLAIM_IDLE_S, BRIDGE_DRAIN_TIMEOUT_S="0.3")  # fmt: skip
    image = group_message("", msgtype="image", picUrl="https://images.example/a.png")
    try:
        async with running_bridge(env) as bridge:
            proxy.cut_before(REFRESH_SCRIPT)
            assert (await bridge.post(image))[0] == 200
            await asyncio.wait_for(proxy.lost.wait(), 10)
            assert yach.texts() == [EN["image_refused"]]
            asyncio.get_running_loop().call_later(OUTAGE_S, proxy.heal)
        # Drained, with Redis back: the next process gets whatever was left pending.
        async with running_bridge(env):
            await wait_acknowledged(client, Keys(bot_id).inbox, timeout=15)
            await asyncio.sleep(float(CLAIM_IDLE_S) + 0.5)  # a redelivery would show by now
    finally:
        await client.aclose()
        await upstream.close()
        await proxy.close()
    assert yach.texts() == [EN["image_refused"]]
    assert {shown.route for shown in yach.shown} == {"robot"}
