"""Entries that change hands (SPEC §5, §6), through the bridge's own worker on a real Redis:
an entry another worker claimed is given up at once, a `/stop` whose Pub/Sub message was
missed is found in its key, and a redelivered message counts as the delivery it is — an
attempt of a command, never a second message against its sender's rate."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from bridge.inbox import Accepted, EntryKind, Inbox
from bridge.interfaces import InboundMessage, Sender
from bridge.messages import MESSAGES
from bridge.store import GROUP, Keys
from bridge.worker import Worker
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import PacedOpenAI

EN = MESSAGES["en"]
SESSION = "yach:g:g1:u:u1"  # of `group_message`'s sender and group


def _env(redis_url: str, bot_id: str, yach: FakeYach, upstream: PacedOpenAI,
         **extra: str) -> dict[str, str]:  # fmt: skip
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        **{"BRIDGE_LANG": "en", "BRIDGE_CLAIM_IDLE_S": "1", **extra},
    )  # fmt: skip


async def _only_entry(redis: aioredis.Redis, keys: Keys) -> str:
    [(entry_id, _)] = await redis.xrange(keys.inbox)
    return str(entry_id.decode())


@contextlib.asynccontextmanager
async def _turn_running(
    redis_url: str, bot_id: str, yach: FakeYach, redis: aioredis.Redis, pace_s: float, text: str
) -> AsyncIterator[tuple[Worker, str]]:
    """A bridge whose worker runs the turn of `text`, its upstream answering after `pace_s`;
    the worker and the turn's entry id."""
    upstream = await PacedOpenAI(pace=lambda _q: pace_s).start()
    try:
        async with running_bridge(_env(redis_url, bot_id, yach, upstream)) as bridge:
            worker = bridge.bridge.worker
            assert worker is not None
            assert (await bridge.post(group_message(text)))[0] == 200
            await wait_until(lambda: len(upstream.started) == 1)
            yield worker, await _only_entry(redis, Keys(bot_id))
    finally:
        await upstream.close()


@contextlib.asynccontextmanager
async def _kept_alive(inbox: Inbox, entry_id: str) -> AsyncIterator[None]:
    """`inbox`'s consumer keeps `entry_id` claimed, as a live worker running it does."""

    async def keep() -> None:
        while True:
            await inbox.keep([entry_id])
            await asyncio.sleep(0.1)

    task = asyncio.create_task(keep())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _left_by_dead_workers(
    redis: aioredis.Redis, keys: Keys, text: str, kind: EntryKind, *, deliveries: int
) -> str:
    """A message stored and delivered `deliveries` times to workers that died with it
    (idle past BRIDGE_CLAIM_IDLE_S): the bridge's claim is its next delivery."""
    message = InboundMessage(
        im_msg_id=uuid.uuid4().hex,
        text=text,
        sender=Sender("u1", "Tester", "W001"),
        conversation_id="g1",
        is_direct=False,
    )
    first = Inbox(redis, keys, "dead-1")
    await first.ensure_group()
    stored = await first.put(message, kind, SESSION)
    assert isinstance(stored, Accepted)
    entry_id = stored.entry_id
    assert [e.entry_id for e in await first.read(count=10, block_ms=None)] == [entry_id]
    last = first
    for n in range(2, deliveries + 1):  # each claim is a delivery
        last = Inbox(redis, keys, f"dead-{n}")
        await redis.xclaim(keys.inbox, GROUP, last.consumer, 0, [entry_id])
    await last.release([entry_id], idle_ms=60_000)
    return entry_id


