"""What counts as an attempt, and what is acknowledged (SPEC §5, §6), against real Redis:
an upstream failure is answered and acknowledged, not retried; a send that keeps failing
leaves the entry pending and its journal resends the piece without asking again; waiting
behind a long turn never counts, and the long turn keeps its claim (XCLAIM JUSTID)."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bridge.messages import MESSAGES
from bridge.store import GROUP, Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import PacedOpenAI

EN = MESSAGES["en"]
LONG_ANSWER = " ".join(f"Sentence number {n} of a long answer." for n in range(1, 41))
SEND_TRIES = 5  # of one piece by the outbox, before the entry is left pending
# The outbox's first wait after a failed send (0.5 s in production, doubled at each failure:
# 7.5 s over the five tries); the tests here only count the tries.
SEND_BACKOFF_S = 0.01


def _env(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, **extra: str
) -> dict[str, str]:
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        **{"BRIDGE_LANG": "en", "BRIDGE_CLAIM_IDLE_S": "1", **extra},
    )  # fmt: skip


async def test_upstream_failure_after_retries_is_answered_once_and_acknowledged(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    upstream = await FakeOpenAI(statuses=[503, 503]).start()
    keys = Keys(bot_id)
    try:
        env = _env(redis_url, bot_id, yach, upstream, BRIDGE_UPSTREAM_RETRIES="1")
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("will it fail?")))[0] == 200
            await wait_until(lambda: len(yach.shown) >= 1)
            await asyncio.sleep(2.5)  # more than twice BRIDGE_CLAIM_IDLE_S: no redelivery
            assert yach.texts() == [EN["upstream_unavailable"]]
            assert len(upstream.server.requests) == 2  # the request and its one retry
            assert await redis_client.xlen(keys.inbox) == 0
            assert await redis_client.xlen(keys.dead) == 0
    finally:
        await upstream.close()


async def test_send_failure_leaves_entry_pending_and_the_journal_resends_it(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    upstream = await FakeOpenAI().start()
    keys = Keys(bot_id)
    try:
        yach.fail_next(500, times=5)  # every try of the first delivery's send fails
        env = _env(redis_url, bot_id, yach, upstream)
        async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
            assert (await bridge.post(group_message("deliver me")))[0] == 200
            await wait_until(lambda: len(yach.server.requests) >= 5, timeout=15)
            assert yach.shown == []
            assert await redis_client.xlen(keys.inbox) == 1  # left pending, not acknowledged
            await wait_until(lambda: len(yach.shown) >= 1, timeout=10)
            await asyncio.sleep(1.5)
            assert yach.texts() == ["You said: deliver me. (history: 0 messages)"]
            assert len(upstream.bodies) == 1  # the journalled piece was resent, not re-asked
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()


async def test_a_send_failing_midway_resends_only_the_unconfirmed_pieces(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """Two pieces show, then every try of the third fails: the entry is left pending, and
    its redelivery sends the third piece and the cut-off notice only. Replies go through the
    custom robot URL, which does not deduplicate: a confirmed piece resent would show twice."""
    upstream = await FakeOpenAI(answer=lambda _body: LONG_ANSWER, delay_s=0.01).start()
    keys = Keys(bot_id)
    yach.fail_after(2, times=SEND_TRIES)
    env = _env(redis_url, bot_id, yach, upstream, BRIDGE_REPLY_MODE="stream",
               BRIDGE_FLUSH_MIN_CHARS="40", BRIDGE_FLUSH_MAX_WAIT_S="30")  # fmt: skip
    try:
        async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
            assert (await bridge.post(group_message("tell me a lot")))[0] == 200
            await wait_until(lambda: len(yach.server.requests) >= 2 + SEND_TRIES, timeout=15)
            assert len(yach.shown) == 2
            assert await redis_client.xlen(keys.inbox) == 1  # not acknowledged
            await wait_until(lambda: EN["cut_off"] in yach.texts(), timeout=10)
            await asyncio.sleep(1.5)  # past BRIDGE_CLAIM_IDLE_S: anything resent would show
            assert await redis_client.xlen(keys.inbox) == 0
            assert await redis_client.xlen(keys.dead) == 0
    finally:
        await upstream.close()
    texts = yach.texts()
    assert len(texts) == 4, texts  # two pieces, the one that failed, the notice
    assert len(set(texts)) == len(texts), texts
    assert texts[-1] == EN["cut_off"]
    answer = re.sub(r"\s+", "", "".join(texts[:-1]))
    assert re.sub(r"\s+", "", LONG_ANSWER).startswith(answer)
    assert len(upstream.bodies) == 1  # the journal answered the redelivery


async def test_a_send_failing_on_every_attempt_is_dead_lettered_and_logged_at_error(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """BRIDGE_MAX_ATTEMPTS=1: the one attempt's send never gets through; the redelivery
    dead-letters the entry and tells the user once, without asking the upstream again."""
    upstream = await FakeOpenAI().start()
    keys = Keys(bot_id)
    yach.fail_next(500, times=SEND_TRIES)
    try:
        with capture_logs() as logs:
            env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="1")
            async with running_bridge(env, send_backoff_s=SEND_BACKOFF_S) as bridge:
                assert (await bridge.post(group_message("never delivered")))[0] == 200
                await wait_until(lambda: len(yach.shown) >= 1, timeout=15)
                await asyncio.sleep(1.5)  # past BRIDGE_CLAIM_IDLE_S: nothing more comes
                assert await redis_client.xlen(keys.inbox) == 0
                registry = bridge.bridge.metrics.registry
    finally:
        await upstream.close()
    assert yach.texts() == [EN["dead_letter"]]
    assert len(upstream.bodies) == 1
    # The metrics say so too: a dead letter, and a turn whose outcome is `dead` (a turn
    # outcome deploy/README.md lists, which nothing counted).
    assert registry.get_sample_value("chatbridge_dead_letters_total") == 1
    dead_turns = {"upstream": "openai", "outcome": "dead"}
    assert registry.get_sample_value("chatbridge_turns_total", dead_turns) == 1
    dead = await redis_client.xrange(keys.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"1 attempts"
    levels = {(e["event"], e["log_level"]) for e in logs}
    assert ("send_failed", "error") in levels and ("dead_lettered", "error") in levels


async def test_waiting_never_counts_and_a_long_turn_keeps_its_claim(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """Two workers (two bridges) share the inbox. The first turn of a session lasts 3.5 ×
    BRIDGE_CLAIM_IDLE_S while three more messages wait behind it; with BRIDGE_MAX_ATTEMPTS
    = 1, any counted redelivery would dead-letter a message, and a claim taken from the live
    worker would ask the upstream twice."""
    upstream = await PacedOpenAI(pace=lambda q: 3.5 if q.startswith("q0") else 0.0).start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="1",
               BRIDGE_SESSION_QUEUE_MAX="10")  # fmt: skip
    try:
        async with AsyncExitStack() as stack:
            bridges = [await stack.enter_async_context(running_bridge(env)) for _ in range(2)]
            for index in range(4):
                status, _ = await bridges[index % 2].post(group_message(f"q{index}"))
                assert status == 200
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # during the long turn
                rows = await redis_client.xpending_range(keys.inbox, GROUP, "-", "+", 100)
                assert rows and all(row["times_delivered"] == 1 for row in rows), rows
                await asyncio.sleep(0.25)
            await wait_until(lambda: len(yach.shown) >= 4, timeout=15)
            await asyncio.sleep(1.0)
    finally:
        await upstream.close()
    assert [text.partition(".")[0] for text in yach.texts()] == [
        f"You said: q{index}" for index in range(4)
    ]
    assert upstream.started == ["q0", "q1", "q2", "q3"]
    assert await redis_client.xlen(keys.dead) == 0
    assert await redis_client.xlen(keys.inbox) == 0
