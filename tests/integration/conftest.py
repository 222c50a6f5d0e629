"""Fixtures of the tests that drive adapters against fakes on loopback."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog

from bridge.http import UpstreamHTTP, upstream_session
from bridge.sessions import Sessions
from bridge.store import Keys, connect
from tests.fakes.openai import FakeOpenAI, SilentMidway
from tests.fakes.yach import FakeYach
from tests.procs import RedisServer, Spawner


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: the session is shared by every adapter, each carries its own cookies.
    # Made as the bridge makes it: redirects followed within their origin only.
    async with upstream_session(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


@pytest.fixture
async def http(session: aiohttp.ClientSession) -> AsyncIterator[UpstreamHTTP]:
    """The shared upstream HTTP client with quick retries (two) and a 5 s idle timeout."""
    client = UpstreamHTTP(session, retries=2, backoff_s=0.01, connect_timeout_s=2,
                          idle_timeout_s=5, total_timeout_s=30)
    yield client
    await client.aclose()


@pytest.fixture
async def yach() -> AsyncIterator[FakeYach]:
    """The fake Yach platform: token API, app-API, single-chat and signed robot sends."""
    fake = await FakeYach().start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible upstream that echoes the question and the history length."""
    fake = await FakeOpenAI().start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def silent() -> AsyncIterator[SilentMidway]:
    """An OpenAI-compatible upstream that sends a head, then is silent until released."""
    fake = await SilentMidway().start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Starts bridge subprocesses and private Redis servers; kills what is left at the end."""
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client made as the bridge makes its own (`store.connect`), with a small pool."""
    client = connect(redis_url, max_connections=3)
    yield client
    await client.aclose()


@pytest.fixture
def keys(bot_id: str) -> Keys:
    return Keys(bot_id)


@pytest.fixture
def sessions(redis_client: aioredis.Redis, keys: Keys) -> Sessions:
    return Sessions(redis_client, keys, ttl_s=3600, history_turns=5, lock_ttl_s=10)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """A buffer for the bridge's log (a test sets logging up to write there, as `chatbridge
    run` does); logging is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, kill, freeze or restart."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.close()  # SIGKILL: it ends a frozen (SIGSTOPped) server too
