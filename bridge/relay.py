"""One turn: question → upstream stream → composer → journal → IM, and its outcome.

A turn whose entry already has journalled pieces never asks the upstream again: it sends
the pieces not yet confirmed, with their original message ids, then a cut-off notice if
the answer was not complete (SPEC §6). Pieces are journalled before they are sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from redis.exceptions import RedisError

from bridge.compose import Composer, FlushPolicy, Standalone
from bridge.config import Settings
from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    TextReplace,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamFailure
from bridge.inbox import Entry
from bridge.interfaces import (
    HistoryTurn,
    ImageInput,
    Piece,
    ReplyTarget,
    SendError,
    Turn,
    Upstream,
)
from bridge.messages import Catalogue
from bridge.metrics import Metrics
from bridge.outbox import Outbox
from bridge.sessions import Journal, JournalPiece, LockLost, Sessions, Start
from bridge.surrogates import SurrogateJoiner
from bridge.tasks import cancel_and_wait, complete_shielded
from bridge.think import ThinkSplitter

__all__ = ["Outcome", "PrepareInput", "TurnRunner", "message_id"]

log = structlog.get_logger(__name__)

_FAILURE_MESSAGES = {
    ErrorKind.UNAVAILABLE: "upstream_unavailable",
    ErrorKind.AUTH: "upstream_auth",
    ErrorKind.NOT_FOUND: "upstream_not_found",
    ErrorKind.RATE_LIMITED: "upstream_rate_limited",
    ErrorKind.TIMEOUT: "upstream_timeout",
    ErrorKind.BROKEN: "cut_off",
    ErrorKind.REJECTED: "upstream_rejected",
    ErrorKind.PROTOCOL: "upstream_rejected",
    ErrorKind.TOO_LONG: "answer_too_long",
}
# After text has shown, the notice says it is incomplete, and why: an answer the upstream
# gave up on (its own error, a stream we cannot read), or an overload or outage it reported.
_MIDWAY_MESSAGES = {
    ErrorKind.REJECTED: "rejected_midway",
    ErrorKind.PROTOCOL: "rejected_midway",
    ErrorKind.RATE_LIMITED: "rate_limited_midway",
    ErrorKind.UNAVAILABLE: "unavailable_midway",
}
_OPERATORS_TO_FIX = (ErrorKind.AUTH, ErrorKind.NOT_FOUND)  # logged at error level
_TICK_S = 0.25
_REST_JOURNAL_S = 2.0  # an interrupted turn's last journal writes, at most
_CUT_SHORT_WAIT_S = 15.0  # for a cancelled turn to cancel its sender (its upstream closing)
_TOKENS = (TextDelta, ReasoningDelta)
_SHOWN = (TextDelta, TextReplace)
_COMPOSED = (TextDelta, ReasoningDelta, TextReplace, AgentSwitch, Suggestions)  # the rest: _handle


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"  # the upstream failed; the user got its one message
    REPLAYED = "replayed"


# Turns an entry's message into the question's text and images; may refuse with a notice key.
PrepareInput = Callable[[Entry], Awaitable["PreparedInput"]]


@dataclass(frozen=True, slots=True)
class PreparedInput:
    text: str
    images: tuple[ImageInput, ...] = ()
    refusal: str = ""  # a catalogue key: answer with it instead of asking the upstream
    refusal_values: dict[str, object] = field(default_factory=dict)


def message_id(bot_id: str, entry_id: str, label: str | int) -> str:
    """A stable id for a piece of an entry's answer: the same on every resend. The bot's id
    is part of it: bots sending through one Yach app number their inbox entries each for
    itself, and the platform shows a message_id once."""
    key = f"{bot_id}/{entry_id}/{label}"
    return hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:32]


@dataclass
class _Outgoing:
    """The pieces of one turn on their way out, in order, merged while they wait.

    Interrupted (a drain's deadline, `/stop`, the session lost), it journals what it had
    not journalled yet — pieces waiting for the send budget, and the answer's end — so
    that the replay sends them instead of dropping them (SPEC §4: excess is queued, never
    dropped). The writes are fenced by the lock as always; a stopped entry is never
    replayed (its stop key says so). It sends nothing more from the moment the turn is
    asked to stop, before that reaches the turn (`_cut_short`)."""

    runner: TurnRunner
    entry: Entry
    lock: str  # the session lock: only its holder may journal (and so send) a piece
    notice: _ThinkingNotice  # on its way, it goes out before the first piece
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    index: int = 0  # of the next piece to journal
    # Set before the end (None) is queued: the turn's record follows, and its one write marks
    # the journal complete and `unmarked` sent (no journal write of the end's own).
    record_follows: bool = False
    unmarked: int | None = None  # the piece sent and not yet marked, left to the record
    # Taken from the queue and not journalled yet, in order: held back while merging, or
    # put back when interrupted before its journal write.
    _carried: collections.deque[str] = field(default_factory=collections.deque)
    _ended: bool = False  # the end (None) was taken from the queue
    _took_text: bool = False  # a text was taken from the queue (maybe not journalled yet)
    _end_journalled: bool = False
    _confirmed: int | None = None  # sent; marked with the next journal write
    # The turn's task, and how many cancellations it had been asked when this one began.
    _turn: asyncio.Task[Any] | None = None
    _cancels: int = 0

    def __post_init__(self) -> None:
        self._turn = asyncio.current_task()
        self._cancels = self._turn.cancelling() if self._turn is not None else 0

    async def run(self) -> None:
        try:
            await self._send_all()
        except asyncio.CancelledError:
            with contextlib.suppress(TimeoutError, LockLost, RedisError):
                await complete_shielded(self._journal_rest())
            raise

    async def _send_all(self) -> None:
        target = self.entry.message.target
        outbox = self.runner.outbox
        # Where the IM shows a message_id once, a confirmation always waits for the next
        # journal write: a replay that resends the piece shows nothing twice.
        deferred = outbox.dedupes(target)
        while (text := await self._next()) is not None:
            try:
                if not self.index:
                    await self.notice.before_first_message()
                await outbox.acquire(target)
                if self._cut_short():
                    await self._until_cancelled()
            except asyncio.CancelledError:
                self._carried.appendleft(text)
                raise
            piece, last = await self._journal(text)
            if self._cut_short():
                await self._until_cancelled()
            try:
                await outbox.deliver(target, _as_piece(piece), budget_taken=True)
            except SendError:
                await self._refused()
                raise
            if last and self.record_follows:
                self.unmarked = piece.index
                return
            if not last and (deferred or self._next_is_ready(target)):
                self._confirmed = piece.index
            else:
                self._confirmed = None
                await self.runner.sessions.journal_sent(self.entry.entry_id, piece.index)
            if last:
                return
        # The end came after the last piece had gone out.
        if self.record_follows:
            self.unmarked = self._confirmed
        elif self.index:  # a failed turn: its notice went last
            await self._journal_end()

    async def _refused(self) -> None:
        """The IM refused a piece's first send: the journal says so (best effort), for that
        piece did not show. (A replay's resend proves nothing: an earlier try may have shown
        the piece, its process dying before the mark.)"""
        with contextlib.suppress(LockLost, RedisError):
            await self.runner.sessions.journal_send_refused(
                self.entry.chat_session_id, self.entry.entry_id, self.lock
            )

    def _cut_short(self) -> bool:
        """Whether the turn is being cancelled (`/stop`, a drain's deadline, the session
        lost): then nothing more goes out (a plain check: it comes twice in every piece)."""
        turn = self._turn
        return turn is not None and turn.cancelling() > self._cancels

    async def _until_cancelled(self) -> None:
        """Wait for the turn to cancel the sender in turn, which journals what waits, the
        composer's leftovers included. (The cancellation may take seconds to reach the turn:
        an upstream's generator on its way out first asks the upstream to stop generating —
        Dify, ChatGPT — and may wait `STOP_TIMEOUT_S` for it.) Bounded all the same: past
        the bound, it journals what waits and ends."""
        await asyncio.sleep(_CUT_SHORT_WAIT_S)  # until cancelled: the turn's end does
        raise asyncio.CancelledError

    async def _journal_rest(self) -> None:
        """Journal, without sending, what waits: for the replay to send (bounded: a drain
        must end; past the bound the replay sends what was journalled, and its notice)."""
        async with asyncio.timeout(_REST_JOURNAL_S):
            while (text := self._take_waiting()) is not None:
                await self._journal(text)
            # The end taken (here, or before a send cut short): the journal says the answer
            # is whole — else the replay would add a cut-off notice to a whole answer.
            if self._ended and self.index and not self._end_journalled:
                await self._journal_end()

    async def _journal(self, text: str) -> tuple[JournalPiece, bool]:
        """Journal the next piece — `text` and what waits behind it, merged — fenced by the
        lock; whether it is the last."""
        text = self._merge_waiting(text)
        last = self._ended and not self._carried
        target = self.entry.message.target
        piece = JournalPiece(
            self.index,
            text,
            message_id(self.runner.settings.bot_id, self.entry.entry_id, self.index),
            mention=self.index == 0 and not target.is_direct,
            sent=False,
        )
        try:
            await self.runner.sessions.journal_piece(
                self.entry.chat_session_id,
                self.entry.entry_id,
                piece,
                self.lock,
                complete=last,
                failed=last and not self.record_follows,
                sent=self._confirmed,
            )
        except asyncio.CancelledError:
            # Written or not: journalled again under the same index, which is harmless.
            self._carried.appendleft(text)
            raise
        self.index += 1
        self._end_journalled = last
        return piece, last

    async def _journal_end(self) -> None:
        """The journal complete (the record's write does it for an answered turn that is not
        cut short), a failed turn's marked `failed`."""
        await self.runner.sessions.journal_complete(
            self.entry.chat_session_id,
            self.entry.entry_id,
            self.lock,
            failed=not self.record_follows,
            sent=self._confirmed,
        )
        self._end_journalled = True

    @property
    def has_text(self) -> bool:
        """Whether a text is on its way out: queued, or taken by the sender — journalled, or
        held while it waits for the send budget (the queue's state alone misses that one)."""
        return self._took_text or not self.queue.empty()

    async def _next(self) -> str | None:
        """The next text to go out, waiting for one; None at the end."""
        if self._carried:
            return self._carried.popleft()
        if self._ended:
            return None
        return self._taken(await self.queue.get())

    def _take_waiting(self) -> str | None:
        """The next text already waiting (carried, or queued); None if there is none."""
        if self._carried:
            return self._carried.popleft()
        if self._ended or self.queue.empty():
            return None
        return self._taken(self.queue.get_nowait())

    def _taken(self, text: str | None) -> str | None:
        self._ended = text is None
        self._took_text = self._took_text or text is not None
        return text

    def _next_is_ready(self, target: ReplyTarget) -> bool:
        """Whether the next write can follow at once: something waits to go out and its
        send needs no budget (no wait between this send and the next journal write)."""
        waiting = bool(self._carried) or not self.queue.empty()
        return waiting and self.runner.outbox.budget_free(target)

    def _merge_waiting(self, text: str) -> str:
        """Join the pieces that queued up behind the budget, up to the message limit."""
        if not self._carried and self.queue.empty():  # (nearly always, at one piece a token)
            return text
        limit = self.runner.max_chars
        while (following := self._take_waiting()) is not None:
            if (
                len(text) + len(following) > limit
                or isinstance(following, Standalone)
                or isinstance(text, Standalone)
            ):
                self._carried.appendleft(following)
                break
            text += following
        return text


