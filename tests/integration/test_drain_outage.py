"""SIGTERM while Redis is out of reach (SPEC §6): the drain gives running turns
BRIDGE_DRAIN_TIMEOUT_S, then a short grace for their last writes, and the process exits 0.
A turn's finishing step (its acknowledgement) rides a Redis outage for as long as its lock
lives; a drain must not wait that long — systemd's TimeoutStopSec would kill the process
first, and a stop would be reported as a failure. What the outage kept from being
acknowledged is left pending, and the next process settles it once Redis is back."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time

import aiohttp

from bridge.messages import MESSAGES
from bridge.sessions import _REFRESH  # its SHA: the command that meets the outage
from bridge.worker import DRAIN_GRACE_S
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import RedisProxy, RedisServer, Spawner, post_webhook, wait_for

EN = MESSAGES["en"]
REFRESH_SCRIPT = hashlib.sha1(_REFRESH.encode()).hexdigest().encode()
DRAIN_TIMEOUT_S = 0.5
CLAIM_IDLE_S = 30  # the lock's life: how long the finishing step would ride the outage


async def test_a_drain_during_a_redis_outage_exits_0_soon_after_its_timeout(
    bot_id: str, yach: FakeYach, redis_server: RedisServer, spawn: Spawner
) -> None:
    proxy = await RedisProxy(redis_server.socket).start()
    upstream = await FakeOpenAI().start()
    env = bridge_env(proxy.url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_IMAGE_PIPELINE="none", BRIDGE_LANG="en",
                     BRIDGE_CLAIM_IDLE_S=str(CLAIM_IDLE_S),
                     BRIDGE_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S))  # fmt: skip
    image = group_message("", msgtype="image", picUrl="https://images.example/a.png")
    try:
        async with aiohttp.ClientSession() as http:
            bridge = await spawn(env).start()
            await wait_for(lambda: bool(bridge.events("redis_connected")), 5, "connected")
            proxy.cut_before(REFRESH_SCRIPT)  # the refused turn's finishing step meets it
            assert await post_webhook(http, bridge.url, image) == 200
            await asyncio.wait_for(proxy.lost.wait(), 10)
            signalled = time.monotonic()
            bridge.signal(signal.SIGTERM)
            assert await bridge.wait(DRAIN_TIMEOUT_S + DRAIN_GRACE_S + 5) == 0
            took = time.monotonic() - signalled
    finally:
        await upstream.close()
        await proxy.close()
    assert took < DRAIN_TIMEOUT_S + DRAIN_GRACE_S + 2, took  # not the lock's life (30 s)
    assert yach.texts() == [EN["image_refused"]]
    [drained] = bridge.events("drained")
    assert (drained["left_pending"], drained["abandoned"]) == (1, 1)
