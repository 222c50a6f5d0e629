"""The session scripts on a real Redis: starting a turn in one round trip, and a piece's
confirmation carried by the next journal write."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from bridge.config import Rate
from bridge.interfaces import HistoryTurn
from bridge.sessions import JOURNAL_TTL_S, EntryGone, JournalPiece, LockLost, Sessions
from bridge.store import Keys

SESSION = "yach:g:g1:u:u1"


async def _store(redis: aioredis.Redis, keys: Keys, *, queued: bool = True) -> str:
    """An inbox entry of the session, queued as the webhook's put queues it."""
    entry_id = (await redis.xadd(keys.inbox, {"m": "{}", "k": "turn", "s": SESSION})).decode()
    if queued:
        await redis.rpush(keys.queue(SESSION), entry_id)
    return entry_id


async def _journal(redis: aioredis.Redis, keys: Keys, entry_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.journal(entry_id))
    return {key.decode(): value.decode() for key, value in raw.items()}


def _piece(index: int, text: str) -> JournalPiece:
    return JournalPiece(index, text, f"id{index}", mention=False, sent=False)


async def test_start_takes_the_lock_at_the_head_only(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    first = await _store(redis_client, keys)
    second = await _store(redis_client, keys)

    behind = await sessions.start(SESSION, second, with_history=True)
    assert (behind.ahead, behind.lock, behind.attempt) == (1, "", 0)

    head = await sessions.start(SESSION, first, with_history=True)
    assert head.ahead == 0 and head.lock.endswith(f":{first}") and head.attempt == 1
    assert (await redis_client.get(keys.lock(SESSION))).decode() == head.lock
    assert head.journal.pieces == [] and not head.stopped

    # at the head, but the lock is taken
    held = await sessions.start(SESSION, first, with_history=True)
    assert (held.ahead, held.lock) == (0, "")


async def test_a_start_made_again_under_its_name_gets_what_it_took(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A try whose answer was lost, made again under its name (`call`), gets the lock it
    took and its attempt, counted once; what the turn reads is read again, as it is now. A
    try under a new name finds the session locked."""
    entry = await _store(redis_client, keys)
    call = sessions.new_call()
    first = await sessions.start(SESSION, entry, with_history=True, call=call)
    await sessions.journal_piece(SESSION, entry, _piece(0, "Hello, \u4e16\u754c. "), first.lock)

    again = await sessions.start(SESSION, entry, with_history=True, call=call)

    assert (again.ahead, again.lock, again.attempt, again.stopped) == (0, first.lock, 1, False)
    assert [p.text for p in again.journal.pieces] == ["Hello, \u4e16\u754c. "]
    assert (await _journal(redis_client, keys, entry))["attempts"] == "1"
    other = await sessions.start(SESSION, entry, with_history=True)
    assert (other.ahead, other.lock) == (0, "")


async def test_start_counts_attempts_and_reads_the_journal_and_the_stop_key(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    entry = await _store(redis_client, keys)
    first = await sessions.start(SESSION, entry, with_history=True)
    await sessions.journal_piece(SESSION, entry, _piece(0, "Hello. "), first.lock)
    await sessions.journal_sent(entry, 0)
    await sessions.journal_piece(SESSION, entry, _piece(1, "World."), first.lock)
    await sessions.release(SESSION, first.lock)
    await redis_client.set(keys.stop(SESSION), entry)

    again = await sessions.start(SESSION, entry, with_history=True)

    assert again.attempt == 2 and again.stopped
    assert [(p.index, p.text, p.sent) for p in again.journal.pieces] == [
        (0, "Hello. ", True),
        (1, "World.", False),
    ]
    assert not again.journal.complete


async def test_start_counts_the_message_against_its_senders_limit_before_anything_else(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    limit = ("u1", Rate(2, 60.0))
    first, second, third = [await _store(redis_client, keys) for _ in range(3)]
    assert (await sessions.start(SESSION, first, with_history=True, sender_rate=limit)).lock
    waiting = await sessions.start(SESSION, second, with_history=True, sender_rate=limit)
    assert (waiting.ahead, waiting.over_rate) == (1, False)
    over = await sessions.start(SESSION, third, with_history=True, sender_rate=limit)
    assert (over.ahead, over.lock, over.over_rate) == (None, "", True)
    assert int(await redis_client.get(keys.user_rate("u1"))) == 3
    assert 0 < await redis_client.ttl(keys.user_rate("u1")) <= 60
    # without a limit (a later try, a redelivery) nothing is counted
    await sessions.start(SESSION, third, with_history=True)
    assert int(await redis_client.get(keys.user_rate("u1"))) == 3


async def test_start_puts_back_an_entry_missing_from_its_queue_and_drops_an_acked_one(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    earlier = await _store(redis_client, keys, queued=False)
    later = await _store(redis_client, keys)

    # put back ahead of the later one
    assert (await sessions.start(SESSION, earlier, with_history=True)).lock
    assert [e.decode() for e in await redis_client.lrange(keys.queue(SESSION), 0, -1)] == [
        earlier,
        later,
    ]
    await redis_client.xdel(keys.inbox, later)
    await redis_client.lrem(keys.queue(SESSION), 1, later)
    assert (await sessions.start(SESSION, later, with_history=True)).ahead is None


async def test_a_confirmation_rides_with_the_next_journal_write_even_when_fenced_out(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    await sessions.journal_piece(SESSION, entry, _piece(0, "One. "), lock)
    await sessions.journal_piece(SESSION, entry, _piece(1, "Two. "), lock, sent=0)
    journal = await _journal(redis_client, keys, entry)
    assert journal["s:0"] == "1" and "s:1" not in journal
    assert json.loads(journal["p:1"])["text"] == "Two. "

    await redis_client.set(keys.lock(SESSION), "999:other")  # taken over
    with pytest.raises(LockLost):
        await sessions.journal_complete(SESSION, entry, lock, sent=1)
    journal = await _journal(redis_client, keys, entry)
    assert journal["s:1"] == "1"  # it was shown: the confirmation holds
    assert "complete" not in journal  # the fenced write was refused


async def test_a_turns_record_completes_its_journal_and_confirms_its_last_piece(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A finished turn's record is the journal write after its last piece: it marks the
    journal complete (a replay adds no cut-off notice) and the last piece sent, in the same
    round trip. Fenced out, only the confirmation holds, as in a journal write."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    await sessions.journal_piece(SESSION, entry, _piece(0, "One. "), lock)

    assert await sessions.save(SESSION, lock, {}, entry_id=entry, sent=0, turn_of="openai")
    journal = await _journal(redis_client, keys, entry)
    assert (journal["s:0"], journal["complete"], journal["recorded"]) == ("1", "1", "1")

    other = await _store(redis_client, keys)
    await redis_client.set(keys.lock(SESSION), "999:other")  # taken over
    await redis_client.hset(keys.journal(other), "p:0", json.dumps({"text": "Two."}))
    assert not await sessions.save(SESSION, lock, {}, entry_id=other, sent=0, turn_of="openai")
    journal = await _journal(redis_client, keys, other)
    assert journal["s:0"] == "1"  # it was shown: the confirmation holds
    assert "complete" not in journal and "recorded" not in journal
    with pytest.raises(ValueError, match="journal"):
        await sessions.save(SESSION, lock, {}, sent=0)


async def test_renew_all_reports_the_lost_lock_not_its_session(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    first = await _store(redis_client, keys)
    second = await _store(redis_client, keys)
    old = (await sessions.start(SESSION, first, with_history=True)).lock
    await redis_client.lrem(keys.queue(SESSION), 1, first)
    await sessions.release(SESSION, old)  # the first turn's ack lets go of the session
    new = (await sessions.start(SESSION, second, with_history=True)).lock

    lost = await sessions.renew_all([(SESSION, old), (SESSION, new)])

    assert lost == {(SESSION, old)}
    assert (await redis_client.get(keys.lock(SESSION))).decode() == new


async def test_start_reads_the_session_and_its_history_when_asked(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    first = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, first, with_history=True)).lock
    exchange = HistoryTurn("What is up?", "The sky.")
    assert await sessions.save(SESSION, lock, {"upstream": "openai", "turns": 1}, exchange=exchange)
    await sessions.release(SESSION, lock)
    await redis_client.lrem(keys.queue(SESSION), 1, first)
    second = await _store(redis_client, keys)
    third = await _store(redis_client, keys)

    with_history = await sessions.start(SESSION, second, with_history=True)
    await sessions.release(SESSION, with_history.lock)
    await redis_client.lrem(keys.queue(SESSION), 1, second)
    without = await sessions.start(SESSION, third, with_history=False)

    assert (with_history.state.upstream, with_history.state.turns) == ("openai", 1)
    assert with_history.history == (exchange,)
    assert without.state.turns == 1 and without.history == ()


async def test_a_turns_record_counts_it_and_drops_another_upstreams_conversation(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The record reads and writes the session in its one script: `turns` + 1, the upstream
    named, and a conversation kept for another upstream (one without conversations, such as
    OpenAI, after Coze) dropped; its own upstream's is kept."""
    coze = {"upstream": "coze", "conversation": json.dumps({"conversation_id": "coze-7"}),
            "created_at": "1", "turns": "3"}  # fmt: skip
    await redis_client.hset(keys.session(SESSION), mapping=coze)
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=False)).lock

    assert await sessions.save(SESSION, lock, {}, created_at=50, turn_of="coze")
    state = await redis_client.hgetall(keys.session(SESSION))
    assert (state[b"turns"], state[b"created_at"]) == (b"4", b"1")
    assert json.loads(state[b"conversation"]) == {"conversation_id": "coze-7"}

    assert await sessions.save(SESSION, lock, {"last_active": 60}, turn_of="openai")
    state = await redis_client.hgetall(keys.session(SESSION))
    assert (state[b"upstream"], state[b"turns"], state[b"conversation"]) == (b"openai", b"5", b"{}")
    assert state[b"last_active"] == b"60"

    assert not await sessions.save(SESSION, "not-the-lock", {}, turn_of="openai")
    assert (await redis_client.hget(keys.session(SESSION), "turns")) == b"5"


