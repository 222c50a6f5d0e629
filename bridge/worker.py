"""The workers of one process: read and claim inbox entries, keep them claimed, run them.

Serial within a session (the session queue and lock), parallel across sessions (up to
BRIDGE_WORKERS turns), commands and notices at once. Every task is tracked and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from bridge.commands import Commands
from bridge.config import Settings
from bridge.inbox import Entry, EntryKind, Inbox
from bridge.intake import judge
from bridge.interfaces import SendError
from bridge.messages import Catalogue
from bridge.metrics import Metrics
from bridge.relay import TurnRunner
from bridge.sessions import Sessions
from bridge.store import Keys, as_text

__all__ = ["Worker"]

log = structlog.get_logger(__name__)

_READ_BLOCK_MS = 1000
_WAIT_POLL_S = 1.0
_MAX_BACKOFF_S = 5.0

# KEYS: counter. ARGV: window s, limit. 1 when the message is within the user's rate.
_USER_RATE = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count <= tonumber(ARGV[2]) and 1 or 0
"""


class _Drained(Exception):
    """The process is draining: a turn that has not started stays pending."""


@dataclass
class _Held:
    entry: Entry
    task: asyncio.Task[None] | None = None
    stop_requested: bool = False
    running: bool = False


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
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.inbox = inbox
        self.sessions = sessions
        self.runner = runner
        self.commands = commands
        self.catalogue = catalogue
        self.metrics = metrics
        self.held: dict[str, _Held] = {}
        self.locks: dict[str, str] = {}  # chat_session_id → lock value, for running turns
        self.draining = False
        self.completed = 0
        self.healthy = False
        self._turn_slots = asyncio.Semaphore(settings.workers)
        self._max_held = settings.workers * 2 + settings.session_queue_max
        self._room = asyncio.Event()
        self._wakers: dict[str, asyncio.Event] = {}
        self._loops: set[asyncio.Task[None]] = set()
        self._user_rate = redis.register_script(_USER_RATE)
        self.on_done: Callable[[Entry], None] | None = None  # the terminal channel waits on it

    # Lifecycle

    def start(self) -> None:
        """Start the loops. They need no Redis to start: each waits for it with backoff,
        and the first read makes the consumer group when it is missing."""
        for loop in (self._read_loop, self._claim_loop, self._keep_loop, self._listen_loop):
            self._spawn_loop(loop)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work, give running turns `timeout_s`, leave the rest pending."""
        self.draining = True
        for name in ("read", "claim"):
            for task in self._loops:
                if task.get_name() == name:
                    task.cancel()
        tasks = [held.task for held in self.held.values() if held.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        left = [held for held in self.held.values() if held.task and not held.task.done()]
        for held in left:
            held.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(h.task for h in left if h.task), return_exceptions=True)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        log.info("drained", completed=self.completed, left_pending=len(left))

    def _spawn_loop(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        name = loop.__name__.strip("_").removesuffix("_loop")
        task = asyncio.create_task(self._forever(loop), name=name)
        self._loops.add(task)

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop, reconnecting with backoff while Redis is unreachable."""
        backoff = 0.1
        while True:
            try:
                await loop()
                return
            except RedisError as exc:
                self.healthy = False
                log.warning("redis_unavailable", loop=loop.__name__, error=type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                if loop is self._read_loop:
                    with contextlib.suppress(RedisError):
                        await self.inbox.ensure_group()

    # Loops

    async def _read_loop(self) -> None:
        while True:
            room = self._max_held - len(self.held)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            entries = await self.inbox.read(count=min(room, 64), block_ms=_READ_BLOCK_MS)
            self.healthy = True
            for entry in entries:
                self._take(entry)

    async def _claim_loop(self) -> None:
        interval = max(min(self.settings.claim_idle_s / 2, 5.0), 0.05)
        while True:
            entries = await self.inbox.claim(int(self.settings.claim_idle_s * 1000), count=64)
            for entry in entries:
                if entry.entry_id not in self.held:
                    log.info(
                        "entry_claimed",
                        msg_id=entry.message.im_msg_id,
                        entry=entry.entry_id,
                        deliveries=entry.deliveries,
                    )
                    self._take(entry)
            await asyncio.sleep(interval)

    async def _keep_loop(self) -> None:
        interval = max(self.settings.claim_idle_s / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self.inbox.keep(list(self.held))
            for session, lock in list(self.locks.items()):
                if not await self.sessions.renew(session, lock):
                    log.warning("session_lock_lost", chat_session_id=session)
            await self._check_stop_keys()
            self.metrics.inbox_pending.set(await self.inbox.pending_count())

    async def _listen_loop(self) -> None:
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.keys.control)
            async for message in pubsub.listen():
                self._on_control(json.loads(message["data"]))

    def _on_control(self, command: dict[str, str]) -> None:
        session = command.get("session", "")
        if command.get("type") == "wake":
            waker = self._wakers.get(session)
            if waker is not None:
                waker.set()
        elif command.get("type") == "stop":
            self._stop_local(session, command.get("entry", ""))

    def _stop_local(self, session: str, entry_id: str) -> None:
        held = self.held.get(entry_id)
        if held is None or held.entry.chat_session_id != session or not held.running:
            return
        if held.task is not None and not held.stop_requested:
            held.stop_requested = True
            held.task.cancel()

    async def _check_stop_keys(self) -> None:
        """A `/stop` whose Pub/Sub message was missed is still found in its key."""
        running = [held for held in self.held.values() if held.running]
        if not running:
            return
        values = await self.redis.mget([self.keys.stop(h.entry.chat_session_id) for h in running])
        for held, value in zip(running, values, strict=True):
            if value is not None and as_text(value) == held.entry.entry_id:
                self._stop_local(held.entry.chat_session_id, held.entry.entry_id)

    # One entry

    def _take(self, entry: Entry) -> None:
        held = _Held(entry)
        self.held[entry.entry_id] = held
        held.task = asyncio.create_task(self._handle(held), name=f"entry-{entry.entry_id}")

    async def _handle(self, held: _Held) -> None:
        entry = held.entry
        message = entry.message
        structlog.contextvars.bind_contextvars(
            bot=self.settings.bot_id,
            chat_session_id=entry.chat_session_id,
            msg_id=message.im_msg_id or entry.entry_id,
            upstream=self.runner.upstream.name,
        )
        try:
            await self._dispatch(held)
            self.completed += 1
        except asyncio.CancelledError:
            if held.stop_requested:
                await asyncio.shield(self._stopped(held))
                return
            log.info("turn_interrupted", outcome="will run again")
            raise
        except _Drained:
            log.info("turn_not_started", outcome="will run again")
        except SendError as exc:
            log.error("send_failed", reason=exc.reason, outcome="left pending for redelivery")
        except RedisError as exc:
            log.warning("redis_error", error=type(exc).__name__, outcome="left pending")
        except Exception:
            log.exception("entry_failed", outcome="left pending for redelivery")
        finally:
            self.held.pop(entry.entry_id, None)
            self._room.set()
            if self.on_done is not None:
                self.on_done(entry)

    async def _dispatch(self, held: _Held) -> None:
        entry = held.entry
        if entry.deliveries > self.settings.max_attempts:
            await self._dead_letter(entry)
        elif entry.kind is EntryKind.COMMAND:
            reply = await self.commands.answer(entry)
            await self.runner.notice(entry.message.target, entry.entry_id, reply, "reply")
            await self.inbox.ack(entry)
        elif entry.kind is EntryKind.NOTICE:
            verdict = judge(entry.message, self.settings)
            text = self.catalogue(
                verdict.notice, length=len(entry.message.text), limit=self.settings.max_input_chars
            )
            await self.runner.notice(entry.message.target, entry.entry_id, text, "notice")
            await self.inbox.ack(entry)
        else:
            await self._turn(held)

    async def _turn(self, held: _Held) -> None:
        entry = held.entry
        session = entry.chat_session_id
        if entry.deliveries == 1 and not await self._within_user_rate(entry):
            await self._refuse(entry, "rate_limited")
            return
        ahead = await self.sessions.position(session, entry.entry_id)
        if ahead is None:  # its queue was lost: take a place at the end again
            await self.redis.rpush(self.keys.queue(session), entry.entry_id)
        elif ahead > self.settings.session_queue_max:
            await self._refuse(entry, "busy")
            self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome="busy").inc()
            return
        lock = await self._wait_for_turn(entry)
        async with self._turn_slots:
            if self.draining:
                raise _Drained
            held.running = True
            self.locks[session] = lock
            self.metrics.inflight_turns.inc()
            try:
                outcome = await self.runner.run(entry, lock)
            finally:
                held.running = False
                self.locks.pop(session, None)
                self.metrics.inflight_turns.dec()
        await asyncio.shield(self._finish(entry, lock))
        self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome=outcome.value).inc()
        log.info("turn_done", outcome=outcome.value)

    async def _wait_for_turn(self, entry: Entry) -> str:
        session = entry.chat_session_id
        waker = self._wakers.setdefault(session, asyncio.Event())
        try:
            while True:
                if self.draining:
                    raise _Drained
                lock = await self.sessions.acquire(session, entry.entry_id)
                if lock is not None:
                    return lock
                waker.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waker.wait(), timeout=_WAIT_POLL_S)
        finally:
            if not any(
                h.entry.chat_session_id == session and h.entry is not entry
                for h in self.held.values()
            ):
                self._wakers.pop(session, None)

    async def _finish(self, entry: Entry, lock: str) -> None:
        """Acknowledge (which releases the session), then wake the session's next turn."""
        await self.inbox.ack(entry, lock)
        await self._wake(entry.chat_session_id)

    async def _wake(self, session: str) -> None:
        await self.redis.publish(
            self.keys.control, json.dumps({"type": "wake", "session": session})
        )

    async def _stopped(self, held: _Held) -> None:
        entry = held.entry
        await self.inbox.ack(entry, self.locks.pop(entry.chat_session_id, ""))
        await self.redis.delete(self.keys.stop(entry.chat_session_id))
        await self._wake(entry.chat_session_id)
        self.metrics.turns.labels(upstream=self.runner.upstream.name, outcome="stopped").inc()
        log.info("turn_stopped")

    async def _refuse(self, entry: Entry, notice: str) -> None:
        await self.runner.notice(
            entry.message.target, entry.entry_id, self.catalogue(notice), notice
        )
        await self.inbox.ack(entry)
        await self._wake(entry.chat_session_id)

    async def _within_user_rate(self, entry: Entry) -> bool:
        rate = self.settings.user_rate
        if rate.unlimited:
            return True
        allowed = await self._user_rate(
            keys=[self.keys.user_rate(entry.message.sender.id)],
            args=[max(int(rate.per_s), 1), rate.count],
        )
        return bool(allowed)

    async def _dead_letter(self, entry: Entry) -> None:
        log.error("dead_lettered", deliveries=entry.deliveries)
        try:
            await self.runner.notice(
                entry.message.target, entry.entry_id, self.catalogue("dead_letter"), "dead"
            )
        except SendError as exc:  # the entry goes to the dead letters all the same
            log.error("dead_letter_notice_failed", reason=exc.reason)
        await self.inbox.dead_letter(entry, f"delivered {entry.deliveries} times")
        await self._wake(entry.chat_session_id)
        self.metrics.dead_letters.inc()
