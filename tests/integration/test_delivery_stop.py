"""`/stop` and `/reset` against a running turn (SPEC §5): the turn stops, its entry is
acknowledged and never retried, nothing more of its answer is sent; `/reset` confirms once
the stopped turn has let go of the session, and the next question starts afresh."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.dify import STOP, DifyFake, render
from tests.fakes.dify import event as dify_event
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import PacedOpenAI

EN = MESSAGES["en"]
LONG_ANSWER = " ".join(f"Sentence number {n} of a long answer." for n in range(1, 81))
SESSION = "yach:g:g1:u:u1"



async def test_stop_ends_the_streaming_turn_which_is_acknowledged_and_never_retried(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    upstream = await PacedOpenAI(answer=lambda _body: LONG_ANSWER, delay_s=0.02).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1", BRIDGE_REPLY_MODE="stream",
        BRIDGE_FLUSH_MIN_CHARS="40", BRIDGE_FLUSH_MAX_WAIT_S="30",
    )  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("talk for a long time")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 2, timeout=15)
            assert (await bridge.post(group_message("/stop")))[0] == 200
            await wait_until(lambda: EN["stopped"] in yach.texts(), timeout=5)
            await asyncio.sleep(0.3)  # a send already on the wire may still land
            shown_after_stop = len(yach.shown)
            await asyncio.sleep(2.5)  # more than twice BRIDGE_CLAIM_IDLE_S
            assert len(yach.shown) == shown_after_stop
            assert await redis_client.xlen(keys.inbox) == 0
            assert await redis_client.exists(keys.lock(SESSION), keys.stop(SESSION)) == 0
    finally:
        await upstream.close()
    assert len(upstream.started) == 1
    assert EN["cut_off"] not in yach.texts()
    assert len(yach.texts()) < 20  # far from the whole answer


async def test_reset_waits_for_the_stopped_turn_then_the_next_question_starts_afresh(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "slow one" else 0.0).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="2",
    )  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("first")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1)
            assert (await bridge.post(group_message("slow one")))[0] == 200
            await wait_until(lambda: len(upstream.started) == 2)
            assert (await bridge.post(group_message("/reset")))[0] == 200
            # The stopped turn lets go at once: no waiting out its lock (2 s here).
            await wait_until(lambda: EN["reset_done"] in yach.texts(), timeout=1.0)
            assert await redis_client.get(keys.lock(SESSION)) is None  # the turn let go
            assert await redis_client.exists(keys.session(SESSION), keys.history(SESSION)) == 0
            assert (await bridge.post(group_message("after reset")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 3)
            await asyncio.sleep(2.5)
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()
    assert yach.texts() == [
        "You said: first. (history: 0 messages)",
        EN["reset_done"],
        "You said: after reset. (history: 0 messages)",  # the mapping was forgotten
    ]
    assert upstream.started == ["first", "slow one", "after reset"]


async def test_stop_reaches_a_turn_waiting_for_redelivery_after_its_send_failed(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """A turn whose answer could not be sent (the platform failed every try) lets go of
    its session and waits for its redelivery (SPEC §4): it is still in progress — as much
    as one whose process died — and `/stop` must stop it, not answer "nothing to stop" and
    let the answer come after all once the entry is redelivered."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="1",
    )  # fmt: skip
    yach.fail_next(500, times=5)  # every try of the answer's send fails
    try:
        async with running_bridge(env, send_backoff_s=0.01) as bridge:
            assert (await bridge.post(group_message("unlucky")))[0] == 200
            await wait_until(lambda: not yach.failures and len(yach.server.requests) >= 5)
            for _ in range(100):  # the worker lets go of the session
                if await redis_client.get(keys.lock(SESSION)) is None:
                    break
                await asyncio.sleep(0.01)
            assert await redis_client.get(keys.lock(SESSION)) is None  # nobody holds it now
            assert (await bridge.post(group_message("/stop")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1, timeout=5)
            await asyncio.sleep(2.5)  # more than twice BRIDGE_CLAIM_IDLE_S: redelivered by now
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()
    assert yach.texts() == [EN["stopped"]]
    assert upstream.started == ["unlucky"]


async def test_nothing_more_is_sent_while_a_stopped_upstream_is_told_to_stop(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """Dify is told to stop generating (`POST …/stop`) while the stopped turn closes its
    stream; that request may take seconds. Pieces of the answer still waiting for the send
    budget then must not go out after the "stopped" confirmation: the sender stops first."""
    sentences = [f"Sentence number {n} of a long answer. " for n in range(1, 13)]
    async with DifyFake() as dify:
        dify.stream = render([dify_event("message", answer=s) for s in sentences])
        dify.delay_s = 0.02  # sentences keep coming while pieces wait for the budget
        dify.script.then(dify.answer(stall_after=10**6))
        dify.stop_delay_s = 3.0
        env = bridge_env(
            redis_url, bot_id, yach, **dify.env(), BRIDGE_LANG="en",
            BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="0", BRIDGE_FLUSH_MAX_WAIT_S="0",
            BRIDGE_YACH_SEND_RATE="1/3",
        )  # fmt: skip
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("talk for a long time")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1, timeout=10)
            await asyncio.sleep(1.5)  # the next piece waits for the budget (3 s)
            shown_before_stop = yach.texts()
            assert (await bridge.post(group_message("/stop")))[0] == 200
            await wait_until(lambda: EN["stopped"] in yach.texts(), timeout=5)
            await dify.server.wait_for_requests(1, STOP, timeout=5)
            await asyncio.sleep(3.5)  # the stop request's 3 s; the budget freed meanwhile
            assert yach.texts() == [*shown_before_stop, EN["stopped"]]
            assert await redis_client.xlen(Keys(bot_id).inbox) == 0
