"""Consumers of ended processes are forgotten; one holding an entry never is."""

from __future__ import annotations

import redis.asyncio as aioredis

from bridge.inbox import EntryKind, Inbox
from bridge.interfaces import InboundMessage, Sender
from bridge.store import GROUP, Keys


def message(text: str) -> InboundMessage:
    return InboundMessage(im_msg_id=text, text=text, sender=Sender("u"), conversation_id="g",
                          is_direct=False, dedupe_key="id:" + text)


async def consumers(redis: aioredis.Redis, keys: Keys) -> dict[str, int]:
    rows = await redis.xinfo_consumers(keys.inbox, GROUP)
    return {row["name"].decode(): int(row["pending"]) for row in rows}


async def test_idle_consumers_without_pending_entries_are_pruned(
    redis_client: aioredis.Redis, bot_id: str
) -> None:
    keys = Keys(bot_id)
    ended, holding, current = (Inbox(redis_client, keys, name)
                               for name in ("ended", "holding", "current"))
    await current.ensure_group()
    for text in ("one", "two", "three"):
        await current.put(message(text), EntryKind.NOTICE, "s")
    [done_by_ended] = await ended.read(count=1, block_ms=1)
    await ended.ack(done_by_ended)
    [done_by_current] = await current.read(count=1, block_ms=1)
    await current.ack(done_by_current)
    [entry] = await holding.read(count=1, block_ms=1)
    assert await consumers(redis_client, keys) == {"ended": 0, "holding": 1, "current": 0}

    assert await current.prune_consumers(min_idle_ms=3_600_000) == 0  # none idle that long
    assert await current.prune_consumers(min_idle_ms=0) == 1
    assert await consumers(redis_client, keys) == {"holding": 1, "current": 0}

    await holding.ack(entry)
    assert await current.prune_consumers(min_idle_ms=0) == 1
    assert await consumers(redis_client, keys) == {"current": 0}


async def test_pruning_before_the_first_start_made_the_stream_finds_nothing(
    redis_client: aioredis.Redis, bot_id: str
) -> None:
    """A new bot's claim loop prunes while its read loop is still making the group."""
    keys = Keys(bot_id)
    inbox = Inbox(redis_client, keys, "current")
    assert await inbox.prune_consumers(min_idle_ms=0) == 0
    await redis_client.xadd(keys.inbox, {"m": "{}"})  # the stream without the group
    assert await inbox.prune_consumers(min_idle_ms=0) == 0  # the group is made on the way
    assert await consumers(redis_client, keys) == {}