class _ThinkingNotice:
    """A turn's "thinking" notice: sent once `delay_s` passed without answer text showing
    (the timer starts with the turn: image work and the connect count too). Once it is on
    its way (being sent, or retried), it shows before the turn's first message."""

    def __init__(self, send: Callable[[], Coroutine[Any, Any, None]], delay_s: float) -> None:
        self._send = send
        self._needed = True
        self._sending: asyncio.Task[None] | None = None
        # A timer, not a task waiting for its time: most turns never send the notice.
        self._timer = (
            asyncio.get_running_loop().call_later(delay_s, self._due) if delay_s > 0 else None
        )

    def not_needed(self) -> None:
        """Answer text shows, or the stream has ended: no notice from now on."""
        self._needed = False
        if self._timer is not None:
            self._timer.cancel()

    def _due(self) -> None:
        self._sending = asyncio.create_task(self._send_if_needed())

    async def _send_if_needed(self) -> None:
        # After a stall the text may come in the very tick the timer fired: no notice then.
        if self._needed:
            await self._send()

    async def before_first_message(self) -> None:
        """No notice from now on, and one on its way goes first. Without one, nothing to
        wait for: the first piece is on the first-token path."""
        self.not_needed()
        if self._sending is not None:
            await asyncio.wait([self._sending])

    async def aclose(self) -> None:
        self.not_needed()
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)


