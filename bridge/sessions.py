"""The owner of one chat_session_id's state in Redis: lock, queue order, conversation
reference, history and the turn journal.

The lock is `token:entry_id` under an expiry; the token comes from a per-session counter
(the fence), bumped by every acquisition and every release. Every write a turn makes
(session save, journal piece) checks it, so a holder that lost its lock cannot overwrite
what a newer holder wrote nor journal — and so send — another piece. A lock that merely
expired (a Redis outage, a stalled process) while nobody else took the session is taken
back by its holder: its token is still the fence's value. Only the head of the session's
queue may take the lock, which keeps turns in inbox order across processes.

Attempts of a turn are counted when it takes the lock (the turn starts), in the journal
hash: waiting in the queue is never an attempt, a SIGKILL mid-turn is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.typing import EncodableT, KeyT

from bridge import jsontext
from bridge.config import Rate
from bridge.interfaces import HistoryTurn
from bridge.store import ANSWER_TTL_S, HotPath, Keys, as_text, ride_out

__all__ = [
    "START_TURN",
    "TURN_SCRIPTS",
    "EntryGone",
    "Journal",
    "JournalPiece",
    "LockLost",
    "SessionState",
    "Sessions",
    "Start",
]

# `holds(lock, fence, value, ttl)`: true when `value` is the session's lock; a lock that
# expired while its token is still the fence's value (nobody took it since) is re-set.
_HOLDS = """
local function holds(lock, fence, value, ttl)
  local held = redis.call('GET', lock)
  if held == value then return true end
  if held then return false end
  local token = string.match(value, '^(%d+):')
  if token and redis.call('GET', fence) == token then
    redis.call('SET', lock, value, 'PX', ttl)
    return true
  end
  return false
end
"""

# KEYS: lock, fence. ARGV: lock value, ttl ms.
_RENEW = (
    _HOLDS
    + """
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

# KEYS: lock, fence, journal. ARGV: lock value, lock ttl ms, journal ttl s. The attempt of a
# turn that took its lock while waiting for a turn slot, counted once it has one: 0 if the lock
# was lost meanwhile.
_ATTEMPT = (
    _HOLDS
    + """
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
local attempt = redis.call('HINCRBY', KEYS[3], 'attempts', 1)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return attempt
"""
)

# KEYS: lock, fence. ARGV: lock value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""

# KEYS: lock, fence, session, history, journal. ARGV: lock value, lock ttl ms, ttl ms,
# history max, history entry or '', `created_at` if the session has none yet or '', the
# upstream whose turn this records or '', the field of a piece confirmed sent or '', then
# field/value pairs for the session hash.
# Marks the journal "recorded" and "complete" (a recorded answer is whole), so a replay (or a
# retry) of the turn records it only once and adds no cut-off notice. A recorded turn is
# counted, and it drops a conversation (and history) kept for another upstream. A
# confirmation holds whoever sent the piece, as in a journal write.
_SAVE = (
    _HOLDS
    + """
if ARGV[8] ~= '' then redis.call('HSET', KEYS[5], ARGV[8], '1') end
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
if KEYS[5] ~= KEYS[3] and redis.call('HEXISTS', KEYS[5], 'recorded') == 1 then return 1 end
if ARGV[6] ~= '' then redis.call('HSETNX', KEYS[3], 'created_at', ARGV[6]) end
if ARGV[7] ~= '' then
  local was = redis.call('HGET', KEYS[3], 'upstream')
  if was and was ~= ARGV[7] then
    redis.call('HSET', KEYS[3], 'conversation', '{}')
    redis.call('DEL', KEYS[4])  -- another upstream's history: not this conversation's
  end
  redis.call('HSET', KEYS[3], 'upstream', ARGV[7])
  redis.call('HINCRBY', KEYS[3], 'turns', 1)
end
if #ARGV > 8 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 9))
end
-- Every field of SPEC §5 from the first write on: no reference yet (or none at all, as with
-- OpenAI) is an empty object; no turn recorded yet is 0.
redis.call('HSETNX', KEYS[3], 'conversation', '{}')
redis.call('HSETNX', KEYS[3], 'turns', 0)
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[5])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[4]), -1)
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
if KEYS[5] ~= KEYS[3] then
  redis.call('HSET', KEYS[5], 'recorded', '1', 'complete', '1')
end
return 1
"""
)

