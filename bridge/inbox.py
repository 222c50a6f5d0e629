"""The durable inbox: a Redis Stream read through a consumer group.

`put` stores a message (dedupe + XADD + the session queue, in one Lua script) and is
group-committed: the calls made during one event-loop tick, or while the previous script
call runs, are stored by one script call. With `take_on_put`, that call also takes the new
entries for this process's worker and starts the turns it stored (a first read and a start,
in the same round trip).
Workers `read` new entries, `claim` the entries of dead consumers, `keep` the entries they
hold (XCLAIM JUSTID: resets idle time, never the delivery count; only entries still theirs,
so a worker that stalled past BRIDGE_CLAIM_IDLE_S never takes an entry back from the one
that claimed it), `release` what they will not run (drain), and `ack` or `dead_letter`
them; acking also drops the entry from its session queue, its journal and its lock.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT

from bridge.interfaces import InboundMessage
from bridge.sessions import START_TURN
from bridge.store import ANSWER_TTL_S, GROUP, HotPath, InOrder, Keys, as_text

__all__ = [
    "INBOX_SCRIPTS",
    "UNQUEUED_MESSAGE",
    "Accepted",
    "Acked",
    "Duplicate",
    "Entry",
    "EntryKind",
    "Inbox",
    "TakeOnPut",
]

log = structlog.get_logger(__name__)

DEDUPE_TTL_S = 86400

# KEYS: inbox. ARGV: group, idle ms, our consumer. Deletes consumers that hold nothing and
# were idle that long (those of processes that ended); atomic, so none can take an entry
# between the check and the delete (DELCONSUMER would drop its pending entries).
_PRUNE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- a new bot: no stream, no group yet
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle = consumer[2], consumer[4], consumer[6]
  if pending == 0 and idle >= tonumber(ARGV[2]) and name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
"""

# One group-commit batch in one command. KEYS: inbox, the commands and notices waiting
# (`Keys.unqueued`), then the answers of earlier calls that were read (emptied: no longer
# needed). ARGV: dedupe TTL, the dedupe and the
# queue key prefixes, and the batch as one JSON array of [dedupe key or '', kind, session,
# message, sender]: one argument, not five per message, because redis-py packs every argument
# in Python. (The keys built here share the inbox's {bot} hash tag, as every key does.) Then
# the take: group, consumer, how many entries it may take (0: none), the key of this call's
# answer, and `start_on_put`.
# Stores each message (false: a duplicate; a turn joins its session queue); then, if it may,
# takes new entries for this consumer as a first read does (XREADGROUP: the oldest first, so
# an older backlog before this batch), and runs `start_turn` on the turns it stored itself.
# Returns {verdicts, taken}: per message its entry id or false; per entry taken {id, fields,
# the start's reply or false}. The first error stops the script: what it did before stays.
# A call that took entries keeps its answer under its own key (`ANSWER_TTL_S`; emptied
# by a later call once its answer was read): the same call sent again because its answer
# was lost (a connection cut) gets that answer, and its entries are handed over as if nothing
# had happened — not left pending, their locks and counted attempts orphaned, until claimed.
_PUT = (
    START_TURN
    + """
-- emptied, not deleted: a late copy of that call (written on a connection since given up,
-- still on its way) then finds an answer and does nothing
for i = 3, #KEYS do redis.call('SET', KEYS[i], '[[],[]]', 'XX', 'KEEPTTL') end
if ARGV[8] ~= '' then
  local answered = redis.call('GET', ARGV[8])
  if answered then return cjson.decode(answered) end
end
local ids, stored = {}, {}
for i, item in ipairs(cjson.decode(ARGV[4])) do
  local dedupe, kind, session = item[1], item[2], item[3]
  if dedupe ~= '' and not redis.call('SET', ARGV[2] .. dedupe, '1', 'NX', 'EX', ARGV[1]) then
    ids[i] = false
  else
    local id = redis.call('XADD', KEYS[1], '*', 'm', item[4], 'k', kind, 's', session)
    if kind == 'turn' then
      redis.call('RPUSH', ARGV[3] .. session, id)
      stored[id] = item
    else
      redis.call('ZADD', KEYS[2], tonumber(string.match(id, '^%d+')), id)
    end
    ids[i] = id
  end
end
local taken = {}
if tonumber(ARGV[7]) > 0 then
  -- a group lost with a Redis restarted empty: the read loop makes it again and reads
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[5], ARGV[6], 'COUNT', ARGV[7],
                            'STREAMS', KEYS[1], '>')
  local rows = type(reply) == 'table' and not reply.err and reply[1][2] or {}
  local p = {unpack(ARGV, 9, 17)}
  local a = {unpack(ARGV, 18, 23)}
  for i, row in ipairs(rows) do
    local id, item, start = row[1], stored[row[1]], false
    if item then
      local s = item[3]
      start = start_turn(
        {KEYS[1], p[1] .. s, p[2] .. s, p[3] .. s, p[4] .. id, p[5] .. s, p[6] .. s,
         p[7] .. s, p[8] .. item[5], p[9] .. s},
        {id, a[1], a[2], a[3], a[4], a[5], a[6]})
    end
    taken[i] = {id, row[2], start}
  end
  if #taken > 0 then redis.call('SET', ARGV[8], cjson.encode({ids, taken}), 'EX', ARGV[24]) end
end
return {ids, taken}
"""
)

