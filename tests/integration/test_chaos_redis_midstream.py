"""Redis goes away while a turn is mid-stream (SPEC §6): some pieces journalled and shown,
the rest of the answer arriving while Redis is down. A private redis-server is stopped and
started again (or frozen and resumed) — on its data, the answer goes on when Redis returns
(the turn's Redis steps ride the outage out for as long as its lock would live): no cut-off
notice, no piece twice, the upstream asked once. Replies go through the app API (it shows a
`message_id` once), and the send budget is on, as it is by default (BRIDGE_YACH_SEND_RATE
20/60): each piece takes its budget in Redis."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.openai import GATED_HEAD as HEAD
from tests.fakes.openai import GATED_TAIL as TAIL
from tests.fakes.openai import GatedOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message
from tests.procs import RedisServer, Spawner, post_webhook, wait_for

EN = MESSAGES["en"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _env(
    redis_server: RedisServer, bot_id: str, yach: FakeYach, upstream: GatedOpenAI
) -> dict[str, str]:
    """A bridge streaming each answer in pieces of 20 characters, through the app API, with a
    send budget (so each piece takes it in Redis first), claimed after 10 s."""
    return bridge_env(
        redis_server.url, bot_id, yach,
        BRIDGE_UPSTREAM="openai", BRIDGE_OPENAI_BASE_URL=upstream.base_url,
        BRIDGE_OPENAI_API_KEY="sk-test-placeholder", BRIDGE_OPENAI_MODEL="fake-model",
        BRIDGE_LANG="en", BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="20",
        BRIDGE_FLUSH_MAX_WAIT_S="30", BRIDGE_YACH_SEND_RATE="1000/60",
        BRIDGE_CLAIM_IDLE_S="10",
        BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY, BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
    )  # fmt: skip


@pytest.mark.parametrize("stop", ["shutdown", "sigkill", "sigstop"])
async def test_redis_stopped_mid_stream_the_answer_goes_on_when_it_returns(
    stop: str, bot_id: str, yach: FakeYach, redis_server: RedisServer, spawn: Spawner,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    upstream = await GatedOpenAI().start()
    env = _env(redis_server, bot_id, yach, upstream)
    try:
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("tell me")) == 200
        await wait_for(lambda: len(yach.shown) >= 2, 10, "the head's pieces shown")
        await asyncio.sleep(1.2)  # past appendfsync everysec: the journal is on disk
        if stop == "shutdown":
            redis_server.shutdown()
        elif stop == "sigkill":
            redis_server.kill()
        else:  # frozen: it stops answering, connections stay open (a partition)
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGSTOP)
        upstream.gate.set()  # the rest of the answer comes while Redis is down
        await asyncio.sleep(1.5)
        if stop == "sigstop":
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGCONT)
        else:
            redis_server.start()
        # Well within BRIDGE_CLAIM_IDLE_S (10 s): the turn itself goes on.
        await wait_for(
            lambda: _squash(TAIL[-1]) in _squash("".join(yach.texts())), 8, "the whole answer"
        )
        await wait_for(lambda: redis_server.client().xlen(Keys(bot_id).inbox) == 0, 5, "acked")
        await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    texts = yach.texts()
    assert EN["cut_off"] not in texts, texts
    assert _squash("".join(texts)) == _squash(" ".join(HEAD + TAIL))
    assert upstream.started == 1
    sent_ids = [r.json()["message_id"] for r in yach.server.on("/group/robot/message/send")]
    assert len(set(sent_ids)) == len(texts)


async def test_redis_restarted_empty_mid_stream_nothing_shows_twice_and_the_session_goes_on(
    bot_id: str, yach: FakeYach, redis_server: RedisServer, spawn: Spawner,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Without its data (no append-only file), Redis forgets the entry, its journal and
    the session lock: the turn in flight cannot be finished or replayed (SPEC §4: surviving
    a crash of Redis is Redis's persistence). What still holds: nothing shown twice, the
    webhook refused meanwhile is answered once when the platform retries it, and the
    session's next question is answered at once, not held behind a lock nobody has."""
    upstream = await GatedOpenAI().start()
    env = _env(redis_server, bot_id, yach, upstream)
    try:
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("tell me")) == 200
        await wait_for(lambda: len(yach.shown) >= 2, 10, "the head's pieces shown")
        redis_server.shutdown()
        redis_server.wipe()
        retried = group_message("again?")
        assert await post_webhook(http, bridge.url, retried) == 503
        upstream.gate.set()
        await asyncio.sleep(1.0)
        redis_server.start()
        status = 0
        for _ in range(50):  # the platform's retries
            status = await post_webhook(http, bridge.url, retried)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        await wait_for(
            lambda: upstream.started == 2 and _squash(TAIL[-1]) in _squash(yach.texts()[-1]),
            8, "the next answer",
        )  # fmt: skip
        assert await post_webhook(http, bridge.url, retried) == 200  # once more: a duplicate
        await wait_for(lambda: redis_server.client().xlen(Keys(bot_id).inbox) == 0, 5, "acked")
        await asyncio.sleep(1.0)
    finally:
        await upstream.close()
    texts = yach.texts()
    sent_ids = [r.json()["message_id"] for r in yach.server.on("/group/robot/message/send")]
    assert len(texts) == len(set(sent_ids)), texts
    assert upstream.started == 2  # the duplicate was not asked
    whole = _squash(" ".join(HEAD + TAIL))
    assert _squash("".join(texts)).endswith(whole)  # the next answer whole, after the cut one
    assert EN["cut_off"] not in texts