class _Ticker:
    """One timer for every streaming turn of the process: each tick lets each composer
    flush what waited `max_wait_s` (a task per turn would wake 4× a second per turn)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._turns: dict[int, tuple[Composer, _Outgoing]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, composer: Composer, outgoing: _Outgoing) -> None:
        self._turns[id(outgoing)] = (composer, outgoing)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="flush-ticker")

    def discard(self, outgoing: _Outgoing) -> None:
        self._turns.pop(id(outgoing), None)

    async def _run(self) -> None:
        try:
            while self._turns:  # ends with the last turn; the next one starts it again
                await asyncio.sleep(_TICK_S)
                now = self._clock()
                for composer, outgoing in list(self._turns.values()):
                    for text in composer.tick(now):
                        outgoing.queue.put_nowait(text)
        finally:
            self._task = None


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[Event]) -> AsyncIterator[AsyncIterator[Event]]:
    """Close an upstream's generator on exit, so `/stop` frees its connection at once."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _finished_well(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _as_piece(piece: JournalPiece) -> Piece:
    return Piece(piece.text, piece.message_id, mention=piece.mention)


class TurnRunner:
    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        outbox: Outbox,
        upstream: Upstream,
        catalogue: Catalogue,
        metrics: Metrics,
        prepare: PrepareInput,
        *,
        policy: FlushPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.outbox = outbox
        self.upstream = upstream
        self.catalogue = catalogue
        self.metrics = metrics
        self.prepare = prepare
        self.policy = policy
        self.max_chars = policy.max_chars
        self.clock = clock
        self._ticker = _Ticker(clock)

    async def notice(self, target: ReplyTarget, entry_id: str, text: str, label: str) -> None:
        """One of the bot's own messages: sent at once, never journalled."""
        piece = Piece(
            text,
            message_id(self.settings.bot_id, entry_id, label),
            mention=not target.is_direct,
            kind="notice",
        )
        await self.outbox.deliver(target, piece)

    async def run(self, entry: Entry, start: Start) -> Outcome:
        """Run the turn of an entry whose session lock was taken: `start` is what the
        taking read (the lock, the journal, the session state and history)."""
        lock, journal = start.lock, start.journal
        if journal.pieces:
            return await self._replay(entry, lock, journal)
        notice = _ThinkingNotice(
            lambda: self._turn_notice(entry, lock, self.catalogue("thinking"), "thinking"),
            self.settings.thinking_notice_s,
        )
        try:
            prepared = await self.prepare(entry)
            if prepared.refusal:
                await notice.before_first_message()
                text = self.catalogue(prepared.refusal, **prepared.refusal_values)
                await self._turn_notice(entry, lock, text, "refusal")
                return Outcome.FAILED
            return await self._ask(entry, start, prepared, notice)
        finally:
            await notice.aclose()

    async def _turn_notice(self, entry: Entry, lock: str, text: str, label: str) -> None:
        """A notice of a running turn ("thinking", a refusal): not journalled, but sent only
        while the turn holds its session, checked right before the send as a replayed piece
        is. A turn whose process stalled past BRIDGE_CLAIM_IDLE_S (SIGSTOP, a partition) found
        its notice overdue once resumed and sent it — after the answer of the turn that took
        its entry over. `LockLost` instead."""
        if not await self.sessions.renew(entry.chat_session_id, lock):
            raise LockLost(f"the session lock was taken over: no {label} notice")
        await self.notice(entry.message.target, entry.entry_id, text, label)

    async def _replay(self, entry: Entry, lock: str, journal: Journal) -> Outcome:
        target, pieces = entry.message.target, journal.pieces
        log.info(
            "turn_replayed",
            pieces=len(pieces),
            unsent=sum(not p.sent for p in pieces),
            complete=journal.complete,
        )
        cut_off_id = message_id(self.settings.bot_id, entry.entry_id, "cut_off")
        if journal.send_refused:  # the pieces go out again: they may show this time
            await self.sessions.journal_send_refused(
                entry.chat_session_id, entry.entry_id, lock, refused=False
            )
        if not journal.complete:
            # The notice is journalled too, fenced by the lock like any piece: a turn that
            # lost its session (a stall) must not add it after the new holder went on, and
            # a later replay resends it under the same message_id instead of adding one.
            notice = JournalPiece(
                pieces[-1].index + 1,
                self.catalogue("cut_off"),
                cut_off_id,
                mention=not target.is_direct,
                sent=False,
            )
            await self.sessions.journal_piece(
                entry.chat_session_id, entry.entry_id, notice, lock, complete=True
            )
            pieces = [*pieces, notice]
        for piece in pieces:
            if not piece.sent:
                # Checked right before each send, as journalling checks it in a fresh turn:
                # a turn that lost its session must not show a piece of an answer that the
                # new holder may have acknowledged without it (dead-lettered, stopped).
                if not await self.sessions.renew(entry.chat_session_id, lock):
                    raise LockLost("the session lock was taken over during the replay")
                kind: Literal["answer", "notice"] = (
                    "notice" if piece.message_id == cut_off_id else "answer"
                )
                await self.outbox.deliver(
                    target, Piece(piece.text, piece.message_id, mention=piece.mention, kind=kind)
                )
                await self.sessions.journal_sent(entry.entry_id, piece.index)
        # A failed turn is not recorded (its last piece is the failure's notice, not answer
        # text), replayed or not.
        if not journal.failed and not await self.sessions.recorded(entry.entry_id):
            answer = "".join(p.text for p in pieces if p.message_id != cut_off_id)
            await complete_shielded(self._record(entry, lock, answer))
        return Outcome.REPLAYED

    async def _ask(
        self,
        entry: Entry,
        start: Start,
        prepared: PreparedInput,
        notice: _ThinkingNotice,
    ) -> Outcome:
        message, lock, state = entry.message, start.lock, start.state
        same_upstream = state.upstream == self.upstream.name
        turn = Turn(
            text=prepared.text,
            sender=message.sender,
            chat_session_id=entry.chat_session_id,
            conversation=state.conversation if same_upstream else None,
            # Another upstream's session: its history is no part of this conversation.
            history=start.history if same_upstream else (),
            images=prepared.images,
            created_at_s=(message.created_at_ms or int(time.time() * 1000)) // 1000,
        )
        composer = Composer(
            self.policy,
            show_reasoning=self.settings.show_reasoning == "quote",
            agent_line=lambda agent: self.catalogue("agent_switch", agent=agent),
            suggestions_title=self.catalogue("suggestions_title"),
            correction_title=self.catalogue("correction_title"),
            now=self.clock(),
        )
        outgoing = _Outgoing(self, entry, lock, notice)
        sender = asyncio.create_task(outgoing.run(), name=f"send-{entry.entry_id}")
        started = self.clock()
        failure: ErrorKind | None = None

        async def record() -> None:
            question, answer = prepared.text, composer.answer
            await self._record(entry, lock, answer, question=question, sent=outgoing.unmarked)

        try:
            try:
                failure = await self._stream(
                    entry, lock, turn, composer, outgoing, sender, started, notice
                )
            except asyncio.CancelledError:
                # Interrupted midway: what arrived is journalled with the rest (the sender's
                # own cancellation does that) for the replay to send, before its notice.
                for text in composer.finish():
                    outgoing.queue.put_nowait(text)
                raise
            for text in composer.finish():
                outgoing.queue.put_nowait(text)
            if failure is not None:
                outgoing.queue.put_nowait(Standalone(self._failure_message(failure, composer)))
            elif not composer.answer.strip() and not outgoing.has_text:
                outgoing.queue.put_nowait(Standalone(self.catalogue("empty_answer")))
            outgoing.record_follows = failure is None
            outgoing.queue.put_nowait(None)
            await sender
        except asyncio.CancelledError:
            # Cancelled (a drain's deadline, `/stop`) once the whole answer had gone out: it
            # is recorded all the same. The record is what marks the journal complete and
            # the last piece sent; without it a replay would add a cut-off notice to a whole
            # answer and send that piece again.
            if failure is None and _finished_well(sender):
                await complete_shielded(record())
            raise
        finally:
            if not sender.done():
                # Its last journal writes are not cut short by this turn's own cancellation,
                # which may come again (a drain cancels until the turn has ended): they must
                # land before the caller lets the session lock go. Cancelled again until it
                # ends: a cancellation swallowed in redis-py would leave it waiting for the
                # queue's end, which never comes, and this turn with it.
                await complete_shielded(cancel_and_wait([sender]))
        self.metrics.turn_seconds.observe(self.clock() - started)
        if failure is None:
            await complete_shielded(record())
            return Outcome.COMPLETED
        return Outcome.FAILED

    async def _stream(
        self,
        entry: Entry,
        lock: str,
        turn: Turn,
        composer: Composer,
        outgoing: _Outgoing,
        sender: asyncio.Task[None],
        started: float,
        notice: _ThinkingNotice,
    ) -> ErrorKind | None:
        """Relay the upstream's events; the failure kind if it failed."""
        first_token = shown = False
        # A leading <think> block is reasoning, whatever the upstream (SPEC §7). Split here, in
        # the loop, rather than in a generator around the upstream's: each layer of `async for`
        # costs every token.
        think = ThinkSplitter()
        surrogates = SurrogateJoiner()  # an emoji split between two deltas is joined first
        queue = outgoing.queue
        # A model caught in a loop writes until its own limit: dozens of messages into the
        # group, all held in memory meanwhile. Past the bound the upstream is left (closing
        # its stream stops it) and the answer ends with a notice. What counts is what shows:
        # the text (a replace is the whole of it so far), and the reasoning when quoted.
        bound = self.settings.max_answer_chars or math.inf
        counted = _TOKENS if self.settings.show_reasoning == "quote" else TextDelta
        length = 0
        self._ticker.add(composer, outgoing)
        try:
            async with _closing(self.upstream.stream(turn)) as upstream_events:
                async for received in upstream_events:
                    for event in think.split(surrogates.join(received)):
                        if isinstance(event, counted):
                            length += len(event.text)
                        elif isinstance(event, TextReplace):
                            length = len(event.text)
                        if length > bound:
                            return self._failed_upstream(
                                ErrorKind.TOO_LONG, f"the answer passed {bound} characters"
                            )
                        if not first_token and isinstance(event, _TOKENS):
                            first_token = True
                            self.metrics.first_token_seconds.observe(self.clock() - started)
                        if not shown and isinstance(event, _SHOWN):
                            shown = True
                            notice.not_needed()  # what people see: no thinking notice after it
                        if sender.done():
                            sender.result()  # the sender stopped: re-raise its SendError
                        if not isinstance(event, _COMPOSED):
                            failure = await self._handle(entry, lock, event)
                            if failure is not None:
                                return failure
                            if isinstance(event, Done):
                                return None
                            continue
                        for text in composer.feed(event, self.clock()):
                            queue.put_nowait(text)
        except UpstreamFailure as exc:
            return self._failed_upstream(exc.kind, exc.message)
        finally:
            notice.not_needed()  # no thinking notice after the stream has ended
            self._ticker.discard(outgoing)
        return self._failed_upstream(ErrorKind.BROKEN, "stream ended without an end marker")

    def _failure_message(self, failure: ErrorKind, composer: Composer) -> str:
        """A broken stream's notice speaks of "the text above": with none, it says so. A
        failure the upstream reported after text had shown says that text is incomplete,
        not only "rephrase" or "try again later"."""
        if failure is ErrorKind.BROKEN and not composer.rendered:
            return self.catalogue("broken_before_answer")
        if failure in _MIDWAY_MESSAGES and composer.rendered:
            return self.catalogue(_MIDWAY_MESSAGES[failure])
        return self.catalogue(_FAILURE_MESSAGES[failure])

    async def _handle(self, entry: Entry, lock: str, event: Event) -> ErrorKind | None:
        if isinstance(event, ConversationRef):
            saved = await self.sessions.save_conversation(
                entry.chat_session_id, lock, self.upstream.name, event.ref
            )
            if not saved:
                log.warning("conversation_not_saved", reason="session lock lost")
        elif isinstance(event, Usage):
            log.info(
                "upstream_usage",
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                total_tokens=event.total_tokens,
            )
        elif isinstance(event, UpstreamError):
            return self._failed_upstream(event.kind, event.message)
        return None

    def _failed_upstream(self, kind: ErrorKind, detail: str) -> ErrorKind:
        self.metrics.upstream_errors.labels(upstream=self.upstream.name, kind=kind.value).inc()
        level = log.error if kind in _OPERATORS_TO_FIX else log.warning
        level("upstream_failed", kind=kind.value, detail=detail)
        return kind

    async def _record(
        self, entry: Entry, lock: str, answer: str, question: str = "", sent: int | None = None
    ) -> None:
        """The turn's bookkeeping: turns, last activity, and history where we keep it; the
        journal marked complete, and `sent` (the last piece, if not marked yet) sent."""
        now = time.time()
        exchange = None
        if not self.upstream.keeps_history and answer:
            exchange = HistoryTurn(question or entry.message.text, answer)
        saved = await self.sessions.save(
            entry.chat_session_id,
            lock,
            {"last_active": now},
            exchange=exchange,
            entry_id=entry.entry_id,
            created_at=now,
            turn_of=self.upstream.name,
            sent=sent,
        )
        if not saved:
            log.warning("session_not_saved", reason="session lock lost")
