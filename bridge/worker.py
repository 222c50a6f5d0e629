"""The workers of one process: take (from the webhooks' puts), read and claim inbox entries,
keep them claimed, run them.

Serial within a session (the session queue and lock), parallel across sessions (up to
BRIDGE_WORKERS turns), commands and notices at once. Every task is tracked and awaited.

An entry held here goes through: waiting (for the head of its session queue and the
session lock) → running (the turn) → finishing ("save, then XACK", shielded). Its claim is
kept alive all along (XCLAIM JUSTID, every BRIDGE_CLAIM_IDLE_S/3) and so is its session
lock once taken; an entry found claimed by another worker, or a lock found taken over, is
given up at once (never acknowledged here). Attempts of a turn are counted when it takes
the session lock, so waiting never counts and never dead-letters a message that has not
run; a command or notice counts its deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from bridge.access import Refusals
from bridge.commands import Commands, wake_message
from bridge.config import Settings
from bridge.inbox import INBOX_SCRIPTS, Acked, Entry, EntryKind, Inbox, TakeOnPut
from bridge.intake import judge
from bridge.interfaces import SendError
from bridge.messages import Catalogue
from bridge.metrics import Metrics
from bridge.relay import Outcome, TurnRunner
from bridge.sessions import TURN_SCRIPTS, EntryGone, LockLost, Sessions, Start
from bridge.store import Keys, as_text, load_scripts, redis_failure
from bridge.tasks import cancel_and_wait, cancel_requested, complete_shielded

__all__ = ["DRAIN_GRACE_S", "Worker"]

log = structlog.get_logger(__name__)

_READ_BLOCK_MS = 1000
_WAIT_POLL_S = 1.0
_LISTEN_POLL_S = 1.0
# With no room for turns, the read loop looks for commands when one is announced on the
# control channel (`Inbox.put`), and at least this often (a Pub/Sub message may be missed).
_FULL_POLL_S = 5.0
_UNQUEUED_SCAN = 64  # how far past the entries delivered it looks for one
_MIN_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0
_PRUNE_IDLE_MS = 3_600_000  # a consumer idle an hour with nothing pending has ended
_HEALTHY_RUN_S = 10.0  # a loop that ran this long without failing starts its backoff over
# The least an ack keeps trying through a Redis outage; else as long as the entry's lock lives.
_MIN_ACK_PATIENCE_S = 10.0
# After BRIDGE_DRAIN_TIMEOUT_S, for interrupted turns' last writes: an upstream told to stop
# (`STOP_TIMEOUT_S`, 5 s), then the sender journalling what it holds (2 s). The unit's
# TimeoutStopSec (45 s) stays above the default drain (25 s) and this.
DRAIN_GRACE_S = 10.0
_RELEASE_TIMEOUT_S = 1.0  # letting go of the claims left, if the grace is spent
_MIN_NOTICE_TRIES = 3  # deliveries past BRIDGE_MAX_ATTEMPTS that try the dead-letter notice


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation redis-py swallowed (see `cancel_requested`)."""
    if cancel_requested():
        raise asyncio.CancelledError


class _Drained(Exception):
    """The process is draining: a turn that has not started stays pending."""


class _Phase(enum.Enum):
    WAITING = "waiting"  # for the head of the session queue, the lock, a turn slot
    RUNNING = "running"
    FINISHING = "finishing"  # acknowledging: nothing may interrupt it