async def test_a_conversation_saved_under_a_lost_lock_leaves_no_session_behind(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The save is fenced as a whole: a refused one writes nothing, not even `created_at`
    (which, written alone, was a session hash with no expiry)."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    refused = await sessions.save_conversation(SESSION, "not-the-lock", "dify", {"c": "1"}, now=5)
    assert not refused
    assert not await redis_client.exists(keys.session(SESSION))

    assert await sessions.save_conversation(SESSION, lock, "dify", {"c": "1"}, now=10)
    assert await sessions.save_conversation(SESSION, lock, "dify", {"c": "2"}, now=20)
    state = await redis_client.hgetall(keys.session(SESSION))
    assert state[b"created_at"] == b"10" and state[b"last_active"] == b"20"
    assert json.loads(state[b"conversation"]) == {"c": "2"}
    assert 0 < await redis_client.ttl(keys.session(SESSION)) <= 3600


async def test_a_refresh_is_fenced_and_makes_no_session(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The refresh of a failed turn: refused under a lost lock; on no session, nothing."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    assert await sessions.refresh(SESSION, lock, now=5)
    assert not await redis_client.exists(keys.session(SESSION))

    await redis_client.hset(keys.session(SESSION), mapping={"last_active": "1", "turns": "2"})
    await redis_client.expire(keys.session(SESSION), 10)
    assert not await sessions.refresh(SESSION, "not-the-lock", now=5)
    assert await redis_client.hget(keys.session(SESSION), "last_active") == b"1"
    assert await sessions.refresh(SESSION, lock, now=5)
    state = await redis_client.hgetall(keys.session(SESSION))
    assert state == {b"last_active": b"5", b"turns": b"2"}
    assert 3590 <= await redis_client.ttl(keys.session(SESSION)) <= 3600


async def test_a_session_ttl_in_decimal_seconds_is_kept_exactly(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    """BRIDGE_SESSION_TTL_S takes decimals (SPEC §2): 2.5 s is not cut to 2 s."""
    sessions = Sessions(redis_client, keys, ttl_s=2.5, history_turns=5, lock_ttl_s=10)
    entry = await _store(redis_client, keys)
    start = await sessions.start(SESSION, entry, with_history=True)
    exchange = HistoryTurn("q", "a")
    assert await sessions.save(SESSION, start.lock, {"turns": 1}, exchange=exchange)
    for key in (keys.session(SESSION), keys.history(SESSION)):
        assert 2000 < await redis_client.pttl(key) <= 2500


async def test_the_fence_of_a_session_expires_as_a_journal_does(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """Every session ever seen kept its fence for ever. Each start sets it to expire with
    the journals (a release or an acknowledgement keeps that): no token of it can be in use
    so long after the session's last start."""
    entry = await _store(redis_client, keys)
    started = await sessions.start(SESSION, entry, with_history=True)
    await sessions.release(SESSION, started.lock)
    ttl = await redis_client.ttl(keys.fence(SESSION))
    assert JOURNAL_TTL_S - 5 < ttl <= JOURNAL_TTL_S


async def test_a_reset_fences_out_a_stalled_turn_whose_lock_had_expired(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The process of a running turn stalls (SIGSTOP, a partition) past its lock's life;
    `/reset` finds no holder, so it waits for none, and forgets the session. The stalled
    turn then goes on: it must not take its expired lock back (its token is still the
    fence's) to save the old conversation again, nor journal — and so send — a piece."""
    entry = await _store(redis_client, keys)
    turn = await sessions.start(SESSION, entry, with_history=True)
    assert await sessions.save_conversation(SESSION, turn.lock, "openai", {"id": "old"})
    await redis_client.pexpire(keys.lock(SESSION), 1)
    await asyncio.sleep(0.05)  # the lock expired: nobody holds the session
    command = await _store(redis_client, keys, queued=False)
    # no holder, but the turn at the head of the queue has started: it is the one stopped
    assert await sessions.stop(SESSION, command, ttl_s=60) == entry
    await sessions.forget(SESSION, command)

    assert not await sessions.save_conversation(SESSION, turn.lock, "openai", {"id": "old"})
    with pytest.raises(LockLost):
        await sessions.journal_piece(SESSION, entry, _piece(0, "more of the old answer"), turn.lock)
    assert (await sessions.load(SESSION)).conversation is None


async def test_overlapping_resets_hold_the_session_until_the_last_one_ends(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """Two `/reset`s of one session (two command entries, two workers) overlap: the one that
    ends first must not let turns start while the other still waits to forget."""
    entry = await _store(redis_client, keys)
    async with sessions.resetting(SESSION, "8-0", hold_s=30):
        async with sessions.resetting(SESSION, "9-0", hold_s=30):
            pass
        blocked = await sessions.start(SESSION, entry, with_history=True)
        assert (blocked.ahead, blocked.lock) == (0, "")
    started = await sessions.start(SESSION, entry, with_history=True)
    assert started.lock.endswith(f":{entry}")


async def test_a_reset_done_ends_the_holds_its_dead_deliveries_left(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A `/reset` delivery whose process died mid-way leaves its hold of the session (its
    token, `<command entry>:…`). The delivery that forgets the session after it ends that
    hold with its own — and so does a delivery that finds the session forgotten (the dead
    one died after its forget) — so the session's turns start once the reset is confirmed;
    another command's hold stays."""
    entry = await _store(redis_client, keys)
    command = await _store(redis_client, keys, queued=False)
    other = await _store(redis_client, keys, queued=False)
    mark = keys.resetting(SESSION)
    async with sessions.resetting(SESSION, other, hold_s=30):  # another reset runs
        await redis_client.sadd(mark, f"{command}:a delivery that died")
        assert not await sessions.was_reset(SESSION, command)
        async with sessions.resetting(SESSION, command, hold_s=30):  # its redelivery
            await sessions.forget(SESSION, command)
        [left] = await redis_client.smembers(mark)
        assert left.decode().startswith(f"{other}:")  # still resetting: no turn starts
        assert (await sessions.start(SESSION, entry, with_history=True)).lock == ""

    await redis_client.sadd(mark, f"{other}:a delivery that died")
    await sessions.forget(SESSION, other)  # its last step before it died
    assert await sessions.was_reset(SESSION, other)  # its redelivery finds it done
    assert await redis_client.exists(mark) == 0
    assert (await sessions.start(SESSION, entry, with_history=True)).lock.endswith(entry)


async def test_a_stopped_turn_clears_only_its_own_stop_key(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The key of a `/stop` sent for the next turn meanwhile stays for that turn."""
    await redis_client.set(keys.stop(SESSION), "2-0")
    await sessions.clear_stop(SESSION, "1-0")
    assert await redis_client.get(keys.stop(SESSION)) == b"2-0"
    await sessions.clear_stop(SESSION, "2-0")
    assert await redis_client.get(keys.stop(SESSION)) is None


async def test_a_command_delivery_that_stalled_while_another_carried_it_out_does_nothing(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """Two deliveries of one `/reset` (the first one's process stalled past the claim): the
    one that forgets second forgets nothing — the turns after the reset may have begun the
    new conversation — and once the command was acknowledged, a late stop or forget finds
    its entry gone from the inbox and does nothing either."""
    entry = await _store(redis_client, keys)
    turn = await sessions.start(SESSION, entry, with_history=True)
    assert await sessions.save_conversation(SESSION, turn.lock, "openai", {"id": "old"})
    await sessions.release(SESSION, turn.lock)
    command = await _store(redis_client, keys, queued=False)
    assert await sessions.stop(SESSION, command, ttl_s=60) == entry  # let go, in progress
    forgotten = await sessions.forget(SESSION, command)
    assert forgotten is not None and forgotten.conversation == {"id": "old"}

    turn = await sessions.start(SESSION, entry, with_history=True)  # a turn after the reset
    assert await sessions.save_conversation(SESSION, turn.lock, "openai", {"id": "new"})
    assert await sessions.forget(SESSION, command) is None  # the stalled delivery
    assert (await sessions.load(SESSION)).conversation == {"id": "new"}

    await redis_client.xdel(keys.inbox, command)  # acknowledged by the other delivery
    await redis_client.delete(keys.journal(command))
    with pytest.raises(EntryGone):
        await sessions.stop(SESSION, command, ttl_s=60)  # nor the turn holding it now
    with pytest.raises(EntryGone):
        await sessions.forget(SESSION, command)
    assert await redis_client.get(keys.lock(SESSION)) == turn.lock.encode()
    assert (await sessions.load(SESSION)).conversation == {"id": "new"}


async def test_stop_with_no_holder_names_the_started_turn_at_the_head_not_a_waiting_one(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A turn that let go of the session to be redelivered (a failed send, a drain, its
    process dead) is still in progress: `/stop` is for it. A question that only waits at
    the head (never started) is not in progress: nothing to stop."""
    waiting = await _store(redis_client, keys)
    command = await _store(redis_client, keys, queued=False)
    assert await sessions.stop(SESSION, command, ttl_s=60) is None
    started = await sessions.start(SESSION, waiting, with_history=True)
    await sessions.release(SESSION, started.lock)
    again = await _store(redis_client, keys, queued=False)
    assert await sessions.stop(SESSION, again, ttl_s=60) == waiting
    assert (await sessions.start(SESSION, waiting, with_history=True)).stopped


async def test_a_holder_takes_back_its_lock_that_merely_expired(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A Redis outage or a stall let the lock expire while nobody else took the session:
    its token is still the fence's, so the turn goes on (and its lock is set again)."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    await redis_client.delete(keys.lock(SESSION))  # as expired

    await sessions.journal_piece(SESSION, entry, _piece(0, "Still mine. "), lock)

    assert (await redis_client.get(keys.lock(SESSION))).decode() == lock
    assert await redis_client.pttl(keys.lock(SESSION)) > 0
    assert await sessions.renew(SESSION, lock)


async def test_a_released_token_can_never_write_again(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """Releasing bumps the fence: the token cannot take the free lock back, as an expired
    one would be, to save or to journal."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    await sessions.release(SESSION, lock)

    assert not await sessions.renew(SESSION, lock)
    assert not await sessions.save_conversation(SESSION, lock, "dify", {"c": "1"})
    with pytest.raises(LockLost):
        await sessions.journal_piece(SESSION, entry, _piece(0, "late"), lock)
    assert not await redis_client.exists(keys.lock(SESSION))


async def test_the_lock_lives_at_least_as_long_as_the_claim(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """`lock_ttl_s` is BRIDGE_CLAIM_IDLE_S (10 s in the fixture): no other turn of the
    session can start while the entry's worker is alive (SPEC §6)."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    assert 9000 < await redis_client.pttl(keys.lock(SESSION)) <= 10_000
    await redis_client.pexpire(keys.lock(SESSION), 100)
    assert await sessions.renew(SESSION, lock)
    assert 9000 < await redis_client.pttl(keys.lock(SESSION)) <= 10_000


async def test_a_turn_is_recorded_once_however_often_its_record_is_saved(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A replay (or a retry) of a turn whose record was saved before it was acknowledged
    adds no second history row and counts no second turn."""
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    exchange = HistoryTurn("q", "a")
    for _ in range(2):
        assert await sessions.save(SESSION, lock, {"turns": 1}, exchange=exchange, entry_id=entry)
        assert await sessions.recorded(entry)
    assert await redis_client.llen(keys.history(SESSION)) == 1


async def test_history_keeps_and_reads_exactly_the_last_history_turns(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    """BRIDGE_HISTORY_TURNS=2: the upstream gets the last two turns, and no more are kept."""
    sessions = Sessions(redis_client, keys, ttl_s=3600, history_turns=2, lock_ttl_s=10)
    entry = await _store(redis_client, keys)
    lock = (await sessions.start(SESSION, entry, with_history=True)).lock
    turns = [HistoryTurn(f"q{n}", f"a{n}") for n in range(3)]
    for turn in turns:
        assert await sessions.save(SESSION, lock, {}, exchange=turn)
    await sessions.release(SESSION, lock)

    again = await sessions.start(SESSION, entry, with_history=True)

    assert again.history == tuple(turns[1:])
    assert await redis_client.llen(keys.history(SESSION)) == 2


async def test_an_acknowledged_entry_never_starts_even_with_its_session_free(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """An entry gone from the inbox (another worker acknowledged it) takes no lock, so its
    turn is not run twice, and is not counted against its sender's limit."""
    entry = await _store(redis_client, keys)
    await redis_client.xdel(keys.inbox, entry)
    await redis_client.lrem(keys.queue(SESSION), 1, entry)

    gone = await sessions.start(SESSION, entry, with_history=True, sender_rate=("u1", Rate(5, 60)))

    assert (gone.ahead, gone.lock, gone.over_rate) == (None, "", False)
    assert not await redis_client.exists(keys.lock(SESSION))
    assert not await redis_client.exists(keys.user_rate("u1"))


async def test_the_senders_window_runs_from_their_first_message_not_their_last(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """`N/SECONDS` counts the messages of a window that a message opens: later messages
    inside it do not push its end back (a steady sender would otherwise never get a new
    window)."""
    limit = ("u1", Rate(5, 60.0))
    first, second = await _store(redis_client, keys), await _store(redis_client, keys)
    await sessions.start(SESSION, first, with_history=True, sender_rate=limit)
    await redis_client.pexpire(keys.user_rate("u1"), 30_000)  # half the window has passed

    await sessions.start(SESSION, second, with_history=True, sender_rate=limit)

    assert int(await redis_client.get(keys.user_rate("u1"))) == 2
    assert await redis_client.pttl(keys.user_rate("u1")) <= 30_000


async def test_a_stop_key_of_another_entry_does_not_stop_a_turn(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The stop key of a turn that finished before its `/stop` reached it lingers: the
    session's next turn runs all the same."""
    entry = await _store(redis_client, keys)
    await redis_client.set(keys.stop(SESSION), "1-1")
    started = await sessions.start(SESSION, entry, with_history=True)
    assert started.lock and not started.stopped
