"""`Inbox.take_on_put`: the put script also takes the new entries for this consumer and
starts the turns it stored, in the same call — on a real Redis, with the real scripts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from bridge.config import Rate
from bridge.inbox import Accepted, Duplicate, Entry, EntryKind, Inbox, TakeOnPut
from bridge.interfaces import InboundMessage, Sender
from bridge.sessions import Sessions, Start
from bridge.store import GROUP, Keys, connect

CONSUMER = "consumer"
UNLIMITED = Rate(0, 1.0)


def message(msg_id: str, sender: str = "u1") -> InboundMessage:
    return InboundMessage(
        im_msg_id=msg_id,
        text=f"question {msg_id}",
        sender=Sender(sender, "Tester", "W001"),
        conversation_id="g1",
        is_direct=False,
        dedupe_key="id:" + msg_id,
    )


@dataclass
class Taker:
    """What the worker does with what a put takes, recorded instead."""

    room: int = 10
    taken: list[tuple[Entry, Start | None]] = field(default_factory=list)

    def take(self, entry: Entry, start_reply: list[Any] | None) -> None:
        start = None if start_reply is None else Sessions.parse_start(start_reply)
        self.taken.append((entry, start))

    def ids(self) -> list[str | None]:
        return [entry.message.im_msg_id for entry, _ in self.taken]


@pytest.fixture
async def inbox(redis_client: aioredis.Redis, keys: Keys) -> Inbox:
    inbox = Inbox(redis_client, keys, CONSUMER)
    await inbox.ensure_group()
    return inbox


def taking(inbox: Inbox, sessions: Sessions, taker: Taker, rate: Rate = UNLIMITED) -> Taker:
    start_args = sessions.start_on_put(with_history=True, rate=rate)
    inbox.take_on_put(TakeOnPut(lambda: taker.room, start_args, taker.take))
    return taker


async def put_at_once(inbox: Inbox, *items: tuple[InboundMessage, EntryKind, str]) -> list[Any]:
    return list(await asyncio.gather(*(inbox.put(*item) for item in items)))


async def evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_put_stores_takes_and_starts_its_turn_in_one_script_call(
    inbox: Inbox, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    taker = taking(inbox, sessions, Taker())
    await inbox.put(message("warm"), EntryKind.TURN, "s0")  # the script is loaded
    calls = await evalsha_calls(redis_client)

    verdict = await inbox.put(message("m1"), EntryKind.TURN, "s1")

    assert isinstance(verdict, Accepted)
    assert await evalsha_calls(redis_client) - calls == 1  # no start script, no read
    entry, start = taker.taken[-1]
    assert (entry.entry_id, entry.kind, entry.chat_session_id, entry.deliveries) == (
        verdict.entry_id,
        EntryKind.TURN,
        "s1",
        1,
    )
    assert entry.message == message("m1")
    assert start is not None and start.ahead == 0 and start.attempt == 1 and not start.stopped
    assert start.lock.endswith(":" + verdict.entry_id)
    assert (await redis_client.get(keys.lock("s1"))).decode() == start.lock
    pending = await redis_client.xpending_range(keys.inbox, GROUP, "-", "+", 10)
    owners = {row["message_id"].decode(): row["consumer"].decode() for row in pending}
    assert owners[verdict.entry_id] == CONSUMER
    assert await inbox.read(count=10, block_ms=1) == []  # delivered once, by the put


async def test_turns_of_one_session_in_one_batch_start_in_order(
    inbox: Inbox, sessions: Sessions
) -> None:
    taker = taking(inbox, sessions, Taker())
    await put_at_once(
        inbox,
        (message("a1"), EntryKind.TURN, "a"),
        (message("a2"), EntryKind.TURN, "a"),
        (message("b1"), EntryKind.TURN, "b"),
    )
    starts = {entry.message.im_msg_id: start for entry, start in taker.taken}
    assert taker.ids() == ["a1", "a2", "b1"]
    assert starts["a1"] is not None and starts["a1"].lock
    assert starts["a2"] == Start(ahead=1)  # behind a1: waits, no lock
    assert starts["b1"] is not None and starts["b1"].lock


async def test_the_older_backlog_comes_first_and_is_taken_without_a_start(
    inbox: Inbox, sessions: Sessions
) -> None:
    taker = taking(inbox, sessions, Taker(room=0))
    await inbox.put(message("waiting"), EntryKind.TURN, "s1")  # no room: left for a read
    assert taker.taken == []
    taker.room = 10
    await put_at_once(
        inbox, (message("/status"), EntryKind.COMMAND, "s2"), (message("m"), EntryKind.TURN, "s3")
    )
    # as many as it stored, the oldest first, as a read delivers them; only a turn the put
    # stored itself is started by it (the worker starts "waiting", as after a read)
    assert taker.ids() == ["waiting", "/status"]
    assert [start for _, start in taker.taken] == [None, None]
    [left] = await inbox.read(count=10, block_ms=1)
    assert left.message.im_msg_id == "m"


async def test_a_put_takes_no_more_than_the_room_nor_than_it_stored(
    inbox: Inbox, sessions: Sessions
) -> None:
    taker = taking(inbox, sessions, Taker(room=1))
    await put_at_once(inbox, *((message(f"m{n}"), EntryKind.TURN, f"s{n}") for n in range(3)))
    assert taker.ids() == ["m0"]
    left = await inbox.read(count=10, block_ms=1)
    assert [entry.message.im_msg_id for entry in left] == ["m1", "m2"]
    taker.room = 10
    await inbox.put(message("m3"), EntryKind.TURN, "s3")
    assert taker.ids() == ["m0", "m3"]  # one stored: one taken


async def test_a_duplicate_is_not_taken_again(inbox: Inbox, sessions: Sessions) -> None:
    taker = taking(inbox, sessions, Taker())
    first = await inbox.put(message("m1"), EntryKind.TURN, "s1")
    again = await inbox.put(message("m1"), EntryKind.TURN, "s1")
    assert isinstance(first, Accepted) and isinstance(again, Duplicate)
    assert taker.ids() == ["m1"]


async def test_the_sender_limit_is_counted_by_the_put_start(
    inbox: Inbox, sessions: Sessions
) -> None:
    taker = taking(inbox, sessions, Taker(), rate=Rate(1, 60.0))
    await put_at_once(
        inbox,
        (message("first", sender="u7"), EntryKind.TURN, "s1"),
        (message("second", sender="u7"), EntryKind.TURN, "s2"),
        (message("other", sender="u8"), EntryKind.TURN, "s3"),
    )
    starts = {entry.message.im_msg_id: start for entry, start in taker.taken}
    assert starts["first"] is not None and starts["first"].lock
    assert starts["second"] == Start(ahead=None, over_rate=True)
    assert starts["other"] is not None and starts["other"].lock


async def test_a_lost_group_stores_and_leaves_the_read_to_make_it_again(
    inbox: Inbox, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    taker = taking(inbox, sessions, Taker())
    await redis_client.delete(keys.inbox)  # a Redis restarted empty: no stream, no group
    verdict = await inbox.put(message("m1"), EntryKind.TURN, "s1")
    assert isinstance(verdict, Accepted) and taker.taken == []
    entries = await inbox.read(count=10, block_ms=1)  # NOGROUP: made again (from 0), read
    assert [entry.entry_id for entry in entries] == [verdict.entry_id]


async def test_a_failed_hand_over_still_answers_every_webhook(
    inbox: Inbox, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    def broken_take(entry: Entry, start_reply: list[Any] | None) -> None:
        raise RuntimeError("the worker could not take it")

    start_args = sessions.start_on_put(with_history=True, rate=UNLIMITED)
    inbox.take_on_put(TakeOnPut(lambda: 10, start_args, broken_take))
    verdicts = await asyncio.wait_for(
        put_at_once(
            inbox, (message("m1"), EntryKind.TURN, "s1"), (message("m2"), EntryKind.TURN, "s2")
        ),
        timeout=5,
    )
    assert all(isinstance(verdict, Accepted) for verdict in verdicts)
    # taken all the same: pending on this consumer, for the claim loop once idle
    pending = await redis_client.xpending(keys.inbox, GROUP)
    assert pending["pending"] == 2


class AnswerCutter:
    """A loopback TCP proxy in front of Redis that, once armed, passes the next command on
    and cuts its client's connection when Redis answers it: it ran, its answer is lost."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = urlsplit(redis_url)
        self.armed = False
        self.cut = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.redis_url.scheme == "unix":
            return await asyncio.open_unix_connection(self.redis_url.path)
        return await asyncio.open_connection(self.redis_url.hostname, self.redis_url.port)

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        redis_in, redis_out = await self._open()

        async def to_redis() -> None:
            while data := await client_in.read(65536):
                redis_out.write(data)
                await redis_out.drain()
            redis_out.close()

        forwarding = asyncio.create_task(to_redis())
        try:
            while data := await redis_in.read(65536):
                if self.armed:
                    self.armed = False
                    self.cut += 1
                    break
                client_out.write(data)
                await client_out.drain()
        finally:
            forwarding.cancel()
            client_out.transport.abort()
            redis_out.close()


