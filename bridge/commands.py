"""/help /reset /stop /status — answered at once, never queued behind a turn."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from bridge.inbox import Entry
from bridge.intake import Command, parse_command
from bridge.interfaces import Upstream
from bridge.messages import Catalogue
from bridge.sessions import JOURNAL_TTL_S, Sessions
from bridge.store import Keys

__all__ = ["Commands", "stop_message", "wake_message"]

log = structlog.get_logger(__name__)

# As long as a journal lives: an entry whose process died before acknowledging its stop is
# acknowledged unrun whenever it is claimed, even after a long outage.
STOP_KEY_TTL_S = JOURNAL_TTL_S
_RESET_POLL_S = 0.1
# How much longer than its wait for the running turn a reset may block its session's turns
# (a few Redis calls; a Redis outage's socket timeout at worst).
_RESET_MARGIN_S = 10.0


def stop_message(chat_session_id: str, entry_id: str) -> str:
    return json.dumps({"type": "stop", "session": chat_session_id, "entry": entry_id})


def wake_message(chat_session_id: str) -> str:
    """The session's waiting turns try to start now (any process of the bot)."""
    return json.dumps({"type": "wake", "session": chat_session_id})


class Commands:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        sessions: Sessions,
        upstream: Upstream,
        catalogue: Catalogue,
        *,
        claim_idle_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.sessions = sessions
        self.upstream = upstream
        self.catalogue = catalogue
        self.claim_idle_s = claim_idle_s

    async def answer(self, entry: Entry) -> str:
        """Carry out the command of an entry; the reply to send."""
        command = parse_command(entry.message.text)
        session = entry.chat_session_id
        log.info("command", command=str(command))
        if command is Command.STOP:
            stopped = await self.stop(session, entry.entry_id)
            return self.catalogue("nothing_to_stop" if stopped is None else "stopped")
        if command is Command.RESET:
            await self.reset(session, entry.entry_id)
            return self.catalogue("reset_done")
        if command is Command.STATUS:
            return await self.status(session)
        return self.catalogue("help")

    async def stop(self, chat_session_id: str, command_entry_id: str) -> str | None:
        """Stop the running turn of a session, wherever it runs; the entry it was running.
        The command `command_entry_id` stops one turn once: delivered again (its process
        died before acknowledging it), it stops no turn that started since."""
        running = await self.sessions.stop(chat_session_id, command_entry_id, ttl_s=STOP_KEY_TTL_S)
        if running is None:
            return None
        await self._announce(stop_message(chat_session_id, running))
        return running

    async def reset(self, chat_session_id: str, command_entry_id: str) -> None:
        """Stop, wait for the turn to let go (at most BRIDGE_CLAIM_IDLE_S), forget, then
        delete the conversation upstream. No turn of the session starts until the forget:
        a message queued behind the stopped turn starts afresh, in a new conversation.
        Once per command: delivered again after the forget, it leaves the session alone
        (the turns after it may have begun the new conversation), and so does a delivery
        that stalled while another carried it out (`EntryGone` once that one acknowledged
        it): the session it read and forgot is the only one deleted upstream."""
        if await self.sessions.was_reset(chat_session_id, command_entry_id):
            return
        hold_s = self.claim_idle_s + _RESET_MARGIN_S
        async with self.sessions.resetting(chat_session_id, command_entry_id, hold_s=hold_s):
            stopped = await self.stop(chat_session_id, command_entry_id)
            if stopped is not None:
                deadline = time.monotonic() + self.claim_idle_s
                while await self.sessions.holder(chat_session_id) == stopped:
                    if time.monotonic() > deadline:
                        log.warning("reset_waited_too_long")
                        break
                    await asyncio.sleep(_RESET_POLL_S)
            state = await self.sessions.forget(chat_session_id, command_entry_id)
        await self._announce(wake_message(chat_session_id))
        if state is None:  # another delivery of the command forgot the session
            return
        if state.conversation and state.upstream == self.upstream.name:
            try:
                await self.upstream.reset(state.conversation, chat_session_id)
            except Exception as exc:  # the mapping is forgotten either way
                log.warning("upstream_reset_failed", error=type(exc).__name__)

    async def _announce(self, message: str) -> None:
        """Tell every process of the bot at once. Only a hint: what it tells is in Redis
        already (the stop key, the session let go), where each process finds it at its next
        look (the keep loop's; a waiting turn's poll). A failure here must not fail the
        command: retried, a `/stop` that took effect would end as a dead letter."""
        try:
            await self.redis.publish(self.keys.control, message)
        except RedisError as exc:
            log.warning("control_not_announced", error=type(exc).__name__)

    async def status(self, chat_session_id: str) -> str:
        state = await self.sessions.load(chat_session_id)
        queue = await self.sessions.queue_length(chat_session_id)
        if state.created_at is None:
            return self.catalogue("status_none", upstream=self.upstream.name, queue=queue)
        return self.catalogue(
            "status",
            upstream=self.upstream.name,
            age=self.catalogue.age(time.time() - state.created_at),
            turns=state.turns,
            queue=queue,
        )
