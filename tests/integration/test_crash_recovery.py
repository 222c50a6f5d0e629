"""A bridge process SIGKILLed mid-turn, then started again (SPEC §6): nothing stored is
lost; a turn that had sent nothing runs afresh; a turn that had sent pieces is finished
from its journal — the upstream is not asked again, no piece shows twice, a cut-off notice
follows; messages that were only waiting lose no attempt to the crash."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge
from tests.procs import PacedOpenAI, Spawner, post_webhook, wait_acknowledged, wait_for

EN = MESSAGES["en"]
LONG_ANSWER = " ".join(f"Sentence number {n} of a long answer." for n in range(1, 41))
SEND_TRIES = 5  # of one message by the outbox, before the entry is left pending



@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# Sends through the app API: each under its message_id, which the platform shows once.
APP_API = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}


def _env(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: PacedOpenAI, **extra: str
) -> dict[str, str]:
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        **{"BRIDGE_LANG": "en", "BRIDGE_CLAIM_IDLE_S": "1", **extra},
    )  # fmt: skip


async def test_sigkill_before_any_piece_was_sent_gives_one_full_answer_after_restart(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    slow = {"first": True}
    upstream = await PacedOpenAI(pace=lambda _q: 30.0 if slow["first"] else 0.0).start()
    try:
        env = _env(redis_url, bot_id, yach, upstream)
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("are you there?")) == 200
        await wait_for(lambda: len(upstream.started) == 1, 10, "the turn asked the upstream")
        bridge.kill()  # mid-turn: the upstream is still thinking, nothing was sent
        assert yach.shown == []
        slow["first"] = False
        await spawn(env).start()
        await wait_for(lambda: len(yach.shown) >= 1, 15, "the answer after the restart")
        await asyncio.sleep(1.5)  # a duplicate would show by now
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: are you there?. (history: 0 messages)"]
    assert len(upstream.started) == 2  # asked afresh: no piece had been journalled
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0


async def test_sigkill_after_two_pieces_replays_the_journal_without_asking_again(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    upstream = await PacedOpenAI(answer=lambda _body: LONG_ANSWER, delay_s=0.02).start()
    env = _env(
        redis_url, bot_id, yach, upstream,
        BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="40", BRIDGE_FLUSH_MAX_WAIT_S="30",
        **APP_API,
    )  # fmt: skip
    try:
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("tell me a lot")) == 200
        await wait_for(lambda: len(yach.shown) >= 2, 15, "two pieces sent")
        bridge.kill()
        shown_at_kill = len(yach.shown)
        assert shown_at_kill < 10, "the answer was not cut: make it longer or slower"
        await spawn(env).start()
        await wait_for(lambda: EN["cut_off"] in yach.texts(), 15, "the cut-off notice")
        await asyncio.sleep(1.5)
    finally:
        await upstream.close()
    texts = yach.texts()
    assert len(upstream.started) == 1  # the journal answered; the upstream was not asked again
    assert len(texts) == len(set(texts)), texts  # no piece shows twice
    assert texts[-1] == EN["cut_off"] and texts.count(EN["cut_off"]) == 1
    answer = _squash("".join(texts[:-1]))
    assert answer and _squash(LONG_ANSWER).startswith(answer)
    assert all(shown.route == "app" for shown in yach.shown)
    sent_ids = [
        request.json()["message_id"] for request in yach.server.on("/group/robot/message/send")
    ]
    assert len(set(sent_ids)) == len(texts)  # resends reused their message_id
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0


async def test_messages_waiting_behind_a_killed_turn_lose_no_attempt(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """BRIDGE_MAX_ATTEMPTS=1: the turn that was running when the process died had its one
    attempt and is dead-lettered (the user told); the three that only waited are answered,
    in order, although each was delivered twice."""
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "q0" else 0.0).start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="1")
    try:
        bridge = await spawn(env).start()
        for index in range(4):
            assert await post_webhook(http, bridge.url, group_message(f"q{index}")) == 200
        await wait_for(lambda: len(upstream.started) == 1, 10, "the first turn started")
        await wait_for(lambda: len(bridge.events("turn_started")) == 1, 5, "logged")
        bridge.kill()
        await spawn(env).start()
        await wait_for(lambda: len(yach.shown) >= 4, 15, "four replies")
        await wait_acknowledged(redis_client, keys.inbox)
    finally:
        await upstream.close()
    assert [text.partition(".")[0] for text in yach.texts()] == [
        EN["dead_letter"].partition(".")[0],
        *(f"You said: q{index}" for index in (1, 2, 3)),
    ]
    assert upstream.started == ["q0", "q1", "q2", "q3"]
    dead = await redis_client.xrange(keys.dead)
    assert len(dead) == 1 and b"q0" in dead[0][1][b"m"]
    assert await redis_client.xlen(keys.inbox) == 0


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


async def test_a_stopped_turn_whose_process_dies_before_acknowledging_is_never_run_again(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """The process running the turn is frozen (SIGSTOP) so it misses the `/stop`, which
    another process reads and confirms; then it is SIGKILLed. The entry is claimed by the
    other process, which finds the stop recorded and acknowledges it without running it.

    With one turn slot and no queue room, the frozen process holds as many entries as it
    may (a turn, and another session's turn waiting for the slot), so it is not blocked in
    XREADGROUP, where it would swallow the `/stop` itself."""
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "stop me" else 0.0).start()
    keys = Keys(bot_id)
    env = _env(
        redis_url, bot_id, yach, upstream,
        BRIDGE_CLAIM_IDLE_S="2", BRIDGE_WORKERS="1", BRIDGE_SESSION_QUEUE_MAX="0",
    )  # fmt: skip
    try:
        frozen = await spawn(env).start()
        assert await post_webhook(http, frozen.url, group_message("stop me")) == 200
        await wait_for(lambda: len(upstream.started) == 1, 10, "the turn started")
        second = group_message("second", sender="u2", group="g2")
        assert await post_webhook(http, frozen.url, second) == 200
        assert await redis_client.xlen(keys.inbox) == 2  # a 200 means stored
        await asyncio.sleep(0.3)  # the frozen process reads it, and is full
        async with running_bridge(env) as other:
            frozen.signal(signal.SIGSTOP)
            assert (await other.post(group_message("/stop")))[0] == 200
            await wait_for(lambda: yach.texts() == [EN["stopped"]], 1.0, "the stop confirmed")
            [stop_key] = await redis_client.keys(keys.stop("*"))
            assert await redis_client.ttl(stop_key) > 86400  # kept however late the claim
            frozen.kill()
            await wait_for(lambda: len(yach.shown) >= 2, 10, "the other session answered")
            await asyncio.sleep(1.5)
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()
    assert yach.texts() == [EN["stopped"], "You said: second. (history: 0 messages)"]
    assert upstream.started == ["stop me", "second"]  # the stopped one never ran again


async def test_an_answer_sent_whole_on_the_last_attempt_is_not_dead_lettered_after_a_sigkill(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """BRIDGE_MAX_ATTEMPTS=1, app API. The answer, journalled whole, reaches the platform
    (it shows) and the process is SIGKILLed before it learns so (the send's answer held).
    The redelivery is past the limit, but the answer exists in full (SPEC §6: a complete
    answer never confirmed sent is resent, without a notice): it is sent again under its
    message_id, which shows nothing more, and acknowledged. It used to be dead-lettered,
    the user told "failed repeatedly and was dropped; please resend" under the answer."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="1", **APP_API)
    try:
        yach.hold_next(1)
        bridge = await spawn(env).start()
        assert await post_webhook(http, bridge.url, group_message("hello")) == 200
        await wait_for(lambda: len(yach.held) == 1, 10, "the answer shown, its send held")
        bridge.kill()
        yach.held[0].set()
        bridge = await spawn(env).start()
        await wait_for(lambda: bridge.events("turn_replayed"), 10, "the answer sent again")
        await wait_acknowledged(redis_client, keys.inbox)
        await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
    assert len(yach.server.on("/group/robot/message/send")) == 2  # the same message_id
    assert len(upstream.started) == 1
    assert await redis_client.xlen(keys.dead) == 0


async def test_an_answer_a_replay_showed_whole_after_a_refused_send_is_not_dead_lettered(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """BRIDGE_MAX_ATTEMPTS=2, app API. The IM refuses every try of the answer's send on the
    first attempt; the second replays it: it shows, and the process is SIGKILLed before it
    learns so. The third delivery is past the limit, and the answer exists whole: it is sent
    again under its message_id (nothing more shows) and acknowledged. The first attempt's
    refusal used to stay in the journal, and it was dead-lettered: the user read "failed
    repeatedly and was dropped; please resend" under the whole answer."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="2", **APP_API)
    try:
        yach.fail_next(500, times=SEND_TRIES)  # every try of the first attempt
        async with running_bridge(env, send_backoff_s=0.01) as first:
            assert (await first.post(group_message("hello")))[0] == 200
            await wait_for(lambda: not yach.failures, 10, "the answer's sends refused")
            await asyncio.sleep(0.3)  # the turn lets the entry go
        yach.hold_next(1)
        bridge = await spawn(env).start()
        await wait_for(lambda: len(yach.held) == 1, 10, "the replay shown, its send held")
        bridge.kill()
        yach.held[0].set()
        await spawn(env).start()
        await wait_acknowledged(redis_client, keys.inbox)
        await asyncio.sleep(0.5)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
    assert len(upstream.started) == 1
    assert await redis_client.xlen(keys.dead) == 0
