"""A poison message — one whose turn takes its process down every time — is dead-lettered
after BRIDGE_MAX_ATTEMPTS attempts and the user is told once (SPEC §6). The crash is a
real SIGKILL of the bridge process while the turn runs."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_for

EN = MESSAGES["en"]
MAX_ATTEMPTS = 3



async def test_poison_message_is_dead_lettered_after_max_attempts_and_the_user_told_once(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, spawn: Spawner
) -> None:
    upstream = await PacedOpenAI(pace=lambda _q: 60.0).start()  # every turn of it hangs…
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1", BRIDGE_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            bridge = await spawn(env).start()
            assert await post_webhook(http, bridge.url, group_message("poison")) == 200
            for attempt in range(1, MAX_ATTEMPTS + 1):
                await wait_for(lambda n=attempt: len(upstream.started) >= n, 15, f"turn {attempt}")
                bridge.kill()  # …and takes its process down
                bridge = await spawn(env).start()
            await wait_for(lambda: len(yach.shown) >= 1, 15, "the dead-letter notice")
            await asyncio.sleep(2.5)  # more than twice BRIDGE_CLAIM_IDLE_S: nothing else comes
    finally:
        await upstream.close()
    assert len(upstream.started) == MAX_ATTEMPTS
    assert yach.texts() == [EN["dead_letter"]]
    dead = await redis_client.xrange(keys.dead)
    assert len(dead) == 1
    assert dead[0][1][b"reason"] == f"{MAX_ATTEMPTS} attempts".encode()
    assert await redis_client.xlen(keys.inbox) == 0
    assert [e["attempts"] for e in bridge.events("dead_lettered")] == [MAX_ATTEMPTS]
