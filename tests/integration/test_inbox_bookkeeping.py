"""What the inbox's ack, keep and claim scripts leave behind, on a real Redis: an ack drops
the entry with its queue place, journal and lock (and fences the released token out); keep
never takes an entry back from the worker that claimed it; a claim walks the whole pending
list and tells how often each entry was delivered."""

from __future__ import annotations

import redis.asyncio as aioredis

from bridge.inbox import Acked, Entry, EntryKind, Inbox
from bridge.interfaces import InboundMessage, Sender
from bridge.sessions import JournalPiece, Sessions
from bridge.store import GROUP, Keys

SESSION = "yach:g:g1:u:u1"


def message(msg_id: str) -> InboundMessage:
    return InboundMessage(
        im_msg_id=msg_id,
        text=f"question {msg_id}",
        sender=Sender("u1", "Tester", "W001"),
        conversation_id="g1",
        is_direct=False,
        dedupe_key="id:" + msg_id,
    )


async def consumer(redis: aioredis.Redis, keys: Keys, name: str) -> Inbox:
    inbox = Inbox(redis, keys, name)
    await inbox.ensure_group()
    return inbox


async def stored(inbox: Inbox, *msg_ids: str) -> list[Entry]:
    """Turns of the session, stored and read (first delivery) by `inbox`."""
    for msg_id in msg_ids:
        await inbox.put(message(msg_id), EntryKind.TURN, SESSION)
    return await inbox.read(count=len(msg_ids) + 1, block_ms=None)


async def owner(redis: aioredis.Redis, keys: Keys, entry_id: str) -> str | None:
    rows = await redis.xpending_range(keys.inbox, GROUP, min=entry_id, max=entry_id, count=1)
    return rows[0]["consumer"].decode() if rows else None