# KEYS: lock, fence, session, history. ARGV: lock value, lock ttl ms, ttl ms, now.
# A turn that is not recorded (it failed: the user got its one message) refreshes the session
# all the same: its TTL, its history's, and `last_active`. It counts no turn (`turns` counts
# answered turns) and makes no session where there is none (nothing to keep alive).
_REFRESH = (
    _HOLDS
    + """
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'last_active', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return 1
"""
)

# KEYS: lock, fence, journal. ARGV: lock value, lock ttl ms, journal ttl s, the field of a
# piece confirmed sent or '', then field/value pairs. A piece is journalled (and so may be
# sent) only by the lock's holder; a confirmation holds whoever sent the piece.
_JOURNAL = (
    _HOLDS
    + """
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[4], '1') end
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""
)

# `start_turn(k, a)`: one try to start an entry's turn, in one round trip. k: inbox, queue, lock,
# fence, journal, stop, session, history, the sender's rate counter, the reset mark. a: entry id,
# lock ttl ms, journal ttl s, history turns to read, the sender's message limit (0: no check), its
# window ms, and whether the attempt is counted now (1: a turn slot is free to run it at once; 0:
# it will wait for one, and is counted once it has one — `count_attempt`). Its place in the
# session queue (an entry missing from its queue, which only a lost queue key can cause, is put
# back in stream-id order, unless it is gone from the inbox, acknowledged: then {-1}); with a
# limit, the sender's message counted, {-2} when over it; at the head with the lock free and no
# `/reset` running, the lock (fence+1 → token), the attempt counted (or as counted so far) in
# the journal, whether a `/stop` was recorded for it, and what the turn reads: the journal, the
# session, the history. Read under the lock just taken, they stay as read: only the lock's holder
# writes them, and `/reset` stops the holder first and lets no turn start until it has forgotten
# them.
# Returns {ahead} when it cannot start, else {0, lock value, attempt, stopped, journal
# fields, session fields, history rows}. The start script runs it on its KEYS and ARGV; the
# inbox's put script runs it on the entries it stores and takes (`start_on_put`).
START_TURN = """
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function place(k, id)
  local ahead = redis.call('LPOS', k[2], id)
  if ahead then return ahead end
  if #redis.call('XRANGE', k[1], id, id) == 0 then return -1 end
  local ms, seq = parts(id)
  local queued = redis.call('LRANGE', k[2], 0, -1)
  for i, other in ipairs(queued) do
    local oms, oseq = parts(other)
    if oms and (oms > ms or (oms == ms and oseq > seq)) then
      redis.call('LINSERT', k[2], 'BEFORE', other, id)
      return i - 1
    end
  end
  redis.call('RPUSH', k[2], id)
  return #queued
end
-- What a started turn reads: its journal, the session, the history (as its fields 5 to 7).
local function turn_reads(k, a)
  local history = {}
  if tonumber(a[4]) > 0 then history = redis.call('LRANGE', k[8], -tonumber(a[4]), -1) end
  return redis.call('HGETALL', k[5]), redis.call('HGETALL', k[7]), history
end
local function start_turn(k, a)
  local ahead = place(k, a[1])
  if ahead >= 0 and tonumber(a[5]) > 0 then
    local sent = redis.call('INCR', k[9])
    if sent == 1 then redis.call('PEXPIRE', k[9], a[6]) end
    if sent > tonumber(a[5]) then return {-2} end
  end
  if ahead ~= 0 or redis.call('EXISTS', k[3], k[10]) > 0 then return {ahead} end
  local value = redis.call('INCR', k[4]) .. ':' .. a[1]
  redis.call('EXPIRE', k[4], a[3])  -- with the journals: INCRs after it keep it
  redis.call('SET', k[3], value, 'PX', a[2])
  local attempt
  if a[7] == '1' then
    attempt = redis.call('HINCRBY', k[5], 'attempts', 1)
    redis.call('EXPIRE', k[5], a[3])
  else
    attempt = tonumber(redis.call('HGET', k[5], 'attempts') or '0')
  end
  local stopped = redis.call('GET', k[6]) == a[1] and 1 or 0
  return {0, value, attempt, stopped, turn_reads(k, a)}
end
"""

# `start_turn` on its own (an entry read or claimed later, a waiting turn's next try), with
# KEYS[11], the key of this call's answer, and ARGV[8], its TTL. A try that changed something
# (took the lock and counted the attempt; counted the sender's message) keeps its answer
# there: the same call made again because its answer was lost (a cut connection, a timeout;
# the client's resend, the worker's next try) gets that answer, instead of finding the
# session locked by a token it never learnt (it waited for the lock to expire) and counting
# the attempt again. Kept short (the lock, the attempt, the stop): what the turn reads is
# read again, the same (only the lock's holder writes it).
_START = (
    START_TURN
    + """
local answered = redis.call('GET', KEYS[11])
if answered then
  local kept = cjson.decode(answered)
  if #kept == 1 then return kept end
  return {kept[1], kept[2], kept[3], kept[4], turn_reads(KEYS, ARGV)}
end
local reply = start_turn(KEYS, ARGV)
if #reply > 1 then
  redis.call('SET', KEYS[11], cjson.encode({reply[1], reply[2], reply[3], reply[4]}),
             'EX', ARGV[8])
elseif tonumber(ARGV[5]) > 0 then
  redis.call('SET', KEYS[11], cjson.encode(reply), 'EX', ARGV[8])
end
return reply
"""
)
# The scripts every turn runs (a start read or claimed later, its journal writes, the lock's
# renewal before a notice, the record): loaded when the process starts (`store.load_scripts`).
TURN_SCRIPTS = (_START, _JOURNAL, _RENEW, _SAVE)

# KEYS: lock, fence, session, history, stop, the command's journal, inbox. ARGV: journal ttl
# s, the command's entry id.
# Forget the mapping (/reset); the lock of the stopped turn (the entry named by the stop
# key), if it still holds on, is fenced out so that its saves are refused — and so is a
# lock that expired (its turn's process stalled past it): unfenced, that turn would take
# it back (`holds`) and save the old mapping after the forget. The command's
# journal records that it was done: its redelivery (a process that died before the ack)
# must not forget the new conversation of the turns that came after it. Nor may a delivery
# that stalled past BRIDGE_CLAIM_IDLE_S while another carried the command out: done there
# ('reset' recorded), or acknowledged already (the entry gone from the inbox: -1), nothing
# is forgotten here. Returns {the session as it was} when it forgot it, else 0 or -1.
_FORGET = """
if #redis.call('XRANGE', KEYS[7], ARGV[2], ARGV[2]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[6], 'reset') == 1 then return 0 end
local state = redis.call('HGETALL', KEYS[3])
local held = redis.call('GET', KEYS[1])
local stopped = redis.call('GET', KEYS[5])
if not held then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCR', KEYS[2]) end  -- keeps its TTL
elseif stopped and string.sub(held, -string.len(stopped) - 1) == ':' .. stopped then
  redis.call('DEL', KEYS[1])
  redis.call('INCR', KEYS[2])
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[6], 'reset', '1')
redis.call('EXPIRE', KEYS[6], ARGV[1])
return {state}
"""

# KEYS: lock, stop, the command's journal, inbox, session queue. ARGV: stop key ttl s, journal
# ttl s, the command's entry id, the journal key prefix.
# `/stop` (alone or in `/reset`): the entry whose turn holds the session — or, with no holder,
# the head of the session queue if its turn has started (it let go to be redelivered: a
# failed send, a drain, a Redis error; or its process died) — ('' if none) is
# recorded in the stop key, and in the command's journal, once: a redelivery of the command
# (its process died before the ack) answers what the first delivery stopped, and stops no
# turn that started since. A delivery that stalled past BRIDGE_CLAIM_IDLE_S while another
# carried the command out and acknowledged it finds its entry gone from the inbox (-1): it
# stops nothing (the journal that said what was stopped went with the ack).
_STOP = """
if #redis.call('XRANGE', KEYS[4], ARGV[3], ARGV[3]) == 0 then return -1 end
local done = redis.call('HGET', KEYS[3], 'stopped')
if done then return done end
local held = redis.call('GET', KEYS[1])
local running = held and string.match(held, '^%d+:(.+)$') or ''
if running == '' then
  local head = redis.call('LINDEX', KEYS[5], 0)
  if head and tonumber(redis.call('HGET', ARGV[4] .. head, 'attempts') or '0') > 0 then
    running = head
  end
