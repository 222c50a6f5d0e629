"""The replay of a turn's journal (SPEC §6), run by the bridge's own TurnRunner on a real
Redis and the fake Yach's custom robot URL (which does not deduplicate: a piece sent twice
shows twice). The bridge's worker is drained first, so that these tests alone run the entry.

A replay sends only what was not confirmed, fenced by the session lock before each send;
its cut-off notice is journalled as the answer's end, so a replay of the replay (its process
died before the ack) adds no second notice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.inbox import Entry, EntryKind, Inbox
from bridge.interfaces import InboundMessage, Sender
from bridge.messages import MESSAGES
from bridge.relay import Outcome, TurnRunner
from bridge.sessions import JournalPiece, LockLost, Sessions
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import RunningBridge, bridge_env, openai_env, running_bridge, wait_until

EN = MESSAGES["en"]
SESSION = "yach:g:g1:u:u1"
PIECES = ("First part. ", "Second part.")


@pytest.fixture
async def bridge(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI
) -> AsyncIterator[RunningBridge]:
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_CLAIM_IDLE_S="60", BRIDGE_REPLY_MODE="stream",
        BRIDGE_FLUSH_MIN_CHARS="1", BRIDGE_FLUSH_MAX_WAIT_S="30",
    )  # fmt: skip
    async with running_bridge(env) as running:
        worker = running.bridge.worker
        assert worker is not None
        await wait_until(lambda: worker.healthy)
        await worker.drain(1)  # its loops stop; its runner and outbox stay open
        yield running


def _parts(running: RunningBridge) -> tuple[TurnRunner, Sessions]:
    worker = running.bridge.worker
    assert worker is not None
    return worker.runner, worker.sessions


async def _entry(redis: aioredis.Redis, keys: Keys) -> Entry:
    """A question stored and read by a worker (this test) as the bridge stores it."""
    inbox = Inbox(redis, keys, "test")
    message = InboundMessage(im_msg_id="m1", text="tell me", sender=Sender("u1", "T", "W1"),
                             conversation_id="g1", is_direct=False)  # fmt: skip
    await inbox.put(message, EntryKind.TURN, SESSION)
    [entry] = await inbox.read(count=1, block_ms=None)
    return entry


async def _journalled(sessions: Sessions, entry: Entry, *, sent: int, complete: bool) -> None:
    """The answer's pieces journalled by an earlier attempt, the first `sent` confirmed;
    that attempt's lock released (its process let go, or died and the lock expired)."""
    lock = (await sessions.start(SESSION, entry.entry_id, with_history=False)).lock
    for index, text in enumerate(PIECES):
        piece = JournalPiece(index, text, f"piece-{index}", mention=index == 0, sent=False)
        last = complete and index == len(PIECES) - 1
        await sessions.journal_piece(SESSION, entry.entry_id, piece, lock, complete=last)
        if index < sent:
            await sessions.journal_sent(entry.entry_id, index)
    await sessions.release(SESSION, lock)


async def test_a_replay_killed_before_its_ack_adds_no_second_cut_off_notice(
    bridge: RunningBridge, redis_client: aioredis.Redis, bot_id: str, yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:  # fmt: skip
    runner, sessions = _parts(bridge)
    entry = await _entry(redis_client, Keys(bot_id))
    await _journalled(sessions, entry, sent=1, complete=False)

    for _ in range(2):  # the second: the same entry redelivered, as its ack never came
        start = await sessions.start(SESSION, entry.entry_id, with_history=False)
        assert start.lock and start.journal.pieces
        assert await runner.run(entry, start) is Outcome.REPLAYED
        await sessions.release(SESSION, start.lock)

    assert yach.texts() == ["Second part.", EN["cut_off"]]
    assert upstream.bodies == []  # never asked again


async def test_a_replay_that_lost_its_session_sends_nothing(
    bridge: RunningBridge, redis_client: aioredis.Redis, bot_id: str, yach: FakeYach
) -> None:
    """Its lock was taken over (a stall past it): the new holder may have acknowledged the
    entry without these pieces, so none of them shows."""
    keys = Keys(bot_id)
    runner, sessions = _parts(bridge)
    entry = await _entry(redis_client, keys)
    await _journalled(sessions, entry, sent=0, complete=True)
    start = await sessions.start(SESSION, entry.entry_id, with_history=False)
    assert start.lock and [p.sent for p in start.journal.pieces] == [False, False]
    await redis_client.set(keys.lock(SESSION), "999:another-entry")  # taken over

    with pytest.raises(LockLost):
        await runner.run(entry, start)
    assert yach.shown == []


async def test_an_answer_sent_whole_before_the_process_died_gets_no_cut_off_notice(
    bridge: RunningBridge, redis_client: aioredis.Redis, bot_id: str, yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:  # fmt: skip
    """Its last piece went out before the stream's end (nothing was left to flush): the end
    still marks the journal complete, so a redelivery (no ack came) sends nothing more."""
    upstream.answer = lambda _body: "One sentence. Two sentence. "  # each flushed as it ends
    runner, sessions = _parts(bridge)
    entry = await _entry(redis_client, Keys(bot_id))
    first = await sessions.start(SESSION, entry.entry_id, with_history=False)
    assert await runner.run(entry, first) is Outcome.COMPLETED
    shown = yach.texts()
    await sessions.release(SESSION, first.lock)

    again = await sessions.start(SESSION, entry.entry_id, with_history=False)
    assert again.journal.complete
    assert await runner.run(entry, again) is Outcome.REPLAYED

    assert yach.texts() == shown and EN["cut_off"] not in shown
    assert len(upstream.bodies) == 1


async def test_a_failed_turn_replayed_is_not_recorded_as_an_answer(
    bridge: RunningBridge, redis_client: aioredis.Redis, bot_id: str, yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:  # fmt: skip
    """The upstream failed: its one notice is the turn's last piece, and the turn is not
    recorded. Redelivered (no ack came), the replay sends nothing more and records nothing
    either: the notice did not become the session's history (asked again next turn as if the
    AI had said it), nor the failure a counted turn."""
    keys = Keys(bot_id)
    upstream.statuses = [503] * 5  # more than the retries
    runner, sessions = _parts(bridge)
    entry = await _entry(redis_client, keys)
    first = await sessions.start(SESSION, entry.entry_id, with_history=False)
    assert await runner.run(entry, first) is Outcome.FAILED
    await sessions.release(SESSION, first.lock)

    again = await sessions.start(SESSION, entry.entry_id, with_history=False)
    assert again.journal.complete and again.journal.failed
    assert await runner.run(entry, again) is Outcome.REPLAYED

    assert yach.texts() == [EN["upstream_unavailable"]]
    assert await redis_client.hget(keys.session(SESSION), "turns") is None
    assert await redis_client.llen(keys.history(SESSION)) == 0
