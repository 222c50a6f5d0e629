"""A Redis that stops answering with its connections open (frozen by SIGSTOP: a hung host, a
partition that drops packets). The put path (`InOrder`) and the hot path (`HotPath`) time
their commands themselves, with the connection's own timeout off: each call must still give
up after the pool's socket timeout rather than wait forever, the connections they hand back
must carry that timeout again, and everything works once Redis answers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.store import HotPath, InOrder
from tests.procs import RedisServer

SOCKET_TIMEOUT_S = 0.5
_APPEND = "redis.call('RPUSH', KEYS[1], ARGV[1]) return redis.call('LLEN', KEYS[1])"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """As `bridge.store.connect` makes it, with a short socket timeout and no retries."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_server.url, max_connections=2, timeout=2, socket_connect_timeout=1,
        socket_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    client = aioredis.Redis.from_pool(pool)
    try:
        yield client
    finally:
        await client.aclose()


def _freeze(server: RedisServer, frozen: bool) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.mark.parametrize("path", [InOrder, HotPath])
async def test_a_frozen_redis_fails_the_call_in_time_and_the_next_works_once_it_answers(
    redis_server: RedisServer, client: aioredis.Redis, path: type[InOrder | HotPath]
) -> None:
    calls = path(client)
    script = client.register_script(_APPEND)
    assert await calls.script(script, ["frozen:list"], ["a"]) == 1  # its connection made
    _freeze(redis_server, True)
    started = time.monotonic()
    with pytest.raises((RedisTimeoutError, RedisConnectionError)):
        # Its own try times out; then the client's path, which reconnects, times out too.
        await asyncio.wait_for(calls.script(script, ["frozen:list"], ["b"]), 10)
    assert time.monotonic() - started < 5 * SOCKET_TIMEOUT_S
    _freeze(redis_server, False)
    assert await calls.script(script, ["frozen:list"], ["c"]) >= 2
    # A connection it gave back carries the pool's timeout again: the client's own
    # commands on a frozen Redis fail too, instead of waiting forever.
    _freeze(redis_server, True)
    for _ in range(2):  # whichever of the pool's connections each takes
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            await asyncio.wait_for(client.ping(), 10)
    _freeze(redis_server, False)
