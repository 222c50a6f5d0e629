"""The owner of one chat_session_id's state in Redis: lock, queue order, conversation
reference, history and the turn journal.

The lock is `token:entry_id` under an expiry; the token comes from a per-session counter
(a fencing token). Every save checks it, so a holder that lost its lock cannot overwrite
what a newer holder wrote. Only the head of the session's queue may take the lock, which
keeps turns in inbox order across processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from bridge.interfaces import HistoryTurn
from bridge.store import Keys, as_text

__all__ = ["JournalPiece", "SessionState", "Sessions"]

# KEYS: queue, lock, fence. ARGV: entry id, ttl ms. Returns the lock value, or false.
_ACQUIRE = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return false end
local held = redis.call('GET', KEYS[2])
if held and string.sub(held, -string.len(ARGV[1]) - 1) ~= ':' .. ARGV[1] then return false end
local value = redis.call('INCR', KEYS[3]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[2], value, 'PX', ARGV[2])
return value
"""

# KEYS: lock. ARGV: lock value, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, session, history. ARGV: lock value, ttl s, history max, history entry or '',
# then field/value pairs for the session hash.
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if #ARGV > 4 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
"""

JOURNAL_TTL_S = 7 * 86400


@dataclass(frozen=True, slots=True)
class SessionState:
    upstream: str | None
    conversation: dict[str, str] | None
    created_at: float | None
    last_active: float | None
    turns: int


@dataclass(frozen=True, slots=True)
class JournalPiece:
    index: int
    text: str
    message_id: str
    mention: bool
    sent: bool


class Sessions:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        ttl_s: float,
        history_turns: int,
        lock_ttl_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = int(ttl_s) or 1
        self.history_turns = history_turns
        self.lock_ttl_ms = max(int(lock_ttl_s * 1000), 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._save = redis.register_script(_SAVE)

    # Order and locking

    async def position(self, chat_session_id: str, entry_id: str) -> int | None:
        """How many entries are ahead of this one in its session queue."""
        result = await self.redis.lpos(self.keys.queue(chat_session_id), entry_id)
        return result if isinstance(result, int) else None

    async def acquire(self, chat_session_id: str, entry_id: str) -> str | None:
        """The lock value when this entry is at the head of its queue and the lock is free
        (or still held for this very entry by a worker that died)."""
        value = await self._acquire(
            keys=[
                self.keys.queue(chat_session_id),
                self.keys.lock(chat_session_id),
                self.keys.fence(chat_session_id),
            ],
            args=[entry_id, self.lock_ttl_ms],
        )
        return None if value is None else as_text(value)

    async def renew(self, chat_session_id: str, lock_value: str) -> bool:
        renewed = await self._renew(
            keys=[self.keys.lock(chat_session_id)], args=[lock_value, self.lock_ttl_ms]
        )
        return bool(renewed)

    async def holder(self, chat_session_id: str) -> str | None:
        """The entry id whose turn holds the session, if any."""
        value = await self.redis.get(self.keys.lock(chat_session_id))
        return None if value is None else as_text(value).partition(":")[2]

    async def drop_from_queue(self, chat_session_id: str, entry_id: str) -> None:
        await self.redis.lrem(self.keys.queue(chat_session_id), 1, entry_id)

    async def queue_length(self, chat_session_id: str) -> int:
        return int(await self.redis.llen(self.keys.queue(chat_session_id)))

    # State

    async def load(self, chat_session_id: str) -> SessionState:
        raw = {
            as_text(k): as_text(v)
            for k, v in (await self.redis.hgetall(self.keys.session(chat_session_id))).items()
        }
        conversation = json.loads(raw["conversation"]) if raw.get("conversation") else None
        return SessionState(
            upstream=raw.get("upstream"),
            conversation=conversation,
            created_at=float(raw["created_at"]) if "created_at" in raw else None,
            last_active=float(raw["last_active"]) if "last_active" in raw else None,
            turns=int(raw.get("turns", 0)),
        )

    async def history(self, chat_session_id: str) -> tuple[HistoryTurn, ...]:
        if self.history_turns == 0:
            return ()
        rows = await self.redis.lrange(self.keys.history(chat_session_id), -self.history_turns, -1)
        return tuple(HistoryTurn(**json.loads(row)) for row in rows)

    async def save(
        self,
        chat_session_id: str,
        lock_value: str,
        fields: Mapping[str, str | int | float],
        *,
        exchange: HistoryTurn | None = None,
    ) -> bool:
        """Write session fields (and one history turn) if we still hold the lock."""
        args: list[str | int | float] = [
            lock_value,
            self.ttl_s,
            max(self.history_turns, 1),
            json.dumps(
                {"question": exchange.question, "answer": exchange.answer}, ensure_ascii=False
            )
            if exchange and self.history_turns
            else "",
        ]
        for name, value in fields.items():
            args.extend((name, value))
        saved = await self._save(
            keys=[
                self.keys.lock(chat_session_id),
                self.keys.session(chat_session_id),
                self.keys.history(chat_session_id),
            ],
            args=args,
        )
        return bool(saved)

    async def save_conversation(
        self,
        chat_session_id: str,
        lock_value: str,
        upstream: str,
        conversation: Mapping[str, str],
        *,
        now: float | None = None,
    ) -> bool:
        now = time.time() if now is None else now
        state_key = self.keys.session(chat_session_id)
        if not await self.redis.hexists(state_key, "created_at"):
            await self.redis.hsetnx(state_key, "created_at", now)
        return await self.save(
            chat_session_id,
            lock_value,
            {
                "upstream": upstream,
                "conversation": json.dumps(dict(conversation)),
                "last_active": now,
            },
        )

    async def forget(self, chat_session_id: str) -> None:
        """Drop the conversation mapping and history (the `/reset` command)."""
        await self.redis.delete(
            self.keys.session(chat_session_id), self.keys.history(chat_session_id)
        )

    # The turn journal

    async def journal(self, entry_id: str) -> tuple[list[JournalPiece], bool]:
        """The pieces journalled for an entry, and whether the answer was complete."""
        raw = {
            as_text(k): as_text(v)
            for k, v in (await self.redis.hgetall(self.keys.journal(entry_id))).items()
        }
        pieces = []
        for name, value in raw.items():
            if name.startswith("p:"):
                index = int(name[2:])
                data = json.loads(value)
                pieces.append(
                    JournalPiece(
                        index,
                        data["text"],
                        data["message_id"],
                        data["mention"],
                        f"s:{index}" in raw,
                    )
                )
        pieces.sort(key=lambda piece: piece.index)
        return pieces, raw.get("complete") == "1"

    async def journal_piece(self, entry_id: str, piece: JournalPiece) -> None:
        key = self.keys.journal(entry_id)
        data = {"text": piece.text, "message_id": piece.message_id, "mention": piece.mention}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, f"p:{piece.index}", json.dumps(data, ensure_ascii=False))
            pipe.expire(key, JOURNAL_TTL_S)
            await pipe.execute()

    async def journal_sent(self, entry_id: str, index: int) -> None:
        await self.redis.hset(self.keys.journal(entry_id), f"s:{index}", "1")

    async def journal_complete(self, entry_id: str) -> None:
        await self.redis.hset(self.keys.journal(entry_id), "complete", "1")
