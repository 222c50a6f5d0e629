"""SIGTERM (SPEC §6): the bridge stops taking webhooks (503, /readyz 503), lets in-flight
turns finish within BRIDGE_DRAIN_TIMEOUT_S, leaves the rest pending — claimable at once by
the next process — logs one summary line and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import BridgeProcess, PacedOpenAI, Spawner, post_webhook, wait_for


async def _status(http: aiohttp.ClientSession, bridge: BridgeProcess, path: str) -> int:
    async with http.get(f"{bridge.url}{path}") as response:
        return response.status


async def test_sigterm_lets_the_turn_in_flight_finish_and_exits_0(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, spawn: Spawner
) -> None:
    upstream = await PacedOpenAI(pace=lambda _q: 1.5).start()
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_DRAIN_TIMEOUT_S="6", BRIDGE_CLAIM_IDLE_S="1",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            bridge = await spawn(env).start()
            await wait_for(lambda: bool(bridge.events("redis_connected")), 5, "connected")
            assert await post_webhook(http, bridge.url, group_message("in flight")) == 200
            await wait_for(lambda: len(upstream.started) == 1, 10, "the turn started")
            signalled = time.monotonic()
            bridge.signal(signal.SIGTERM)
            await wait_for(lambda: bool(bridge.events("stopping")), 5, "draining")
            assert await post_webhook(http, bridge.url, group_message("too late")) == 503
            assert await _status(http, bridge, "/readyz") == 503
            assert await bridge.wait(10) == 0
            took = time.monotonic() - signalled
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: in flight. (history: 0 messages)"]
    assert took < 6
    [drained] = bridge.events("drained")
    assert (drained["completed"], drained["left_pending"]) == (1, 0)
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0


async def test_turns_outlasting_the_drain_window_stay_pending_for_the_next_process(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, spawn: Spawner
) -> None:
    """A turn longer than BRIDGE_DRAIN_TIMEOUT_S is interrupted and left pending, as is the
    message waiting behind it; the next process answers both, in order — at once, not
    after BRIDGE_CLAIM_IDLE_S, because the draining process let go of its claims."""
    slow = {"on": True}
    upstream = await PacedOpenAI(pace=lambda _q: 30.0 if slow["on"] else 0.0).start()
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_DRAIN_TIMEOUT_S="1", BRIDGE_CLAIM_IDLE_S="10",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            bridge = await spawn(env).start()
            for text in ("long one", "behind it"):
                assert await post_webhook(http, bridge.url, group_message(text)) == 200
            await wait_for(lambda: len(upstream.started) == 1, 10, "the turn started")
            assert await redis_client.xlen(Keys(bot_id).inbox) == 2  # a 200 means stored
            signalled = time.monotonic()
            bridge.signal(signal.SIGTERM)
            assert await bridge.wait(10) == 0
            assert time.monotonic() - signalled < 4
            [drained] = bridge.events("drained")
            assert (drained["left_pending"], drained["interrupted"]) == (2, 1)
            assert yach.shown == []
            slow["on"] = False
            restarted = time.monotonic()
            await spawn(env).start()
            await wait_for(lambda: len(yach.shown) >= 2, 8, "both answered by the next process")
            assert time.monotonic() - restarted < 8  # well before BRIDGE_CLAIM_IDLE_S (10 s)
            await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    assert [text.partition(".")[0] for text in yach.texts()] == [
        "You said: long one",
        "You said: behind it",
    ]
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0
