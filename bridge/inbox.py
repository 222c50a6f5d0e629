"""The durable inbox: a Redis Stream read through a consumer group.

`put` stores a message (dedupe + XADD + the session queue, in one Lua script) and is
group-committed: the calls made during one event-loop tick travel in one pipeline.
Workers `read` new entries, `claim` the entries of dead consumers, `keep` the entries they
hold (XCLAIM JUSTID: resets idle time, never the delivery count), and `ack` or
`dead_letter` them; acking also drops the entry from its session queue and its journal.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bridge.interfaces import InboundMessage
from bridge.store import GROUP, Keys, as_text

__all__ = ["Accepted", "Duplicate", "Entry", "EntryKind", "Inbox"]

DEDUPE_TTL_S = 86400

# KEYS: dedupe key, inbox, session queue. ARGV: dedupe?, ttl, message, kind, session, queued?
_PUT = """
if ARGV[1] == '1' and not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[3], 'k', ARGV[4], 's', ARGV[5])
if ARGV[6] == '1' then
  redis.call('RPUSH', KEYS[3], id)
end
return id
"""

# KEYS: inbox, session queue, journal, session lock. ARGV: group, entry id, lock value or ''.
_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('LREM', KEYS[2], 1, ARGV[2])
redis.call('DEL', KEYS[3])
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) == ARGV[3] then
  redis.call('DEL', KEYS[4])
end
return 1
"""


class EntryKind(enum.StrEnum):
    TURN = "turn"  # a question for the upstream: waits its turn in the session queue
    COMMAND = "command"  # /help, /reset, /stop, /status: answered at once
    NOTICE = "notice"  # answered at once with one of the bot's own messages


@dataclass(frozen=True, slots=True)
class Accepted:
    entry_id: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The message was stored before; the platform is retrying."""


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    message: InboundMessage
    kind: EntryKind
    chat_session_id: str
    deliveries: int


@dataclass
class _Pending:
    message: InboundMessage
    kind: EntryKind
    chat_session_id: str
    future: asyncio.Future[Accepted | Duplicate]


class Inbox:
    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._put_script = redis.register_script(_PUT)
        self._ack_script = redis.register_script(_ACK)
        self._batch: list[_Pending] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.inbox, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def put(
        self, message: InboundMessage, kind: EntryKind, chat_session_id: str
    ) -> Accepted | Duplicate:
        """Store one message durably; concurrent calls share one pipeline (group commit)."""
        future: asyncio.Future[Accepted | Duplicate] = asyncio.get_running_loop().create_future()
        self._batch.append(_Pending(message, kind, chat_session_id, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        batch, self._batch, self._flush_scheduled = self._batch, [], False
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in batch:
                    await self._put_script(
                        keys=[
                            self.keys.dedupe(item.message.dedupe_key or "-"),
                            self.keys.inbox,
                            self.keys.queue(item.chat_session_id),
                        ],
                        args=[
                            "1" if item.message.dedupe_key else "0",
                            DEDUPE_TTL_S,
                            item.message.to_json(),
                            item.kind.value,
                            item.chat_session_id,
                            "1" if item.kind is EntryKind.TURN else "0",
                        ],
                        client=pipe,
                    )
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every waiter must learn the outcome, whatever it was
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            elif result is None:
                item.future.set_result(Duplicate())
            else:
                item.future.set_result(Accepted(as_text(result)))

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (first delivery)."""
        reply = await self._with_group(
            self.redis.xreadgroup,
            GROUP,
            self.consumer,
            {self.keys.inbox: ">"},
            count=count,
            block=block_ms,
        )
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries.extend(_entry(entry_id, fields, 1) for entry_id, fields in items if fields)
        return entries

    async def claim(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries idle on dead consumers, now ours, with how often each was delivered."""
        reply = await self._with_group(
            self.redis.xautoclaim,
            self.keys.inbox,
            GROUP,
            self.consumer,
            min_idle_time=min_idle_ms,
            start_id="0-0",
            count=count,
        )
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
        if not claimed:
            return []
        deliveries = await self._deliveries([as_text(entry_id) for entry_id, _ in claimed])
        return [
            _entry(entry_id, fields, deliveries.get(as_text(entry_id), 1))
            for entry_id, fields in claimed
        ]

    async def _deliveries(self, entry_ids: Sequence[str]) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.keys.inbox, GROUP, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        counts: dict[str, int] = {}
        for reply in replies:
            for row in reply:
                counts[as_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    async def keep(self, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries we hold, without counting a delivery."""
        if entry_ids:
            await self._with_group(
                self.redis.xclaim,
                self.keys.inbox,
                GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=list(entry_ids),
                justid=True,
            )

    async def ack(self, entry: Entry, lock_token: str = "") -> None:
        """Done with an entry: acknowledge it, drop it from its queue, journal and lock."""
        await self._ack_script(
            keys=[
                self.keys.inbox,
                self.keys.queue(entry.chat_session_id),
                self.keys.journal(entry.entry_id),
                self.keys.lock(entry.chat_session_id),
            ],
            args=[GROUP, entry.entry_id, lock_token],
        )

    async def dead_letter(self, entry: Entry, reason: str) -> None:
        await self.redis.xadd(
            self.keys.dead,
            {"m": entry.message.to_json(), "entry": entry.entry_id, "reason": reason},
            maxlen=10000,
            approximate=True,
        )
        await self.ack(entry)

    async def pending_count(self) -> int:
        """Entries stored and not yet acknowledged (acknowledged entries are deleted)."""
        return int(await self.redis.xlen(self.keys.inbox))

    async def _with_group(
        self, command: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Run a group command; a Redis restarted empty lost the group, so make it again."""
        try:
            return await command(*args, **kwargs)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        await self.ensure_group()
        return await command(*args, **kwargs)



def _entry(entry_id: bytes | str, fields: dict[bytes, bytes], deliveries: int) -> Entry:
    return Entry(
        entry_id=as_text(entry_id),
        message=InboundMessage.from_json(fields[b"m"]),
        kind=EntryKind(as_text(fields[b"k"])),
        chat_session_id=as_text(fields[b"s"]),
        deliveries=deliveries,
    )
