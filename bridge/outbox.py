"""Sending to the IM: the send budget shared by every process of the bot (in Redis), a
process-wide pause when the platform says "slow down", and retries with the same
`message_id`, so a retried send never shows twice."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
import structlog
from redis.typing import EncodableT

from bridge.config import Rate
from bridge.interfaces import IM, Piece, ReplyTarget, SendError
from bridge.metrics import Metrics
from bridge.store import Keys, ride_out

__all__ = ["DIRECT_RATE", "SEND_BACKOFF_S", "Outbox", "SendBudget"]

log = structlog.get_logger(__name__)

DIRECT_RATE = Rate(60, 60.0)  # the platform's own limit on direct sends per robot
SEND_BACKOFF_S = 0.5  # the first wait after a failed send, doubled at each failure in a row…
_MAX_BACKOFF_S = 8.0  # …up to this
# The least wait after a rate-limit answer, doubled at each one in a row: `Retry-After: 0`
# (or a date gone by) must not turn the patience into a tight loop against the platform.
_MIN_RATE_LIMIT_WAIT_S = 0.2

# A sliding window in a sorted set, timed by the Redis clock so every host agrees.
# KEYS: window. ARGV: window ms, count, unique member. Returns ms to wait (0: taken).
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(tonumber(oldest[2]) + window - now_ms, 1)
"""


class SendBudget:
    """`rate.count` sends per `rate.per_s` seconds across all processes; waits, never drops.
    A Redis outage is ridden out for `redis_patience_s` (a turn's pieces wait for the budget
    as its journal writes wait for Redis: a restart does not cut the answer off)."""

    def __init__(
        self, redis: aioredis.Redis, key: str, rate: Rate, *, redis_patience_s: float = 0.0
    ) -> None:
        self._key = key
        self._rate = rate
        self._take = redis.register_script(_TAKE)
        self._counter = 0
        self._patience_s = redis_patience_s

    @property
    def unlimited(self) -> bool:
        return self._rate.unlimited

    async def acquire(self) -> None:
        if self._rate.unlimited:
            return
        while True:
            # Taken twice if an answer was lost: one send's budget spent, nothing dropped.
            wait_ms = await ride_out(self._take_once, self._patience_s)
            if not wait_ms:
                return
            await asyncio.sleep(int(wait_ms) / 1000)

    async def _take_once(self) -> int:
        """One try at the budget: 0 (taken) or the ms to wait."""
        self._counter += 1
        member = f"{time.time_ns()}-{id(self)}-{self._counter}"
        args: list[EncodableT] = [int(self._rate.per_s * 1000), self._rate.count, member]
        return int(await self._take(keys=[self._key], args=args))


class Outbox:
    """Every send of the process: the Redis budget, the platform's "slow down", retries.

    A rate-limit answer (HTTP 429, a "frequency" message) pauses every send of this process
    for the advised time and is retried without using up an attempt (after 0.2 s at least,
    doubled at each such answer in a row), for up to `rate_limit_patience_s`; other failures
    are retried `attempts` times with backoff (`backoff_s`, doubled at each failure in a
    row, at most 8 s).
    An IM without platform limits (`rate_limited = False`: the terminal) skips the budget.
    The budget rides a Redis outage out for `redis_patience_s` (BRIDGE_CLAIM_IDLE_S: as long
    as the turn's lock would live).
    """

    def __init__(
        self,
        im: IM,
        redis: aioredis.Redis,
        keys: Keys,
        metrics: Metrics,
        *,
        group_rate: Rate,
        attempts: int = 5,
        backoff_s: float = SEND_BACKOFF_S,
        rate_limit_patience_s: float = 300.0,
        redis_patience_s: float = 0.0,
    ) -> None:
        self.im = im
        self._metrics = metrics
        self._budgeted = im.rate_limited
        self._group = SendBudget(
            redis, keys.send_budget_group, group_rate, redis_patience_s=redis_patience_s
        )
        self._direct = SendBudget(
            redis, keys.send_budget_direct, DIRECT_RATE, redis_patience_s=redis_patience_s
        )
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._patience_s = rate_limit_patience_s
        self._resume = asyncio.Event()
        self._resume.set()

    async def acquire(self, target: ReplyTarget) -> None:
        """Wait for the budget of one send to this target."""
        if self._budgeted:
            await self._budget(target).acquire()

    def _budget(self, target: ReplyTarget) -> SendBudget:
        return self._direct if target.is_direct else self._group

    def budget_free(self, target: ReplyTarget) -> bool:
        """Whether a send to this target takes no budget (no wait, no round trip)."""
        return not self._budgeted or self._budget(target).unlimited

    def dedupes(self, target: ReplyTarget) -> bool:
        """Whether the IM shows a piece's `message_id` to this target once, however often it
        is sent."""
        return self.im.dedupes(target)

    async def deliver(
        self, target: ReplyTarget, piece: Piece, *, budget_taken: bool = False
    ) -> None:
        """Send one piece, retrying with the same message_id; raise SendError if it never
        got through. Every attempt counts against the budget. (A plain loop: a retrying
        library's set-up cost ~75 µs of CPU per piece, before every send.)"""
        started = time.monotonic()
        failures = rate_limited = 0
        if not budget_taken:
            await self.acquire(target)
        while True:
            try:
                await self._send_once(target, piece)
                return
            except SendError as exc:
                if exc.retry_after is not None:  # the process-wide pause holds the next one
                    if time.monotonic() - started >= self._patience_s:
                        raise
                    rate_limited += 1
                    await asyncio.sleep(_backoff(_MIN_RATE_LIMIT_WAIT_S, rate_limited))
                else:
                    failures += 1
                    if failures >= self._attempts:
                        raise
                    await asyncio.sleep(_backoff(self._backoff_s, failures))
            await self.acquire(target)

    async def _send_once(self, target: ReplyTarget, piece: Piece) -> None:
        await self._resume.wait()
        try:
            await self.im.send(target, piece)
        except SendError as exc:
            if exc.retry_after is not None:
                self._metrics.count_send("rate_limited")
                self._pause(exc.retry_after)
            else:
                self._metrics.count_send("error")
            log.warning(
                "im_send_failed",
                reason=exc.reason,
                message_id=piece.message_id,
                retry_after=exc.retry_after,
            )
            raise
        self._metrics.count_send("ok")

    def _pause(self, seconds: float) -> None:
        """Hold every send of this process until the platform's advised time has passed."""
        if not self._resume.is_set():
            return
        self._resume.clear()
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._resume.set)


def _backoff(first_s: float, attempt: int) -> float:
    return min(first_s * 2.0 ** (attempt - 1), _MAX_BACKOFF_S)