async def test_a_put_whose_answer_was_lost_hands_over_what_it_took_when_sent_again(
    redis_url: str, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    cutter = AnswerCutter(redis_url)
    client = connect(await cutter.start(), max_connections=4)
    try:
        inbox = Inbox(client, keys, CONSUMER)
        await inbox.ensure_group()
        taker = taking(inbox, sessions, Taker())
        await inbox.put(message("warm"), EntryKind.TURN, "s0")  # the script is loaded
        cutter.armed = True
        verdict = await asyncio.wait_for(inbox.put(message("m1"), EntryKind.TURN, "s1"), 10)
    finally:
        await client.aclose()
        await cutter.close()
    assert cutter.cut == 1
    # the first run's answer, not "a duplicate" of itself, and its entry handed over with the
    # lock it took: no orphaned lock, no second attempt counted, nothing left to claim
    assert isinstance(verdict, Accepted)
    entry, start = taker.taken[-1]
    assert entry.entry_id == verdict.entry_id
    assert start is not None and start.lock and start.attempt == 1
    assert (await redis_client.get(keys.lock("s1"))).decode() == start.lock
    assert await redis_client.hget(keys.journal(verdict.entry_id), "attempts") == b"1"
    assert await redis_client.xlen(keys.inbox) == 2


async def test_a_put_answer_read_is_emptied_by_the_next_put_not_deleted(
    inbox: Inbox, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    taking(inbox, sessions, Taker())
    first = keys.put_answer(f"{CONSUMER}:1")
    await inbox.put(message("m1"), EntryKind.TURN, "s1")
    assert len(await redis_client.get(first)) > 100  # the whole answer
    assert 0 < await redis_client.ttl(first) <= 600
    await inbox.put(message("m2"), EntryKind.TURN, "s2")
    # Read by now: emptied, not deleted, so that a late copy of that call (written on a
    # connection given up, still on its way) finds an answer and does nothing.
    assert await redis_client.get(first) == b"[[],[]]"
    assert 0 < await redis_client.ttl(first) <= 600
    assert len(await redis_client.get(keys.put_answer(f"{CONSUMER}:2"))) > 100


async def test_no_turn_starts_while_its_session_is_being_reset(
    inbox: Inbox, sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """`/reset` holds its session: neither a put nor a later try starts a turn of it until
    the reset is over (other sessions start as ever)."""
    taker = taking(inbox, sessions, Taker())
    async with sessions.resetting("s1", "8-0", hold_s=30):
        await put_at_once(
            inbox, (message("r1"), EntryKind.TURN, "s1"), (message("o1"), EntryKind.TURN, "s2")
        )
        starts = {entry.message.im_msg_id: start for entry, start in taker.taken}
        assert starts["r1"] == Start(ahead=0)  # at the head, not started: it waits
        assert starts["o1"] is not None and starts["o1"].lock
        r1 = next(entry for entry, _ in taker.taken if entry.message.im_msg_id == "r1")
        assert await sessions.start("s1", r1.entry_id, with_history=True) == Start(ahead=0)
        assert await redis_client.get(keys.lock("s1")) is None
    assert await redis_client.exists(keys.resetting("s1")) == 0
    started = await sessions.start("s1", r1.entry_id, with_history=True)
    assert started.lock.endswith(":" + r1.entry_id)


async def test_a_reset_ends_only_its_own_hold(
    sessions: Sessions, redis_client: aioredis.Redis, keys: Keys
) -> None:
    """A reset that outlived its hold leaves the hold of the reset after it in place."""
    async with sessions.resetting("s1", "8-0", hold_s=0.05):
        await asyncio.sleep(0.15)  # expired
        async with sessions.resetting("s1", "9-0", hold_s=30):
            pass
        await redis_client.sadd(keys.resetting("s1"), "a later reset's")
        await redis_client.pexpire(keys.resetting("s1"), 30_000)
    assert await redis_client.smembers(keys.resetting("s1")) == {b"a later reset's"}