# KEYS: inbox, session queue, journal, session lock, fence, dead letters, acknowledged mark.
# ARGV: group, entry id, lock value or '', our consumer, then (dead-lettering) message, reason.
# Releasing the lock bumps the fence, so the released token can never write again; our lock
# is released whatever else the ack finds.
# An entry another consumer claimed (this one's process stalled, or lost Redis, past
# BRIDGE_CLAIM_IDLE_S) is left to it: 0. Acknowledged here under its replay, the entry was
# given up there before its turn was recorded, and its session lock kept until it expired.
# Acknowledging marks who did, for a while: an entry no longer pending was acknowledged
# already, by this consumer (an earlier try whose answer was lost, sent again) or not: 3.
# Acknowledged here: 2 if entries still wait in the session's queue, else 1.
_ACK = """
local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)[1]
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) == ARGV[3] then
  redis.call('DEL', KEYS[4])
  redis.call('INCR', KEYS[5])
end
if row and row[2] ~= ARGV[4] then return 0 end
if not row then
  if redis.call('GET', KEYS[7]) ~= ARGV[4] then return 3 end
else
  if #ARGV > 4 then
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', 10000, '*',
               'm', ARGV[5], 'entry', ARGV[2], 'reason', ARGV[6])
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('LREM', KEYS[2], 1, ARGV[2])
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[7], ARGV[4], 'EX', 120)
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 1
"""