end
if running ~= '' then redis.call('SET', KEYS[2], running, 'EX', ARGV[1]) end
redis.call('HSET', KEYS[3], 'stopped', running)
redis.call('EXPIRE', KEYS[3], ARGV[2])
return running
"""


# KEYS: stop. ARGV: entry id. The stop key goes once its turn has stopped, unless it names
# another entry already (a `/stop` for the turn after it).
_CLEAR_STOP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the reset mark. ARGV: the reset's token, its hold ms. The mark is the set of the
# resets of the session that run (two command entries may overlap): it ends with the last.
_BEGIN_RESET = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
# KEYS: the reset mark, the command's journal. ARGV: this delivery's token or '', the prefix
# of every token of the command (`<entry id>:`). A delivery's hold ends with it; once the
# command has forgotten the session ('reset' in its journal), so do the holds of its other
# deliveries: one whose process died mid-way would otherwise keep the session's turns from
# starting until its hold expired, after the redelivery had confirmed the reset. 1 if the
# command's reset is done.
_END_RESET = """
if ARGV[1] ~= '' then redis.call('SREM', KEYS[1], ARGV[1]) end
if redis.call('HEXISTS', KEYS[2], 'reset') == 0 then return 0 end
for _, token in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(token, 1, #ARGV[2]) == ARGV[2] then redis.call('SREM', KEYS[1], token) end
end
return 1
"""


class LockLost(Exception):
    """The session's lock is held by another turn (or gone): this turn must not go on."""


class EntryGone(Exception):
    """The command's entry was acknowledged by another worker, which carried it out (this
    one stalled past BRIDGE_CLAIM_IDLE_S): nothing more of it may be done here."""


JOURNAL_TTL_S = 7 * 86400
_OVER_RATE = -2  # what the start script answers for a sender over their limit

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class Journal:
    """The pieces journalled for an entry, whether the answer was complete, and whether the
    turn failed (its last piece is the upstream failure's notice: nothing to record)."""

    pieces: list[JournalPiece]
    complete: bool
    failed: bool = False
    send_refused: bool = False  # the IM refused a piece (after the outbox's retries)

    @property
    def delivered(self) -> bool:
        """The whole answer was journalled and every piece of it confirmed sent."""
        return self.complete and bool(self.pieces) and all(p.sent for p in self.pieces)


@dataclass(frozen=True, slots=True)
class Start:
    """What one try to start an entry's turn found."""

    ahead: int | None  # entries ahead in the session queue; None: gone, or over the rate
    lock: str = ""  # the session lock, when this try took it
    attempt: int = 0  # the turns of this entry started so far, this one too if `counted`
    counted: bool = True  # this try counted the attempt (else: `Sessions.count_attempt`)
    stopped: bool = False  # a `/stop` was recorded for this entry
    journal: Journal = Journal([], complete=False)
    state: SessionState = SessionState(None, None, None, None, 0)
    history: tuple[HistoryTurn, ...] = ()
    over_rate: bool = False  # the sender sent more than their limit: not started


def _pairs(flat: list[bytes]) -> dict[str, str]:
    """A hash as a script returns it (field, value, field, value…)."""
    texts = [as_text(item) for item in flat]
    return dict(zip(texts[::2], texts[1::2], strict=True))


def _state(raw: Mapping[str, str]) -> SessionState:
    # (`{}`: no reference yet)
    conversation = (json.loads(raw["conversation"]) or None) if raw.get("conversation") else None
    return SessionState(
        upstream=raw.get("upstream"),
        conversation=conversation,
        created_at=float(raw["created_at"]) if "created_at" in raw else None,
        last_active=float(raw["last_active"]) if "last_active" in raw else None,
        turns=int(raw.get("turns", 0)),
    )


def _ended(failed: bool) -> list[str]:
    """The journal fields of an answer's end."""
    return ["complete", "1", "failed", "1"] if failed else ["complete", "1"]


def _journal(raw: Mapping[str, str]) -> Journal:
    pieces = []
    for name, value in raw.items():
        if name.startswith("p:"):
            index = int(name[2:])
            data = json.loads(value)
            pieces.append(
                JournalPiece(
                    index, data["text"], data["message_id"], data["mention"], f"s:{index}" in raw
                )
            )
    pieces.sort(key=lambda piece: piece.index)
    return Journal(
        pieces,
        complete=raw.get("complete") == "1",
        failed=raw.get("failed") == "1",
        send_refused=raw.get("send_refused") == "1",
    )


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
        self.ttl_ms = max(int(ttl_s * 1000), 1)  # BRIDGE_SESSION_TTL_S takes decimals
        self.history_turns = history_turns
        # At least as long as an entry's claim (BRIDGE_CLAIM_IDLE_S): renewed on the same
        # tick as the claim, it outlives the claim, so no other turn of the session can
        # start while the entry's worker is alive.
        self.lock_ttl_ms = max(int(lock_ttl_s * 1000), 1000)
        self._hot = HotPath(redis)  # the start, the journal writes, the sent marks, the record
        self._start = redis.register_script(_START)
        self._call_prefix = f"{uuid.uuid4().hex[:12]}:"  # names each start call's answer
        self._start_calls = 0
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._attempt = redis.register_script(_ATTEMPT)
        self._save = redis.register_script(_SAVE)
        self._refresh = redis.register_script(_REFRESH)
        self._journal = redis.register_script(_JOURNAL)
        self._forget = redis.register_script(_FORGET)
        self._stop = redis.register_script(_STOP)
        self._clear_stop = redis.register_script(_CLEAR_STOP)
        self._begin_reset = redis.register_script(_BEGIN_RESET)
        self._end_reset = redis.register_script(_END_RESET)

    # Order and locking

    async def start(
        self,
        chat_session_id: str,
        entry_id: str,
        *,
        with_history: bool,
        sender_rate: tuple[str, Rate] | None = None,
        count_attempt: bool = True,
        call: str | None = None,
    ) -> Start:
        """One try to start the turn of an entry: its place in the session queue and, at
        the head with the lock free, the lock with what the turn needs to begin (the
        history only `with_history`: for upstreams without a memory of their own). With
        `sender_rate` (sender id, limit), the entry's message is counted against its
        sender's limit first, in the same round trip: over it, nothing is started. With
        `count_attempt` False (the turn would wait for a turn slot), its attempt is counted
        once it has one (`count_attempt`): a crash meanwhile costs it none. `call`
        (`new_call`) names the try: made again after a failure with the same name, a try
        whose answer was lost gets that answer (a new name each time otherwise)."""
        sender, rate = sender_rate or ("", Rate(0, 1.0))
        answer = self.keys.start_answer(call or self.new_call())
        reply = await self._hot.script(
            self._start,
            [
                self.keys.inbox,
                self.keys.queue(chat_session_id),
                self.keys.lock(chat_session_id),
                self.keys.fence(chat_session_id),
                self.keys.journal(entry_id),
                self.keys.stop(chat_session_id),
                self.keys.session(chat_session_id),
                self.keys.history(chat_session_id),
                self.keys.user_rate(sender),
                self.keys.resetting(chat_session_id),
                answer,
            ],
            [entry_id, *self._start_args(with_history, rate, count_attempt), ANSWER_TTL_S],
        )
        start = self.parse_start(reply)
        return start if count_attempt else dataclasses.replace(start, counted=False)

    def new_call(self) -> str:
        """A name for a try to start a turn, unique to this process (see `start`)."""
        self._start_calls += 1
        return f"{self._call_prefix}{self._start_calls}"

    def start_on_put(self, *, with_history: bool, rate: Rate) -> list[EncodableT]:
        """What the inbox's put script needs to run `START_TURN` on the turns it stores and
        takes: the key prefixes (queue, lock, fence, journal, stop, session, history, sender's
        rate, reset mark), then the start's arguments after the entry id (a limit of 0: no
        check)."""
        keys = self.keys
        prefixes = [keys.queue(""), keys.lock(""), keys.fence(""), keys.journal("")]
        prefixes += [keys.stop(""), keys.session(""), keys.history(""), keys.user_rate("")]
        prefixes.append(keys.resetting(""))
        return [*prefixes, *self._start_args(with_history, rate, True)]

    def _start_args(self, with_history: bool, rate: Rate, count: bool) -> list[EncodableT]:
        """`START_TURN`'s arguments after the entry id (a limit `count` of 0: no check;
        `count`: the attempt is counted now). A put counts it: it takes no more entries than
        there are free turn slots."""
        turns = self.history_turns * with_history
        window_ms = max(int(rate.per_s * 1000), 1)  # `N/SECONDS` takes decimals: 1/1.5
        return [self.lock_ttl_ms, JOURNAL_TTL_S, turns, rate.count, window_ms, int(count)]

    @staticmethod
    def parse_start(reply: list[Any]) -> Start:
        """A `START_TURN` reply as what the try found."""
        ahead = int(reply[0])
        if ahead < 0:
            return Start(ahead=None, over_rate=ahead == _OVER_RATE)
        if len(reply) == 1:
            return Start(ahead=ahead)
        _, lock, attempt, stopped, journal, session, history = reply
        return Start(
            ahead=0,
            lock=as_text(lock),
            attempt=int(attempt),
            stopped=bool(stopped),
            journal=_journal(_pairs(journal)),
            state=_state(_pairs(session)),
            history=tuple(HistoryTurn(**json.loads(row)) for row in history),
        )

    async def count_attempt(self, chat_session_id: str, entry_id: str, lock_value: str) -> int:
        """Count the attempt of a turn that took its lock without (`Start.counted`), now
        that it has a turn slot; the attempts so far, this one too. `LockLost` if the lock
        was taken over meanwhile."""
        keys = [
            self.keys.lock(chat_session_id),
            self.keys.fence(chat_session_id),
            self.keys.journal(entry_id),
        ]
        args: list[EncodableT] = [lock_value, self.lock_ttl_ms, JOURNAL_TTL_S]
        attempt = int(await self._patient(lambda: self._attempt(keys=keys, args=args)))
        if not attempt:
            raise LockLost("the session lock was taken over while the turn waited for a slot")
        return attempt

    async def renew(self, chat_session_id: str, lock_value: str) -> bool:
        """Whether the lock is still this turn's (renewed); rides out a Redis outage."""
        keys = [self.keys.lock(chat_session_id), self.keys.fence(chat_session_id)]
        args: list[EncodableT] = [lock_value, self.lock_ttl_ms]
        return bool(await self._patient(lambda: self._renew(keys=keys, args=args)))

    async def renew_all(self, locks: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Renew several (session, lock value) in one round trip; those that were lost."""
        if not locks:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session, value in locks:
                await self._renew(
                    keys=[self.keys.lock(session), self.keys.fence(session)],
                    args=[value, self.lock_ttl_ms],
                    client=pipe,
                )
            replies = await pipe.execute()
        return {lock for lock, ok in zip(locks, replies, strict=True) if not ok}

    async def release(self, chat_session_id: str, lock_value: str) -> None:
        """Let go of the lock early (a turn that will run again later): the entry's next
        delivery need not wait for it to expire, and this token can never write again."""
        await self._release(
            keys=[self.keys.lock(chat_session_id), self.keys.fence(chat_session_id)],
            args=[lock_value],
        )

    async def holder(self, chat_session_id: str) -> str | None:
        """The entry id whose turn holds the session, if any."""
        value = await self.redis.get(self.keys.lock(chat_session_id))
        return None if value is None else as_text(value).partition(":")[2]

    async def queue_length(self, chat_session_id: str) -> int:
        """The messages waiting behind the session's running turn (`/status`): its queue
        holds the running entry too, at its head, which is not waiting."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(self.keys.queue(chat_session_id), 0, -1)
            pipe.get(self.keys.lock(chat_session_id))
            queued, lock = await pipe.execute()
        running = None if lock is None else as_text(lock).partition(":")[2]
        return sum(as_text(entry) != running for entry in queued)

    # State

    async def load(self, chat_session_id: str) -> SessionState:
        """The session's state (`/status`); rides out a Redis outage."""
        key = self.keys.session(chat_session_id)
        reply = await self._patient(lambda: self.redis.hgetall(key))
        return _state({as_text(k): as_text(v) for k, v in reply.items()})

    async def save(
        self,
        chat_session_id: str,
        lock_value: str,
        fields: Mapping[str, str | int | float],
        *,
        exchange: HistoryTurn | None = None,
        entry_id: str | None = None,
        created_at: float | None = None,
        turn_of: str = "",
        sent: int | None = None,
    ) -> bool:
        """Write session fields (and one history turn) if we still hold the lock. With
        `entry_id`, this is the turn's record: its journal is marked recorded and complete,
        and `sent` (a piece confirmed since its journal write) marked sent. With
        `created_at`, the session's creation time unless it has one. With `turn_of` (an
        upstream's name), a turn of that upstream is counted; a conversation kept for
        another upstream is dropped (all read and written in the one script)."""
        if sent is not None and entry_id is None:
            raise ValueError("a piece is confirmed in its turn's journal: no entry given")
        args: list[EncodableT] = [
            lock_value,
            self.lock_ttl_ms,
            self.ttl_ms,
            max(self.history_turns, 1),
            jsontext.dumps({"question": exchange.question, "answer": exchange.answer})
            if exchange and self.history_turns
            else "",
            "" if created_at is None else created_at,
            turn_of,
            "" if sent is None else f"s:{sent}",
        ]
        for name, value in fields.items():
            args.extend((name, value))
        session_key = self.keys.session(chat_session_id)
        keys: list[KeyT] = [
            self.keys.lock(chat_session_id),
            self.keys.fence(chat_session_id),
            session_key,
            self.keys.history(chat_session_id),
            self.keys.journal(entry_id) if entry_id else session_key,
        ]
        saved = await self._patient(lambda: self._hot.script(self._save, keys, args))
        return bool(saved)

    async def refresh(self, chat_session_id: str, lock_value: str, *, now: float) -> bool:
        """Refresh the session of a turn that was not recorded (`_REFRESH`), if we still
        hold the lock; rides out a Redis outage."""
        keys: list[KeyT] = [
            self.keys.lock(chat_session_id),
            self.keys.fence(chat_session_id),
            self.keys.session(chat_session_id),
            self.keys.history(chat_session_id),
        ]
        args: list[EncodableT] = [lock_value, self.lock_ttl_ms, self.ttl_ms, now]
        return bool(await self._patient(lambda: self._refresh(keys=keys, args=args)))

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
        return await self.save(
            chat_session_id,
            lock_value,
            {
                "upstream": upstream,
                "conversation": jsontext.dumps(dict(conversation)),
                "last_active": now,
            },
            created_at=now,
        )

    @contextlib.asynccontextmanager
    async def resetting(
        self, chat_session_id: str, command_entry_id: str, *, hold_s: float
    ) -> AsyncIterator[None]:
        """While a `/reset` stops the running turn and forgets the session, no turn of the
        session starts: one queued behind the stopped turn would otherwise start as soon as
        that let go, read the old conversation, and write it back after the forget. Held
        `hold_s` at most: the sessions of a reset whose process died are not blocked long,
        and no longer than the delivery of the command that forgets (`_END_RESET`)."""
        key = self.keys.resetting(chat_session_id)
        token = f"{command_entry_id}:{uuid.uuid4().hex}"
        await self._begin_reset(keys=[key], args=[token, max(int(hold_s * 1000), 1)])
        try:
            yield
        finally:
            await self._end_reset_of(chat_session_id, command_entry_id, token)

    async def _end_reset_of(self, chat_session_id: str, command_entry_id: str, token: str) -> bool:
        keys = [self.keys.resetting(chat_session_id), self.keys.journal(command_entry_id)]
        return bool(await self._end_reset(keys=keys, args=[token, f"{command_entry_id}:"]))

    async def stop(self, chat_session_id: str, command_entry_id: str, *, ttl_s: int) -> str | None:
        """Record a stop of the turn that holds the session, or that started and let go
        of it to be redelivered (kept `ttl_s`), for the command `command_entry_id`; the
        entry it is for, None if no turn was in progress. Once per command: its redelivery
        gets what the first delivery found, and stops nothing new; `EntryGone` if the
        command was acknowledged elsewhere already."""
        running = await self._stop(
            keys=[
                self.keys.lock(chat_session_id),
                self.keys.stop(chat_session_id),
                self.keys.journal(command_entry_id),
                self.keys.inbox,
                self.keys.queue(chat_session_id),
            ],
            args=[ttl_s, JOURNAL_TTL_S, command_entry_id, self.keys.journal("")],
        )
        if isinstance(running, int):
            raise EntryGone("the command was carried out and acknowledged elsewhere")
        return as_text(running) or None

    async def clear_stop(self, chat_session_id: str, entry_id: str) -> None:
        """Drop the session's stop key once the turn of `entry_id` has stopped, unless it is
        another turn's by now: a `/stop` of the next turn would be lost with it (and with it
        any chance to stop that turn, should its Pub/Sub message be missed too)."""
        await self._clear_stop(keys=[self.keys.stop(chat_session_id)], args=[entry_id])

    async def was_reset(self, chat_session_id: str, command_entry_id: str) -> bool:
        """Whether the `/reset` of this command entry has forgotten its session already;
        if so, what is left of its holds of the session ends (a delivery that died after
        the forget)."""
        return await self._end_reset_of(chat_session_id, command_entry_id, "")

    async def forget(self, chat_session_id: str, command_entry_id: str) -> SessionState | None:
        """Drop the conversation mapping and history (the `/reset` command); a stopped turn
        that still holds the lock is fenced out, so it cannot save the old mapping again.
        Recorded in the command's journal (`was_reset`), in the same step. The session as it
        was; None if another delivery of the command forgot it already; `EntryGone` if the
        command was acknowledged elsewhere."""
        reply = await self._forget(
            keys=[
                self.keys.lock(chat_session_id),
                self.keys.fence(chat_session_id),
                self.keys.session(chat_session_id),
                self.keys.history(chat_session_id),
                self.keys.stop(chat_session_id),
                self.keys.journal(command_entry_id),
                self.keys.inbox,
            ],
            args=[JOURNAL_TTL_S, command_entry_id],
        )
        if reply == -1:
            raise EntryGone("the command was carried out and acknowledged elsewhere")
        if not reply:
            return None
        return _state(_pairs(reply[0]))

    # The turn journal

    async def recorded(self, entry_id: str) -> bool:
        """Whether the turn of this entry was already recorded in its session."""
        key = self.keys.journal(entry_id)
        return bool(await self._patient(lambda: self.redis.hexists(key, "recorded")))

    async def journal_piece(
        self,
        chat_session_id: str,
        entry_id: str,
        piece: JournalPiece,
        lock_value: str,
        *,
        complete: bool = False,
        failed: bool = False,
        sent: int | None = None,
    ) -> None:
        """Journal a piece before it is sent; raise `LockLost` if this turn no longer holds
        its session (then the piece must not be sent: a newer holder owns the answer).
        `failed` (with `complete`): the turn failed, this piece is its notice.
        `sent`: a piece confirmed since, marked in the same round trip."""
        data = {"text": piece.text, "message_id": piece.message_id, "mention": piece.mention}
        fields = [f"p:{piece.index}", jsontext.dumps(data)]
        if complete:
            fields += _ended(failed)
        await self._journal_fields(chat_session_id, entry_id, lock_value, fields, sent)

    async def journal_complete(
        self,
        chat_session_id: str,
        entry_id: str,
        lock_value: str,
        *,
        failed: bool = False,
        sent: int | None = None,
    ) -> None:
        """Every piece of the answer is journalled (and `sent` confirmed); `failed`: the
        turn failed, its last piece is its notice."""
        await self._journal_fields(chat_session_id, entry_id, lock_value, _ended(failed), sent)

    async def _journal_fields(
        self,
        chat_session_id: str,
        entry_id: str,
        lock_value: str,
        fields: list[str],
        sent: int | None,
    ) -> None:
        keys: list[KeyT] = [
            self.keys.lock(chat_session_id),
            self.keys.fence(chat_session_id),
            self.keys.journal(entry_id),
        ]
        confirmed = "" if sent is None else f"s:{sent}"
        args: list[EncodableT] = [lock_value, self.lock_ttl_ms, JOURNAL_TTL_S, confirmed, *fields]
        written = await self._patient(lambda: self._hot.script(self._journal, keys, args))
        if not written:
            raise LockLost("the session lock was taken over: the answer is not this turn's")

    async def journal_sent(self, entry_id: str, index: int) -> None:
        key = self.keys.journal(entry_id)
        await self._patient(lambda: self._hot.command("HSET", key, f"s:{index}", "1"))

    async def journal_send_refused(
        self, chat_session_id: str, entry_id: str, lock_value: str, *, refused: bool = True
    ) -> None:
        """The IM refused the first send of a piece of this turn: that piece did not show, it
        is not merely unconfirmed for want of a mark (a crash right after the send). Not
        `refused`: a replay is about to send the pieces again, after which that no longer
        holds. Fenced like a journal write (`LockLost`)."""
        fields = ["send_refused", "1" if refused else "0"]
        await self._journal_fields(chat_session_id, entry_id, lock_value, fields, None)

    async def _patient(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis step of a running turn (idempotent, or harmless again), riding out a
        Redis outage for as long as the turn's lock would live: a Redis restart does not cut
        the answer off. Longer, the entry is redelivered and the fenced writes tell the
        turns apart."""
        return await ride_out(command, self.lock_ttl_ms / 1000)