@dataclass
class _Held:
    entry: Entry
    task: asyncio.Task[None] | None = None
    phase: _Phase = _Phase.WAITING
    lock: str = ""  # the session lock, once this entry's turn took it
    stop_requested: bool = False
    lost: bool = False  # another worker owns the entry now, or holds its session
    acked: bool = False
    started_on_put: Start | None = None  # the first try to start it, made by the put
    slot: bool = False  # holds a turn slot: taken before a try that counts its attempt
    start_call: str = ""  # the try to start it whose answer has not come (`Sessions.start`)
    queued: bool = False  # waits behind another entry of its session (holds no turn slot)


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keys: Keys,
        inbox: Inbox,
        sessions: Sessions,
        runner: TurnRunner,
        commands: Commands,
        catalogue: Catalogue,
        metrics: Metrics,
        refusals: Refusals,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.inbox = inbox
        self.sessions = sessions
        self.runner = runner
        self.commands = commands
        self.refusals = refusals
        self.catalogue = catalogue
        self.metrics = metrics
        self.held: dict[str, _Held] = {}
        self.draining = False
        self.closed = False  # drain is over: every loop ends
        self.completed = 0
        self._reading = False  # the read loop has read once: the workers have started
        self._failing: set[str] = set()  # the loops whose last try failed on Redis
        self._failing_since = 0.0  # when the first of them failed (monotonic)
        self._turn_slots = asyncio.Semaphore(settings.workers)
        # What this process holds besides the entries queued behind a turn of their own
        # session: those wait for that turn, not for a worker, and must not keep the other
        # sessions' messages unread while turn slots are free. (They are bounded without
        # this: a session holds at most BRIDGE_SESSION_QUEUE_MAX waiting, the rest "busy".)
        self._max_held = settings.workers * 2 + settings.session_queue_max
        self._room = asyncio.Event()
        # Per session, one event for each entry waiting for it: a waiter that clears its own
        # before it looks again cannot swallow a wake meant for another still looking.
        self._wakers: dict[str, set[asyncio.Event]] = {}
        self._loops: set[asyncio.Task[None]] = set()
        self._with_history = not runner.upstream.keeps_history
        self.on_done: Callable[[Entry], None] | None = None  # the terminal channel waits on it

    @property
    def healthy(self) -> bool:
        """The workers run: the read loop has read, and no loop is failing on Redis now."""
        return self._reading and not self._failing

    def _went_well(self, loop: str) -> None:
        """`loop` reached Redis: a failure it had marked is over. (Each loop clears its own:
        cleared by the read loop alone, a failure of another one lasted while the read loop
        read nothing, e.g. waiting for room while its turns ran, and /readyz said 503.)
        The last one back logs it: else the `redis_unavailable` warnings only stopped."""
        if loop not in self._failing:
            return
        self._failing.discard(loop)
        if not self._failing:
            down_s = round(time.monotonic() - self._failing_since, 1)
            log.info("redis_reconnected", down_s=down_s)

    # Lifecycle

    def start(self) -> None:
        """Start the loops. They need no Redis to start: each waits for it with backoff,
        and the first read makes the consumer group when it is missing. From now on the
        webhooks' puts hand their entries to this worker while it has free turn slots."""
        for loop in (self._read_loop, self._claim_loop, self._keep_loop, self._listen_loop):
            self._spawn_loop(loop)
        rate = self.settings.user_rate
        start_args = self.sessions.start_on_put(with_history=self._with_history, rate=rate)
        self.inbox.take_on_put(TakeOnPut(self._room_for_puts, start_args, self._take_stored))

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work, give running turns `timeout_s`, leave the rest pending (and
        claimable at once by the other processes), then log one summary line."""
        self.draining = True
        started = time.monotonic()
        deadline = started + timeout_s  # one budget for the puts on their way and the turns
        completed_before = self.completed
        for task in self._loops:
            if task.get_name() in ("read", "claim"):
                task.cancel()
        # A put already on its way may still hand entries over: they are held (and so left
        # pending, claimable at once, below) only once it has finished.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.inbox.settled(), timeout_s)
        for wakers in self._wakers.values():
            for waker in wakers:
                waker.set()  # waiting entries see `draining` now, not at their next poll
        held = list(self.held.values())
        tasks = [h.task for h in held if h.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
        interrupted = [h for h in held if h.task is not None and not h.task.done()]
        # An interrupted turn's last writes (what it composed and had not sent; a finished
        # turn's ack, which rides a Redis outage as long as its lock lives) get a grace, not
        # the lock's life: past it, what is unacknowledged stays pending for the next process.
        hard_stop = deadline + DRAIN_GRACE_S
        abandoned = await cancel_and_wait(
            (h.task for h in interrupted if h.task is not None),
            within_s=max(hard_stop - time.monotonic(), 0.0),
        )
        left = [h for h in held if not h.acked and not h.lost]
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(max(hard_stop - time.monotonic(), _RELEASE_TIMEOUT_S)):
                await self.inbox.release(
                    [h.entry.entry_id for h in left], int(self.settings.claim_idle_s * 1000) + 1
                )
        self.closed = True
        await cancel_and_wait(self._loops)
        log.info(
            "drained",
            completed=self.completed - completed_before,
            left_pending=len(left),
            interrupted=len(interrupted),
            abandoned=len(abandoned),
            seconds=round(time.monotonic() - started, 3),
        )

    def _spawn_loop(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        name = loop.__name__.strip("_").removesuffix("_loop")
        task = asyncio.create_task(self._forever(loop), name=name)
        self._loops.add(task)

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop for ever, reconnecting with backoff while Redis is unreachable."""
        backoff = _MIN_BACKOFF_S
        while True:
            began = time.monotonic()
            try:
                await loop()
                return
            except RedisError as exc:
                _raise_if_cancelled()  # a cancelled command may surface as a RedisError
                if not self._failing:
                    self._failing_since = time.monotonic()
                self._failing.add(loop.__name__)
                if not self.refusals.note(exc, loop.__name__):
                    log.warning(
                        "redis_unavailable",
                        loop=loop.__name__,
                        error=type(exc).__name__,
                        reason=redis_failure(exc),
                    )
            except Exception:  # a loop must never die: log it, and run it again
                _raise_if_cancelled()
                log.exception("loop_failed", loop=loop.__name__)
            if time.monotonic() - began > _HEALTHY_RUN_S:
                backoff = _MIN_BACKOFF_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            if loop is self._read_loop:
                with contextlib.suppress(RedisError):
                    await self.inbox.ensure_group()

    # Loops

    async def _read_loop(self) -> None:
        await load_scripts(self.redis, (*INBOX_SCRIPTS, *TURN_SCRIPTS))
        self._went_well("_read_loop")
        block_ms: int | None = None  # the first read answers at once: /readyz waits for it
        while not self.draining:
            room = self._max_held - self._active()
            if room <= 0:
                # No room for more turns; commands and notices are read all the same (with
                # the turns stored before them, which wait here for a turn slot): a `/stop`
                # must not wait for the turn it stops to end. Those turns are taken in up to
                # one scan past the room, all told: else a command after every question of a
                # burst would take the whole burst in here (and its session locks, while the
                # other processes idle), without bound.
                scan = _UNQUEUED_SCAN + room
                self._room.clear()  # (set again by room freed, or a command announced, meanwhile)
                count = await self.inbox.reach_unqueued(scan) if scan > 0 else 0
                self._went_well("_read_loop")
                if not count:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), _FULL_POLL_S)
                    continue
                entries = await self.inbox.read(count=count, block_ms=None)
            else:
                entries = await self.inbox.read(count=min(room, 64), block_ms=block_ms)
            block_ms = _READ_BLOCK_MS
            self._reading = True
            self._went_well("_read_loop")
            if self.draining or cancel_requested():  # read as the drain began: not ours to run
                await self._release_unstarted(entries)
                return
            for entry in entries:
                self._take(entry)
            if entries:
                # the turns just taken send their first command (the start script) before
                # this loop prepares its next XREADGROUP: that is on their first token's path
                await asyncio.sleep(0)
            await self.inbox.set_aside_unreadable()

    async def _claim_loop(self) -> None:
        interval = max(min(self.settings.claim_idle_s / 2, 5.0), 0.05)
        pruned = await self.inbox.prune_consumers(_PRUNE_IDLE_MS)
        if pruned:
            log.info("consumers_pruned", count=pruned)
        while not self.draining:
            entries = await self.inbox.claim(int(self.settings.claim_idle_s * 1000), count=64)
            self._went_well("_claim_loop")
            if self.draining or cancel_requested():
                await self._release_unstarted(entries)
                return
            for entry in entries:
                if entry.entry_id not in self.held:
                    log.info(
                        "entry_claimed",
                        entry=entry.entry_id,
                        deliveries=entry.deliveries,
                        **self._turn_fields(entry),
                    )
                    self._take(entry)
            await self.inbox.set_aside_unreadable()
            await asyncio.sleep(interval)

    async def _keep_loop(self) -> None:
        """Keep our entries claimed and our session locks alive; give up what is not ours
        any more; catch `/stop`s whose message was missed; export the backlog."""
        interval = max(self.settings.claim_idle_s / 3, 0.05)
        while not self.closed:
            # Run again after a failure at once (its backoff has waited): the claims went
            # unrenewed meanwhile, and readiness waits for this loop to reach Redis again.
            if "_keep_loop" not in self._failing:
                await asyncio.sleep(interval)
            lost_entries = await self.inbox.keep(list(self.held))
            _raise_if_cancelled()
            for entry_id in lost_entries:
                self._lose(entry_id, "entry claimed by another worker, or acknowledged")
            # By (session, lock value): a turn that took its session's lock while the renewal
            # of the previous turn's (released by its ack) was on its way is not the one lost.
            # Not the locks of entries just given up: renewed (an expired one taken back),
            # they would hold off the worker that has the entry now for a whole lock time.
            holding = [h for h in self.held.values() if h.lock and not h.acked and not h.lost]
            locks = [(h.entry.chat_session_id, h.lock) for h in holding]
            lost_locks = await self.sessions.renew_all(locks)
            for held, lock in zip(holding, locks, strict=True):
                if lock in lost_locks:
                    self._lose(held.entry.entry_id, "session lock taken over")
            await self._check_stop_keys()
            self.metrics.inbox_pending.set(await self.inbox.pending_count())
            self._went_well("_keep_loop")

    async def _listen_loop(self) -> None:
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.keys.control)
            self._went_well("_listen_loop")
            while not self.closed:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_LISTEN_POLL_S
                )
                _raise_if_cancelled()
                if message is not None:
                    self._on_control(json.loads(message["data"]))

    def _on_control(self, command: dict[str, str]) -> None:
        session = command.get("session", "")
        if command.get("type") == "wake":
            for waker in self._wakers.get(session, ()):
                waker.set()
        elif command.get("type") == "stop":
            self._stop_local(session, command.get("entry", ""))
        elif command.get("type") == "unqueued":
            self._room.set()  # a full read loop looks for the command now

    def _stop_local(self, session: str, entry_id: str) -> None:
        """Stop the turn of `entry_id` if it runs here (or holds its session, about to run)."""
        held = self.held.get(entry_id)
        if held is None or held.entry.chat_session_id != session or not held.lock:
            return
        if held.phase is _Phase.FINISHING or held.stop_requested or held.lost:
            return
        if held.task is not None:
            held.stop_requested = True
            held.task.cancel()

    def _lose(self, entry_id: str, reason: str) -> None:
        """Give up an entry another worker owns now: stop it here, never acknowledge it."""
        held = self.held.get(entry_id)
        if held is None or held.phase is _Phase.FINISHING or held.lost or held.stop_requested:
            return
        log.warning(
            "entry_lost",
            entry=entry_id,
            reason=reason,
            phase=held.phase.value,
            **self._turn_fields(held.entry),
        )
        held.lost = True
        if held.task is not None:
            held.task.cancel()

    async def _check_stop_keys(self) -> None:
        """A `/stop` whose Pub/Sub message was missed is still found in its key."""
        holding = [held for held in self.held.values() if held.lock]
        if not holding:
            return
        values = await self.redis.mget([self.keys.stop(h.entry.chat_session_id) for h in holding])
        for held, value in zip(holding, values, strict=True):
            if value is not None and as_text(value) == held.entry.entry_id:
                self._stop_local(held.entry.chat_session_id, held.entry.entry_id)

    async def _release_unstarted(self, entries: list[Entry]) -> None:
        """Entries delivered to us as the drain began: leave them to the other processes."""
        with contextlib.suppress(RedisError):
            await self.inbox.release(
                [entry.entry_id for entry in entries], int(self.settings.claim_idle_s * 1000) + 1
            )
        _raise_if_cancelled()

    def _room_for_puts(self) -> int:
        """How many entries a put may hand over now: as many as this process could start
        at once (BRIDGE_WORKERS less what it holds). Beyond that they stay in the stream, for
        the read loops of every process — a process that alone receives the webhooks would
        otherwise hold a burst's turns waiting for its own slots while the others idle."""
        # (Entries queued behind their session count here: one may take a turn slot at any
        # moment, and a put starts what it takes with its attempt counted.)
        return 0 if self.draining else max(self.settings.workers - len(self.held), 0)

    def _active(self) -> int:
        """The entries held that do not wait behind their own session."""
        return sum(not held.queued for held in self.held.values())

    def _set_queued(self, held: _Held, queued: bool) -> None:
        if held.queued is queued:
            return
        held.queued = queued
        if queued:
            self._room.set()  # the read loop may take more: this one waits for its session

    def _take_stored(self, entry: Entry, start_reply: list[Any] | None) -> None:
        """An entry a put took for us; for a turn it stored, with its first try to start."""
        start = None if start_reply is None else self.sessions.parse_start(start_reply)
        self._take(entry, start)

    # One entry

    def _take(self, entry: Entry, started_on_put: Start | None = None) -> None:
        held = _Held(entry, started_on_put=started_on_put)
        if started_on_put is not None:
            held.lock = started_on_put.lock  # kept alive (and let go) from now on
        self.held[entry.entry_id] = held
        held.task = asyncio.create_task(self._handle(held), name=f"entry-{entry.entry_id}")

    def _turn_fields(self, entry: Entry) -> dict[str, str]:
        """What every log line about the turn of `entry` carries (SPEC §9); bound in its
        task, given explicitly by the loops that log about it from outside that task."""
        return {
            "bot": self.settings.bot_id,
            "chat_session_id": entry.chat_session_id,
            "msg_id": entry.message.im_msg_id or entry.entry_id,
            "upstream": self.runner.upstream.name,
        }

    async def _handle(self, held: _Held) -> None:
        entry = held.entry
        structlog.contextvars.bind_contextvars(**self._turn_fields(entry))
        try:
            await self._dispatch(held)
            self.completed += 1
        except asyncio.CancelledError:
            if held.stop_requested:
                await asyncio.shield(self._stopped(held))
                return
            if held.lost:
                log.info("entry_given_up", outcome="another worker has it")
                await asyncio.shield(self._let_go(held))  # its lock, for that worker to take
                return
            if held.acked:  # its finishing step ended first: done, it will not run again
                raise
            log.info("turn_interrupted", outcome="will run again")
            await asyncio.shield(self._let_go(held))
            raise
        except _Drained:
            log.info("turn_not_started", outcome="will run again")
            await self._let_go(held)
        except LockLost as exc:
            log.warning("session_lock_lost", reason=str(exc), outcome="another worker has it")
        except EntryGone as exc:  # a command this process stalled on: done elsewhere
            log.warning("entry_gone", reason=str(exc), outcome="acknowledged by another worker")
        except SendError as exc:
            log.error("send_failed", reason=exc.reason, outcome="left pending for redelivery")
            await self._let_go(held)
        except RedisError as exc:
            self.refusals.note(exc, "turn")
            log.warning("redis_error", error=type(exc).__name__, outcome="left pending")
            await self._let_go(held)
        except Exception:
            log.exception("entry_failed", outcome="left pending for redelivery")
            await self._let_go(held)
        finally:
            self._free_slot(held)
            self.held.pop(entry.entry_id, None)
            self._room.set()
            if self.on_done is not None:
                self.on_done(entry)

    async def _let_go(self, held: _Held) -> None:
        """An entry that will run again: free its session lock now (best effort), so its
        next delivery need not wait for the lock to expire."""
        if held.lock:
            with contextlib.suppress(RedisError):
                await self.sessions.release(held.entry.chat_session_id, held.lock)

    async def _dispatch(self, held: _Held) -> None:
        entry = held.entry
        if entry.kind is EntryKind.TURN:
            await self._turn(held)
        elif entry.deliveries > self.settings.max_attempts:
            await self._dead_letter(held, entry.deliveries)
        elif entry.kind is EntryKind.COMMAND:
            reply = await self.commands.answer(entry)
            await self.runner.notice(entry.message.target, entry.entry_id, reply, "reply")
            await self._ack(held)
        else:
            await self._notice(held)

    async def _notice(self, held: _Held) -> None:
        """Answer a notice entry as the configuration of now judges its message: a process
        restarted with other allow lists or another BRIDGE_MAX_INPUT_CHARS may take over one
        left pending (its send had failed). Outside the allow lists now, it is ignored, as a
        new message would be; a question that fits a raised limit now is stored again as the
        turn it is (once, however often this entry is delivered) and answered in its turn."""
        entry = held.entry
        verdict = judge(entry.message, self.settings)
        if verdict.kind is EntryKind.NOTICE:
            text = self.catalogue(
                verdict.notice, length=len(entry.message.text), limit=self.settings.max_input_chars
            )
            await self.runner.notice(entry.message.target, entry.entry_id, text, "notice")
        elif verdict.kind is None:
            log.info("entry_ignored", reason="not in the allow lists")
        else:
            again = entry.message._replace(dedupe_key=f"restored:{entry.entry_id}")
            await self.inbox.put(again, verdict.kind, verdict.chat_session_id)
            log.info("entry_restored", kind=verdict.kind.value, reason="no notice now")
        await self._ack(held)

    async def _turn(self, held: _Held) -> None:
        entry = held.entry
        started = await self._wait_for_turn(held)
        if started.over_rate:
            await self._refuse(held, "rate_limited")
            return
        if started.ahead is not None and not started.lock:
            await self._refuse(held, "busy")
            self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome="busy").inc()
            return
        if started.ahead is None:
            held.lost = True
            log.info("entry_gone", outcome="acknowledged by another worker")
            return
        if started.stopped:  # stopped before it ran (or before a crash)
            await asyncio.shield(self._stopped(held))
            return
        if started.counted and self._out_of_attempts(started.attempt, started):
            await self._dead_letter(held, started.attempt)
            return
        if not held.slot:
            await self._turn_slots.acquire()
            held.slot = True
        try:
            if self.draining:
                raise _Drained
            attempt = started.attempt
            if not started.counted:  # it waited for this slot: its attempt begins now
                attempt = await self.sessions.count_attempt(
                    entry.chat_session_id, entry.entry_id, held.lock
                )
                if self._out_of_attempts(attempt, started):
                    await self._dead_letter(held, attempt)
                    return
            held.phase = _Phase.RUNNING
            self.metrics.inflight_turns.inc()
            log.info("turn_started", attempt=attempt, deliveries=entry.deliveries)
            try:
                outcome = await self.runner.run(entry, started)
            finally:
                self.metrics.inflight_turns.dec()
        finally:
            self._free_slot(held)
        # Not recorded (no save in run()): the refresh is this entry's save. Part of the
        # finishing step, which a drain's deadline waits for: its refusal notice was sent
        # and is not journalled, so a redelivery would send it again.
        refresh = outcome is Outcome.FAILED or started.journal.failed
        held.phase = _Phase.FINISHING
        await complete_shielded(self._finish(held, refresh=refresh))
        if held.lost:  # claimed by another worker meanwhile: its turn now, not done here
            return
        self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome=outcome.value).inc()
        log.info("turn_done", outcome=outcome.value)

    @property
    def _notice_tries(self) -> int:
        """On how many deliveries past the limit the dead-letter notice is tried at most:
        BRIDGE_MAX_ATTEMPTS, and 3 at least."""
        return max(self.settings.max_attempts, _MIN_NOTICE_TRIES)

    def _out_of_attempts(self, attempt: int, started: Start) -> bool:
        """Whether the turn's attempt is past BRIDGE_MAX_ATTEMPTS, and its answer was not
        delivered already. One whose journal says it was, in full (its ack failed: Redis
        out of reach longer than its lock), is no failure: its replay shows nothing and
        acknowledges it, where a dead letter would tell the user it failed. Nor is one
        whose answer was journalled whole and never refused by the IM: its process died
        before it learnt the last sends had gone through (the platform may show them
        already), so it is resent without a notice (SPEC §6), as often as a dead-letter
        notice would be tried; a dead letter would tell the user under the answer that
        the message was dropped."""
        journal, limit = started.journal, self.settings.max_attempts
        if attempt <= limit or journal.delivered:
            return False
        resendable = journal.complete and not journal.send_refused
        return not resendable or attempt > limit + self._notice_tries

    async def _refresh_session(self, held: _Held) -> None:
        """A failed turn keeps its session alive as a recorded one does (SPEC §5: TTL
        refreshed each turn). Best effort: its one message was sent, and a redelivery for
        want of this would send a refusal again."""
        try:
            refreshed = await self.sessions.refresh(
                held.entry.chat_session_id, held.lock, now=time.time()
            )
        except RedisError as exc:
            log.warning("session_not_refreshed", error=type(exc).__name__)
            return
        if not refreshed:
            log.warning("session_not_refreshed", reason="session lock lost")

    async def _wait_for_turn(self, held: _Held) -> Start:
        """Wait for the head of the session queue and its lock; returned without the lock
        when the entry is gone, or when on arrival it found more than
        BRIDGE_SESSION_QUEUE_MAX entries ahead (busy). The lock is kept alive from then
        on, also while the turn waits for a turn slot."""
        entry = held.entry
        session = entry.chat_session_id
        waker = asyncio.Event()
        wakers = self._wakers.setdefault(session, set())
        wakers.add(waker)
        pause = _WAIT_POLL_S
        arriving = True
        # A message is counted against its sender's limit once: on its first delivery's
        # first try (in the same round trip as that try).
        rate = self.settings.user_rate
        sender_rate = None
        if entry.deliveries == 1 and not rate.unlimited:
            sender_rate = (entry.message.sender.id, rate)
        try:
            while True:
                if self.draining:
                    raise _Drained
                waker.clear()
                try:
                    if held.started_on_put is not None:  # the arriving try, made by the put
                        started, held.started_on_put = held.started_on_put, None
                    else:
                        # A try that counts the attempt takes a free turn slot first: tries
                        # made together (a batch read or claimed) would all see the same one
                        # free. With none free the turn would wait, and waiting is no attempt.
                        if not held.slot and not self._turn_slots.locked():
                            await self._turn_slots.acquire()  # free: returns at once
                            held.slot = True
                        # Made again under its name until it is answered: a try whose answer
                        # was lost (Redis out of reach a moment) gets the lock it took.
                        held.start_call = held.start_call or self.sessions.new_call()
                        started = await self.sessions.start(
                            session,
                            entry.entry_id,
                            with_history=self._with_history,
                            sender_rate=sender_rate if arriving else None,
                            count_attempt=held.slot,
                            call=held.start_call,
                        )
                        held.start_call = ""
                except RedisError:  # a waiting entry rides out a Redis outage
                    self._free_slot(held)
                    _raise_if_cancelled()
                    if arriving:
                        raise
                    pause = min(pause * 2, _MAX_BACKOFF_S)
                else:
                    pause = _WAIT_POLL_S
                    held.lock = started.lock
                    if started.lock or started.ahead is None:  # or over the sender's rate
                        return started
                    self._free_slot(held)  # it waits for its session: others may run
                    if arriving and started.ahead > self.settings.session_queue_max:
                        return started
                    self._set_queued(held, True)
                arriving = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waker.wait(), timeout=pause)
                # Given up (lost) in the tick the wake came, the cancel was swallowed by
                # Python 3.11's `wait_for`, whose wait had just completed.
                _raise_if_cancelled()
        finally:
            self._set_queued(held, False)
            wakers.discard(waker)
            if not wakers:
                del self._wakers[session]

    def _free_slot(self, held: _Held) -> None:
        if held.slot:
            held.slot = False
            self._turn_slots.release()

    async def _ack(self, held: _Held, *, dead_reason: str = "") -> bool:
        """Acknowledge (releasing the session lock), retrying through a Redis outage for as
        long as the entry's lock lives, as the turn's other writes do: an answer that was
        delivered should not be redelivered for want of one XACK (a command's reply, which
        no journal records, would be sent again). Meanwhile the keep loop keeps the entry
        claimed; past that, it may be another worker's, which the ack script tells. False if
        another worker claimed the entry meanwhile, or has acknowledged it already: it is
        that worker's (its turn is the one counted)."""
        entry = held.entry
        held.phase = _Phase.FINISHING  # from here on, nothing may interrupt it
        delay = _MIN_BACKOFF_S
        patience_s = max(self.sessions.lock_ttl_ms / 1000, _MIN_ACK_PATIENCE_S)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                if dead_reason:
                    acked = await self.inbox.dead_letter(entry, dead_reason, held.lock)
                else:
                    acked = await self.inbox.ack(entry, held.lock)
                break
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if acked is Acked.NOT_OURS or acked is Acked.ALREADY:
            # This process stalled or lost Redis: another worker has the entry, or is done.
            held.lost = True
            log.warning(
                "entry_lost",
                entry=entry.entry_id,
                reason=("claimed by another worker" if acked is Acked.NOT_OURS
                        else "acknowledged by another worker"),
                phase=held.phase.value,
                outcome="left to it, not acknowledged here",
            )  # fmt: skip
            return False
        held.acked = True
        if acked is Acked.OTHERS_WAIT:  # (a wake for nobody would reach every process)
            with contextlib.suppress(RedisError):
                await self._wake(entry.chat_session_id)
        return True

    async def _finish(self, held: _Held, *, refresh: bool = False) -> bool:
        """Refresh the session of a turn that was not recorded, then acknowledge (which
        releases the session) and wake the session's next turn; False if the entry is
        another worker's (`_ack`)."""
        if refresh:
            await self._refresh_session(held)
        return await self._ack(held)

    async def _wake(self, session: str) -> None:
        await self.redis.publish(self.keys.control, wake_message(session))

    async def _stopped(self, held: _Held) -> None:
        """A stopped turn is acknowledged and never retried; nothing more of it is sent.
        Its stop key stays while the entry is another worker's: that one acknowledges it
        unrun when its turn starts, instead of running it. A stopped turn is a turn of its
        session (SPEC §5: TTL refreshed each turn): the session is refreshed, under the lock,
        before the ack lets the lock go (and so before a `/reset` that stopped it forgets)."""
        if not await self._finish(held, refresh=bool(held.lock) and not held.lost):
            return
        with contextlib.suppress(RedisError):
            await self.sessions.clear_stop(held.entry.chat_session_id, held.entry.entry_id)
        self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome="stopped").inc()
        log.info("turn_stopped")

    async def _refuse(self, held: _Held, notice: str) -> None:
        entry = held.entry
        await self.runner.notice(
            entry.message.target, entry.entry_id, self.catalogue(notice), notice
        )
        await self._ack(held)

    async def _dead_letter(self, held: _Held, delivery: int) -> None:
        """BRIDGE_MAX_ATTEMPTS attempts failed already: tell the user, then move the entry to
        the dead letters and acknowledge it, in one step. A notice the IM refuses (after the
        outbox's retries) raises `SendError`: the entry is left pending, and its next
        delivery, over the limit still, sends the notice again — under the same message_id,
        without running anything — until it gets through, on `_notice_tries` deliveries past
        the limit at most (`delivery` is this one's number): an IM that refuses the group for
        good (the robot removed) must not keep the entry, and the session's later questions
        behind it, for ever. Then it is dead-lettered all the same (SPEC §6), logged."""
        entry = held.entry
        try:
            await self.runner.notice(
                entry.message.target, entry.entry_id, self.catalogue("dead_letter"), "dead"
            )
        except SendError as exc:
            if delivery < self.settings.max_attempts + self._notice_tries:
                raise
            log.error(
                "dead_letter_notice_failed",
                reason=exc.reason,
                tries=delivery - self.settings.max_attempts,
                outcome="dead-lettered without the notice",
            )
        # Attempts are counted up to the limit only: each delivery past it (a notice sent
        # again) runs nothing.
        attempts = self.settings.max_attempts
        if not await self._ack(held, dead_reason=f"{attempts} attempts"):
            return  # another worker has it, or dead-lettered it: counted there
        log.error("dead_lettered", attempts=attempts, deliveries=entry.deliveries)
        self.metrics.dead_letters.inc()
        if entry.kind is EntryKind.TURN:  # a turn's outcome, as `busy` and `stopped` are
            self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome="dead").inc()