# KEYS: inbox. ARGV: group, consumer, idle ms, entry ids. Sets the idle time (0: keep it
# claimed; past BRIDGE_CLAIM_IDLE_S: let it go) of the entries this consumer still owns
# (JUSTID: the delivery count stays); returns the ids it no longer owns (claimed by another
# consumer after a stall, or acknowledged) — those are left alone.
_KEEP = """
local lost = {}
for i = 4, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if row and row[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# How many new entries a read must take to reach the first command or notice among the next
# ARGV[2] not yet delivered to the group ARGV[1] (0: none there). KEYS: inbox, the commands
# and notices stored (`Keys.unqueued`), from which those delivered are dropped here. Judged in
# Redis: only a number comes back. A full process asks whenever it may have room or a command
# was announced, and every 5 s; while no command waits (nearly always) that costs one ZCARD,
# not a look at the entries.
_REACH_UNQUEUED = """
if redis.call('ZCARD', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if not last then return 0 end
local last_ms, last_seq = string.match(last, '^(%d+)-(%d+)$')
last_ms, last_seq = tonumber(last_ms), tonumber(last_seq)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', last_ms)) do
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if ms < last_ms or (ms == last_ms and seq <= last_seq) then redis.call('ZREM', KEYS[2], id) end
end
if redis.call('ZCARD', KEYS[2]) == 0 then return 0 end
local rows = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])
for position, row in ipairs(rows) do
  local fields = row[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'k' and fields[i + 1] ~= 'turn' then return position end
  end
end
return 0
"""

# Published on the control channel when a command or notice is stored (`Inbox.put`).
UNQUEUED_MESSAGE = json.dumps({"type": "unqueued"})

# The scripts of every message (its store, its acknowledgement): loaded at start.
INBOX_SCRIPTS = (_PUT, _ACK)

# Messages per put script: a larger burst is stored by several calls, one after the other, so
# that no one script holds Redis for long.
_MAX_PUT_BATCH = 256
# Put scripts on their way at once: the next batch goes out while the one before it runs in
# Redis, instead of after its answer (the bridge would wait, idle, at high rates).
_PUTS_IN_FLIGHT = 2

# How many XAUTOCLAIM calls one claim pass may make (each scans up to 10 × COUNT entries
# of the pending list: with a long backlog, the first scan window may hold no idle entry).
_MAX_CLAIM_SCANS = 100


class Acked(enum.IntEnum):
    """What acknowledging an entry found (the ack script's answer)."""

    NOT_OURS = 0  # another consumer claimed the entry meanwhile: left to that one
    QUEUE_EMPTY = 1  # acknowledged; no entry waits for its session
    OTHERS_WAIT = 2  # acknowledged; entries wait for its session (wake them)
    ALREADY = 3  # acknowledged before, by the consumer that took it over


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


@dataclass(frozen=True, slots=True)
class TakeOnPut:
    """How the put script takes what it stores for this process's worker, in the same round
    trip: a turn's first token then waits for no read and no start of its own."""

    room: Callable[[], int]  # how many entries the worker takes now (0: none)
    start_args: list[EncodableT]  # `Sessions.start_on_put`
    # Hands an entry over, with the start script's reply for a turn the put started.
    take: Callable[[Entry, list[Any] | None], None]


@dataclass
class _Pending:
    item: tuple[str, str, str, str, str]  # what `_PUT` reads of one message
    future: asyncio.Future[Accepted | Duplicate]


_DUPLICATE = Duplicate()


class Inbox:
    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._put_script = redis.register_script(_PUT)
        self._ack_script = redis.register_script(_ACK)
        self._keep_script = redis.register_script(_KEEP)
        self._prune_script = redis.register_script(_PRUNE)
        self._reach_unqueued = redis.register_script(_REACH_UNQUEUED)
        self._batch: list[_Pending] = []
        # Up to `_PUTS_IN_FLIGHT` put scripts are on their way; what arrives meanwhile waits
        # for the next. Under load the batches grow instead of the calls (a call costs the
        # bridge ~40 µs of redis-py and Redis its own share, a message in it a few), and the
        # calls take effect in inbox order (`InOrder`: one connection, pipelined).
        self._flushes: set[asyncio.Task[None]] = set()
        self._flush_starting = False  # a flush task that has not taken its batch yet
        self._puts = InOrder(redis)
        # Every answered entry's ack (a script that is safe to run twice: a try whose answer
        # was lost and is sent again finds its own acknowledgement).
        self._hot = HotPath(redis, keep=2)
        self._take_on_put: TakeOnPut | None = None
        self._put_calls = 0  # names the answers of the calls that take
        self._answers_read: list[str] = []  # their keys, for the next call to empty
        self._unreadable: list[tuple[str, dict[bytes, bytes]]] = []

    def take_on_put(self, take: TakeOnPut) -> None:
        """From now on each put also takes new entries, up to `take.room()`, for this
        consumer, starting the turns it stored (one round trip for the store, the first
        read and the start). What it cannot take waits for `read`, as before. A put sent
        again because its answer was lost gets the same answer (kept in Redis for a while):
        what it took is handed over all the same."""
        self._take_on_put = take

    async def settled(self) -> None:
        """Wait for the put scripts on their way (and what they hand over) to finish: from
        then on, with no room given, no put takes anything (a drain lists what it holds)."""
        while self._flushes:
            await asyncio.wait(set(self._flushes))

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.inbox, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def prune_consumers(self, min_idle_ms: int) -> int:
        """Forget the consumers of ended processes (nothing pending, idle `min_idle_ms`):
        every start adds one, and the group would otherwise grow for ever."""
        removed = await self._with_group(
            self._prune_script, keys=[self.keys.inbox], args=[GROUP, min_idle_ms, self.consumer]
        )
        return int(removed)

    async def put(
        self, message: InboundMessage, kind: EntryKind, chat_session_id: str
    ) -> Accepted | Duplicate:
        """Store one message durably; concurrent calls share one script call (group commit)."""
        # Encoded here: a message JSON cannot hold fails its own caller, not the whole batch.
        item = (
            message.dedupe_key or "",
            kind.value,
            chat_session_id,
            message.to_json(),
            message.sender.id,
        )
        future: asyncio.Future[Accepted | Duplicate] = asyncio.get_running_loop().create_future()
        self._batch.append(_Pending(item, future))
        self._start_flush()
        verdict = await future
        if kind is not EntryKind.TURN and isinstance(verdict, Accepted):
            await self._announce_unqueued()
        return verdict

    async def _announce_unqueued(self) -> None:
        """Tell every process of the bot that a command or notice is stored: one that has no
        room for more turns reads it now, not at its next look (`reach_unqueued`). Stored, it
        is answered either way: a failure here is only logged."""
        try:
            await self.redis.publish(self.keys.control, UNQUEUED_MESSAGE)
        except RedisError as exc:
            log.warning("unqueued_not_announced", error=type(exc).__name__)

    def _start_flush(self) -> None:
        """Unless one is about to start, or enough are on their way, a task of its own
        stores what waits when it first runs, in the loop's next iteration: the calls made
        in this one join it (a callback scheduled to start the task would take the same
        messages one iteration later)."""
        if self._flush_starting or len(self._flushes) >= _PUTS_IN_FLIGHT:
            return
        self._flush_starting = True
        flush = asyncio.get_running_loop().create_task(self._store_waiting())
        self._flushes.add(flush)
        flush.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        """A flush ended: what arrived while the others ran goes next."""
        self._flushes.discard(task)
        if self._batch:
            self._start_flush()

    async def _store_waiting(self) -> None:
        """Store what waits: up to `_MAX_PUT_BATCH` messages, in order."""
        self._flush_starting = False
        batch, self._batch = self._batch[:_MAX_PUT_BATCH], self._batch[_MAX_PUT_BATCH:]
        try:
            verdicts, taken = await self._put_batch(batch)
        except BaseException as exc:  # every waiter must learn the outcome, whatever it was
            for pending in batch:
                if not pending.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        pending.future.cancel()
                    else:
                        pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            if taken:  # first: the turns' tasks run before the webhooks' answers are written
                try:
                    self._hand_over(taken)
                except Exception:  # every webhook is answered whatever happened here
                    log.exception("entries_not_taken", outcome="claimed when idle")
                # One step more for those tasks: each runs up to its upstream request, whose
                # body aiohttp writes in a task of its own; answered at once, the webhooks'
                # 200s went out ahead of that body, on the first token's path.
                await asyncio.sleep(0)
        finally:
            for pending, verdict in zip(batch, verdicts, strict=True):
                if not pending.future.done():
                    outcome = _DUPLICATE if verdict is None else Accepted(as_text(verdict))
                    pending.future.set_result(outcome)

    async def _put_batch(self, batch: list[_Pending]) -> tuple[list[bytes | None], list[Any]]:
        """One EVALSHA for the whole batch, in order with the batches before it (`InOrder`:
        the script missing or a lost connection, the client's own path loads the script,
        reconnects and retries, in turn)."""
        keys = self.keys
        items = orjson.dumps([pending.item for pending in batch])
        args: list[EncodableT] = [DEDUPE_TTL_S, keys.dedupe(""), keys.queue(""), items]
        take = self._take_on_put
        room = min(take.room(), len(batch)) if take is not None else 0
        answer = ""
        if take is None or room == 0:
            args += [GROUP, self.consumer, 0, ""]
        else:
            self._put_calls += 1
            answer = keys.put_answer(f"{self.consumer}:{self._put_calls}")
            args += [GROUP, self.consumer, room, answer, *take.start_args, ANSWER_TTL_S]
        read, self._answers_read = self._answers_read, []
        verdicts, taken = await self._puts.script(
            self._put_script, [keys.inbox, keys.unqueued, *read], args
        )
        if answer and taken:
            self._answers_read.append(answer)
        return list(verdicts), list(taken)

    def _hand_over(self, taken: list[Any]) -> None:
        assert self._take_on_put is not None
        starts = {as_text(entry_id): start for entry_id, _, start in taken}
        rows = [(entry_id, _fields(flat), 1) for entry_id, flat, _ in taken]
        for entry in self._entries(rows):
            try:
                self._take_on_put.take(entry, starts[entry.entry_id])
            except Exception:  # the others are taken, and every webhook is answered
                log.exception("entry_not_taken", entry=entry.entry_id, outcome="claimed when idle")

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (first delivery); `block_ms` None: without waiting."""
        reply = await self._with_group(
            self.redis.xreadgroup,
            GROUP,
            self.consumer,
            {self.keys.inbox: ">"},
            count=count,
            block=block_ms,
        )
        return self._entries(
            (entry_id, fields, 1)
            for _stream, items in reply or []
            for entry_id, fields in items
            if fields
        )

    async def reach_unqueued(self, scan: int) -> int:
        """How many new entries a read must take to reach the first command or notice among
        the next `scan` not yet delivered to any consumer (0: none there). A process with no
        room for more turns still reads those: they never wait behind turns (SPEC §4, §5)."""
        keys = [self.keys.inbox, self.keys.unqueued]
        return int(await self._reach_unqueued(keys=keys, args=[GROUP, scan]))

    def _entries(self, rows: Iterable[tuple[bytes | str, dict[bytes, bytes], int]]) -> list[Entry]:
        """Entries from stream rows; a row that cannot be read is set aside as poison."""
        entries: list[Entry] = []
        for entry_id, fields, deliveries in rows:
            try:
                entries.append(_entry(entry_id, fields, deliveries))
            except (KeyError, ValueError, TypeError) as exc:
                log.error("entry_unreadable", entry=as_text(entry_id), error=str(exc))
                self._unreadable.append((as_text(entry_id), fields))
        return entries

    async def set_aside_unreadable(self) -> None:
        """Dead-letter the rows `read`/`claim` could not parse (they would poison both), and
        take them out of their session queue (the turns behind one would wait for ever)."""
        while self._unreadable:
            entry_id, fields = self._unreadable[0]
            raw = {as_text(k): as_text(v) for k, v in fields.items()}
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.keys.dead,
                    {"raw": json.dumps(raw), "entry": entry_id, "reason": "unreadable"},
                    maxlen=10000,
                )
                pipe.xack(self.keys.inbox, GROUP, entry_id)
                pipe.xdel(self.keys.inbox, entry_id)
                if "s" in raw:
                    pipe.lrem(self.keys.queue(raw["s"]), 1, entry_id)
                await pipe.execute()
            self._unreadable.pop(0)

    async def claim(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries idle on dead consumers, now ours, with how often each was delivered.

        Walks the whole pending list with XAUTOCLAIM's cursor: one call looks at no more
        than 10 × `count` pending entries, and live workers' entries come first in a
        backlog."""
        claimed: list[tuple[bytes | str, dict[bytes, bytes] | None]] = []
        cursor: bytes | str = "0-0"
        for _ in range(_MAX_CLAIM_SCANS):
            reply = await self._with_group(
                self.redis.xautoclaim,
                self.keys.inbox,
                GROUP,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=cursor,
                count=count - len(claimed),
            )
            claimed.extend(reply[1])
            cursor = reply[0]
            if as_text(cursor) == "0-0" or len(claimed) >= count:
                break
        present = [(entry_id, fields) for entry_id, fields in claimed if fields]
        if not present:
            return []
        deliveries = await self._deliveries([as_text(entry_id) for entry_id, _ in present])
        return self._entries(
            (entry_id, fields, deliveries.get(as_text(entry_id), 1)) for entry_id, fields in present
        )

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

    async def keep(self, entry_ids: Sequence[str]) -> set[str]:
        """Reset the idle time of entries we hold, without counting a delivery; the ids
        that are no longer ours (another worker claimed them, or they were acknowledged)."""
        return await self._set_idle(entry_ids, 0)

    async def release(self, entry_ids: Sequence[str], idle_ms: int) -> None:
        """Make entries we will not run claimable at once (drain): their idle time is set
        to `idle_ms` (past BRIDGE_CLAIM_IDLE_S), their delivery count stays."""
        await self._set_idle(entry_ids, idle_ms)

    async def _set_idle(self, entry_ids: Sequence[str], idle_ms: int) -> set[str]:
        if not entry_ids:
            return set()
        lost = await self._with_group(
            self._keep_script,
            keys=[self.keys.inbox],
            args=[GROUP, self.consumer, idle_ms, *entry_ids],
        )
        return {as_text(entry_id) for entry_id in lost}

    async def ack(self, entry: Entry, lock_token: str = "") -> Acked:
        """Done with an entry: acknowledge it, drop it from its queue, journal and lock.
        `NOT_OURS` if another consumer claimed it meanwhile: it is left to that one;
        `ALREADY` if that one acknowledged it already. Our lock is released either way. A
        try whose answer was lost may run again: it finds its own acknowledgement."""
        return await self._ack(entry, [GROUP, entry.entry_id, lock_token, self.consumer])

    async def dead_letter(self, entry: Entry, reason: str, lock_token: str = "") -> Acked:
        """Move an entry to the dead letters and acknowledge it, in one step (as `ack`)."""
        args = [GROUP, entry.entry_id, lock_token, self.consumer, entry.message.to_json(), reason]
        return await self._ack(entry, args)

    async def _ack(self, entry: Entry, args: list[str]) -> Acked:
        keys = [
            self.keys.inbox,
            self.keys.queue(entry.chat_session_id),
            self.keys.journal(entry.entry_id),
            self.keys.lock(entry.chat_session_id),
            self.keys.fence(entry.chat_session_id),
            self.keys.dead,
            self.keys.acked(entry.entry_id),
        ]
        return Acked(await self._with_group(self._hot.script, self._ack_script, keys, args))

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


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as a script returns them (field, value, field, value…)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes], deliveries: int) -> Entry:
    return Entry(
        entry_id=as_text(entry_id),
        message=InboundMessage.from_json(fields[b"m"]),
        kind=EntryKind(as_text(fields[b"k"])),
        chat_session_id=as_text(fields[b"s"]),
        deliveries=deliveries,
    )