async def test_a_turn_whose_entry_another_worker_claimed_is_given_up_unsent(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """This worker stalled past BRIDGE_CLAIM_IDLE_S and another took its entry over: it
    stops the turn at once — no answer from it, no acknowledgement of the other's entry —
    and lets the session's lock go, for the other to take at once. It kept the lock (and
    its keep loop could even renew it), and the other waited for it to expire: a whole
    BRIDGE_CLAIM_IDLE_S, 60 s by default."""
    keys = Keys(bot_id)
    async with _turn_running(redis_url, bot_id, yach, redis_client, 1.5, "who answers?") as (
        worker,
        entry_id,
    ):
        other = Inbox(redis_client, keys, "other")
        assert [e.entry_id for e in await other.claim(min_idle_ms=0, count=10)] == [entry_id]
        async with _kept_alive(other, entry_id):
            await wait_until(lambda: not worker.held)
            assert not await redis_client.exists(keys.lock(SESSION))
            assert yach.shown == []
            rows = await redis_client.xpending_range(keys.inbox, GROUP, "-", "+", 10)
            assert [(r["message_id"].decode(), r["consumer"].decode()) for r in rows] == [
                (entry_id, "other")
            ]


async def test_a_stop_whose_message_was_missed_is_found_in_its_key(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """`/stop` was read by another process, which recorded it; its Pub/Sub message never
    reached this one. The running turn stops all the same, and is acknowledged."""
    keys = Keys(bot_id)
    async with _turn_running(redis_url, bot_id, yach, redis_client, 30.0, "a long one") as (
        worker,
        entry_id,
    ):
        await redis_client.set(keys.stop(SESSION), entry_id)  # no PUBLISH

        await wait_until(lambda: not worker.held)
        assert await redis_client.xlen(keys.inbox) == 0
        assert not await redis_client.exists(keys.stop(SESSION), keys.lock(SESSION))
    assert yach.shown == []


async def test_a_stop_key_left_for_an_earlier_turn_does_not_stop_the_next(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """A `/stop` that came as its turn was finishing leaves its key (it names that turn's
    entry): the session's next turn is answered whole."""
    upstream = await PacedOpenAI(pace=lambda _q: 1.0).start()  # several keep-loop rounds
    keys = Keys(bot_id)
    try:
        async with running_bridge(_env(redis_url, bot_id, yach, upstream)) as bridge:
            await redis_client.set(keys.stop(SESSION), "1-1")
            assert (await bridge.post(group_message("next one")))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: next one. (history: 0 messages)"]


async def test_a_command_runs_on_its_last_attempt_and_is_dead_lettered_after(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """BRIDGE_MAX_ATTEMPTS=2: a command whose one earlier delivery died with its worker is
    answered; one delivered twice before is dead-lettered, and its sender told."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    once = await _left_by_dead_workers(redis_client, keys, "/help", EntryKind.COMMAND,
                                       deliveries=1)  # fmt: skip
    twice = await _left_by_dead_workers(redis_client, keys, "/help", EntryKind.COMMAND,
                                        deliveries=2)  # fmt: skip
    try:
        env = _env(redis_url, bot_id, yach, upstream, BRIDGE_MAX_ATTEMPTS="2")
        async with running_bridge(env):
            await wait_until(lambda: len(yach.shown) == 2)
            await wait_until_empty(redis_client, keys)
    finally:
        await upstream.close()
    assert sorted(yach.texts()) == sorted([EN["help"], EN["dead_letter"]])
    dead = await redis_client.xrange(keys.dead)
    assert [(row[b"entry"].decode(), row[b"reason"]) for _, row in dead] == [
        (twice, b"2 attempts")
    ]
    assert once != twice


async def test_a_redelivered_message_is_not_counted_against_its_sender_again(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """BRIDGE_USER_RATE=1/60: the message's first delivery counted it, then its worker
    died; its redelivery is answered, not refused as the sender's second message."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    await _left_by_dead_workers(redis_client, keys, "counted once", EntryKind.TURN, deliveries=1)
    await redis_client.set(keys.user_rate("u1"), 1, px=60_000)  # as its first delivery counted
    try:
        env = _env(redis_url, bot_id, yach, upstream, BRIDGE_USER_RATE="1/60")
        async with running_bridge(env):
            await wait_until(lambda: len(yach.shown) == 1)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: counted once. (history: 0 messages)"]
    assert int(await redis_client.get(keys.user_rate("u1"))) == 1


async def wait_until_empty(redis: aioredis.Redis, keys: Keys) -> None:
    """Every entry acknowledged (the inbox stream is empty)."""
    for _ in range(500):
        if await redis.xlen(keys.inbox) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("entries left in the inbox")