async def test_an_ack_drops_the_entry_its_queue_place_journal_and_lock_for_good(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    inbox = await consumer(redis_client, keys, "a")
    [entry] = await stored(inbox, "m1")
    lock = (await sessions.start(SESSION, entry.entry_id, with_history=False)).lock
    piece = JournalPiece(0, "An answer.", "id0", mention=True, sent=False)
    await sessions.journal_piece(SESSION, entry.entry_id, piece, lock, complete=True)

    assert await inbox.ack(entry, lock) is Acked.QUEUE_EMPTY

    assert await redis_client.xlen(keys.inbox) == 0
    assert (await redis_client.xpending(keys.inbox, GROUP))["pending"] == 0
    assert await redis_client.llen(keys.queue(SESSION)) == 0
    assert not await redis_client.exists(keys.journal(entry.entry_id))  # not kept 7 days
    assert not await redis_client.exists(keys.lock(SESSION))
    # The released token can never write again: not even take its expired lock back.
    assert not await sessions.renew(SESSION, lock)
    assert not await redis_client.exists(keys.lock(SESSION))


async def test_an_ack_says_whether_entries_still_wait_for_the_session(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    """The worker wakes the session's next turn only when one waits: a wake for nobody
    would be published to every process of the bot after every turn."""
    inbox = await consumer(redis_client, keys, "a")
    first, second = await stored(inbox, "m1", "m2")
    lock = (await sessions.start(SESSION, first.entry_id, with_history=False)).lock

    assert await inbox.ack(first, lock) is Acked.OTHERS_WAIT

    lock = (await sessions.start(SESSION, second.entry_id, with_history=False)).lock
    assert lock
    assert await inbox.ack(second, lock) is Acked.QUEUE_EMPTY


async def test_an_ack_of_an_entry_acknowledged_elsewhere_says_so_and_touches_only_its_lock(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    """A stalled process acknowledging an entry that the worker which took it over has
    already answered and acknowledged: the ack said QUEUE_EMPTY, so the stalled process
    counted the turn as its own (`turns_total` twice for one message) and, dead-lettering,
    would add a second dead letter. It says ALREADY and changes nothing but its own lock,
    which it still releases."""
    stalled = await consumer(redis_client, keys, "a")
    first, second = await stored(stalled, "m1", "m2")
    lock = (await sessions.start(SESSION, first.entry_id, with_history=False)).lock
    taker = await consumer(redis_client, keys, "b")
    await redis_client.xclaim(keys.inbox, GROUP, "b", 0, [first.entry_id])
    assert await taker.ack(first) is Acked.OTHERS_WAIT  # (its own lock: none, here)

    assert await stalled.dead_letter(first, "3 attempts", lock) is Acked.ALREADY

    assert not await redis_client.exists(keys.lock(SESSION))  # ours, released
    assert await redis_client.xlen(keys.dead) == 0
    assert await redis_client.lrange(keys.queue(SESSION), 0, -1) == [second.entry_id.encode()]
    assert await owner(redis_client, keys, second.entry_id) == "a"


async def test_an_ack_sent_again_after_its_answer_was_lost_finds_its_own_acknowledgement(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    """An ack whose answer was lost (a connection cut after Redis ran it) is sent again, by
    the client's retries or the worker's, and meanwhile the session's next turn has taken
    the lock the first try released: the ack must not take its own acknowledgement for
    another worker's (the turn would go uncounted, logged as lost). Found by review: told
    apart by the fence alone, it was."""
    inbox = await consumer(redis_client, keys, "a")
    first, second = await stored(inbox, "m1", "m2")
    lock = (await sessions.start(SESSION, first.entry_id, with_history=False)).lock
    assert await inbox.ack(first, lock) is Acked.OTHERS_WAIT  # ran; its answer lost
    newer = (await sessions.start(SESSION, second.entry_id, with_history=False)).lock
    assert newer

    assert await inbox.ack(first, lock) is Acked.OTHERS_WAIT  # the same ack, sent again
    assert (await redis_client.get(keys.lock(SESSION))).decode() == newer  # left alone
    assert await owner(redis_client, keys, second.entry_id) == "a"


async def test_an_ack_that_finds_its_entry_claimed_elsewhere_lets_its_own_lock_go(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    """A stalled turn whose record took its expired lock back just before the worker that
    claimed its entry tried to start it: the ack leaves the entry to that worker, and
    releases the lock, which that worker would otherwise wait a whole BRIDGE_CLAIM_IDLE_S
    for (found by review)."""
    stalled = await consumer(redis_client, keys, "a")
    [entry] = await stored(stalled, "m1")
    lock = (await sessions.start(SESSION, entry.entry_id, with_history=False)).lock
    await redis_client.xclaim(keys.inbox, GROUP, "b", 0, [entry.entry_id])

    assert await stalled.ack(entry, lock) is Acked.NOT_OURS

    assert not await redis_client.exists(keys.lock(SESSION))
    assert await owner(redis_client, keys, entry.entry_id) == "b"  # still pending, the other's


async def test_an_ack_leaves_a_lock_that_another_turn_holds_now(
    redis_client: aioredis.Redis, keys: Keys, sessions: Sessions
) -> None:
    """A turn that lost its session (its lock expired in a stall, the next turn took it) and
    is acknowledged after all must not free, nor fence out, the new holder's lock."""
    inbox = await consumer(redis_client, keys, "a")
    [entry] = await stored(inbox, "m1")
    old = (await sessions.start(SESSION, entry.entry_id, with_history=False)).lock
    newer = "999:other-entry"
    await redis_client.set(keys.lock(SESSION), newer)
    fence = await redis_client.get(keys.fence(SESSION))

    await inbox.ack(entry, old)

    assert (await redis_client.get(keys.lock(SESSION))).decode() == newer
    assert await redis_client.get(keys.fence(SESSION)) == fence
    assert await sessions.renew(SESSION, newer)


async def test_keep_never_takes_an_entry_back_from_the_worker_that_claimed_it(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A worker that stalled past BRIDGE_CLAIM_IDLE_S learns that its entry is another's,
    and leaves it to them."""
    stalled, other = await consumer(redis_client, keys, "stalled"), await consumer(
        redis_client, keys, "other"
    )
    [entry] = await stored(stalled, "m1")
    [claimed] = await other.claim(min_idle_ms=0, count=10)
    assert claimed.entry_id == entry.entry_id and claimed.deliveries == 2

    assert await stalled.keep([entry.entry_id]) == {entry.entry_id}
    assert await owner(redis_client, keys, entry.entry_id) == "other"
    assert await other.keep([entry.entry_id]) == set()


async def test_a_claim_walks_past_a_scan_window_of_live_entries(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    """One XAUTOCLAIM looks at 10 × COUNT pending entries at most: the dead worker's entry
    behind a longer run of a live worker's must be found all the same, with its count."""
    live, dead = await consumer(redis_client, keys, "live"), await consumer(
        redis_client, keys, "dead"
    )
    await stored(live, *(f"live{n}" for n in range(12)))  # idle 0: kept claimed
    [orphan] = await stored(dead, "orphan")
    await dead.release([orphan.entry_id], idle_ms=60_000)
    claimer = await consumer(redis_client, keys, "claimer")

    claimed = await claimer.claim(min_idle_ms=30_000, count=1)

    assert [(e.entry_id, e.deliveries) for e in claimed] == [(orphan.entry_id, 2)]
    assert await owner(redis_client, keys, orphan.entry_id) == "claimer"
