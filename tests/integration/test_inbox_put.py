"""`Inbox.put`: every call made during one event-loop tick is stored by one script call,
which must give each message its own verdict exactly as one call per message would."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bridge.inbox import Accepted, Duplicate, EntryKind, Inbox
from bridge.interfaces import InboundMessage, Sender
from bridge.store import Keys, connect
from tests.harness import slowed_script_load


def message(msg_id: str, text: str = "hello", *, dedupe: bool = True) -> InboundMessage:
    return InboundMessage(
        im_msg_id=msg_id,
        text=text,
        sender=Sender("u1", "Tester", "W001"),
        conversation_id="g1",
        is_direct=False,
        dedupe_key="id:" + msg_id if dedupe else None,
    )


@pytest.fixture
async def inbox(redis_client: aioredis.Redis, bot_id: str) -> Inbox:
    inbox = Inbox(redis_client, Keys(bot_id), "consumer")
    await inbox.ensure_group()
    return inbox


async def put_at_once(
    inbox: Inbox, items: list[tuple[InboundMessage, EntryKind, str]]
) -> list[Accepted | Duplicate]:
    """All in the same tick: one batch."""
    return list(await asyncio.gather(*(inbox.put(*item) for item in items)))


async def queue(redis: aioredis.Redis, keys: Keys, session: str) -> list[str]:
    return [entry_id.decode() for entry_id in await redis.lrange(keys.queue(session), 0, -1)]


async def test_duplicates_inside_one_batch_and_across_batches_are_stored_once(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    first = await put_at_once(
        inbox,
        [
            (message("a"), EntryKind.TURN, "s1"),
            (message("a"), EntryKind.TURN, "s1"),  # the platform's retry, in the same tick
            (message("b"), EntryKind.TURN, "s1"),
        ],
    )
    assert [type(verdict) for verdict in first] == [Accepted, Duplicate, Accepted]
    again = await put_at_once(
        inbox, [(message("b"), EntryKind.TURN, "s1"), (message("c"), EntryKind.TURN, "s1")]
    )
    assert [type(verdict) for verdict in again] == [Duplicate, Accepted]

    keys = Keys(bot_id)
    stored = [first[0], first[2], again[1]]
    entry_ids = [verdict.entry_id for verdict in stored if isinstance(verdict, Accepted)]
    assert await queue(redis_client, keys, "s1") == entry_ids
    entries = await inbox.read(count=10, block_ms=1)
    assert [entry.message.im_msg_id for entry in entries] == ["a", "b", "c"]


async def test_mixed_kinds_and_sessions_in_one_batch(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    text = '「你好」 "quoted" back\\slash\nnew line \u2028 ✓'
    items = [
        (message("t1", text), EntryKind.TURN, "s1"),
        (message("c1", "/stop"), EntryKind.COMMAND, "s1"),
        (message("n1", ""), EntryKind.NOTICE, "s2"),
        (message("t2"), EntryKind.TURN, "s2"),
    ]
    verdicts = await put_at_once(inbox, items)
    assert all(isinstance(verdict, Accepted) for verdict in verdicts)
    ids = [verdict.entry_id for verdict in verdicts if isinstance(verdict, Accepted)]

    keys = Keys(bot_id)
    assert await queue(redis_client, keys, "s1") == [ids[0]]  # only turns wait in a queue
    assert await queue(redis_client, keys, "s2") == [ids[3]]
    entries = await inbox.read(count=10, block_ms=1)
    assert [entry.entry_id for entry in entries] == ids
    assert [(entry.message, entry.kind, entry.chat_session_id) for entry in entries] == items
    raw = await redis_client.xrange(keys.inbox, ids[0], ids[0])
    assert raw[0][1][b"m"].decode() == items[0][0].to_json()  # stored byte for byte


async def test_messages_without_a_dedupe_key_are_all_stored(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    same = message("x", dedupe=False)
    verdicts = await put_at_once(inbox, [(same, EntryKind.TURN, "s1")] * 2)
    verdicts.append(await inbox.put(same, EntryKind.TURN, "s1"))
    assert [type(verdict) for verdict in verdicts] == [Accepted] * 3
    assert await redis_client.xlen(Keys(bot_id).inbox) == 3


async def test_the_script_is_loaded_again_after_script_flush(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    assert isinstance(await inbox.put(message("before"), EntryKind.TURN, "s1"), Accepted)
    await redis_client.script_flush()  # as a Redis restarted empty: NOSCRIPT
    verdicts = await put_at_once(
        inbox, [(message("after"), EntryKind.TURN, "s1"), (message("before"), EntryKind.TURN, "s1")]
    )
    assert [type(verdict) for verdict in verdicts] == [Accepted, Duplicate]
    assert await redis_client.xlen(Keys(bot_id).inbox) == 2


async def test_a_burst_larger_than_one_script_call_is_stored_whole(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    burst = [(message(f"m{n}"), EntryKind.TURN, f"s{n % 7}") for n in range(600)]
    verdicts = await put_at_once(inbox, [*burst, burst[0]])
    assert [type(verdict) for verdict in verdicts] == [Accepted] * 600 + [Duplicate]
    assert await redis_client.xlen(Keys(bot_id).inbox) == 600


async def test_a_put_connection_lost_between_calls_is_replaced(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    assert isinstance(await inbox.put(message("before"), EntryKind.TURN, "s1"), Accepted)
    clients = await redis_client.client_list()
    (put_connection,) = [client for client in clients if client["cmd"] == "evalsha"]
    await redis_client.client_kill_filter(_id=put_connection["id"])
    assert isinstance(await inbox.put(message("after"), EntryKind.TURN, "s1"), Accepted)
    assert isinstance(await inbox.put(message("again"), EntryKind.TURN, "s1"), Accepted)
    entries = await inbox.read(count=10, block_ms=1)
    assert [entry.message.im_msg_id for entry in entries] == ["before", "after", "again"]


async def evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_puts_made_while_two_calls_are_on_their_way_wait_and_share_the_next_call(
    inbox: Inbox, redis_client: aioredis.Redis
) -> None:
    await inbox.put(message("loaded"), EntryKind.TURN, "s1")  # the script is loaded
    calls_before = await evalsha_calls(redis_client)
    await redis_client.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # the calls wait
    first = asyncio.ensure_future(inbox.put(message("first"), EntryKind.TURN, "s1"))
    later = []
    for n in range(5):  # in five later ticks: l0 goes right behind the first, l1…l4 wait
        await asyncio.sleep(0.01)
        later.append(asyncio.ensure_future(inbox.put(message(f"l{n}"), EntryKind.TURN, "s1")))
    verdicts = [await first, *await asyncio.gather(*later)]
    assert all(isinstance(verdict, Accepted) for verdict in verdicts)
    assert await evalsha_calls(redis_client) - calls_before == 3
    entries = await inbox.read(count=10, block_ms=1)
    assert [entry.message.im_msg_id for entry in entries] == ["loaded", "first"] + [
        f"l{n}" for n in range(5)
    ]


async def test_every_waiter_of_a_failed_batch_learns_the_error(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    await redis_client.set(Keys(bot_id).queue("broken"), "not a list")  # RPUSH: WRONGTYPE
    results = await asyncio.gather(
        inbox.put(message("ok"), EntryKind.TURN, "s1"),
        inbox.put(message("bad"), EntryKind.TURN, "broken"),
        inbox.put(message("later"), EntryKind.TURN, "s1"),
        return_exceptions=True,
    )
    assert all(isinstance(result, ResponseError) for result in results)
    # the next batch is stored as usual; a retry of a message stored before the error is
    # answered as the duplicate it is
    retried = await put_at_once(
        inbox, [(message("ok"), EntryKind.TURN, "s1"), (message("later"), EntryKind.TURN, "s1")]
    )
    assert [type(verdict) for verdict in retried] == [Duplicate, Accepted]


async def test_a_batch_made_while_the_first_put_retries_after_noscript_is_stored_after_it(
    redis_url: str, redis_client: aioredis.Redis, bot_id: str
) -> None:
    """A process's first put meets NOSCRIPT when its script is new to Redis (a deploy, a
    Redis restarted empty): a webhook arriving while that put is sent again goes after it."""
    client = connect(redis_url, max_connections=8)
    try:
        keys = Keys(bot_id)
        inbox = Inbox(client, keys, "consumer")
        await inbox.ensure_group()
        await redis_client.script_flush()
        loaded = slowed_script_load(client)
        first = asyncio.create_task(inbox.put(message("m1"), EntryKind.TURN, "s1"))
        await loaded.wait()
        second = asyncio.create_task(inbox.put(message("m2"), EntryKind.TURN, "s1"))
        one, two = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
        assert isinstance(one, Accepted) and isinstance(two, Accepted)
        assert await queue(redis_client, keys, "s1") == [one.entry_id, two.entry_id]
    finally:
        await client.aclose()


async def test_a_full_process_finds_the_next_command_past_the_turns(
    inbox: Inbox, redis_client: aioredis.Redis, bot_id: str
) -> None:
    """`reach_unqueued`: how many new entries to read to reach the first command or notice
    (0: none undelivered). Commands are noted at the put and forgotten once delivered, so a
    full process that finds none has looked at no entry."""
    keys = Keys(bot_id)
    for n in range(3):
        await inbox.put(message(f"t{n}"), EntryKind.TURN, "s1")
    assert await inbox.reach_unqueued(64) == 0
    await inbox.put(message("c", "/stop"), EntryKind.COMMAND, "s1")
    await inbox.put(message("t3"), EntryKind.TURN, "s1")
    assert await inbox.reach_unqueued(64) == 4
    assert await inbox.reach_unqueued(3) == 0  # not within the look
    assert len(await inbox.read(count=2, block_ms=None)) == 2
    assert await inbox.reach_unqueued(64) == 2
    assert len(await inbox.read(count=2, block_ms=None)) == 2  # the command delivered
    assert await inbox.reach_unqueued(64) == 0
    assert await redis_client.zcard(keys.unqueued) == 0  # forgotten
