"""Fixtures of the tests that drive adapters against fakes on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.http import UpstreamHTTP


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: the session is shared by every adapter, each carries its own cookies.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


@pytest.fixture
def http(session: aiohttp.ClientSession) -> UpstreamHTTP:
    """The shared upstream HTTP client with quick retries (two) and a 5 s idle timeout."""
    return UpstreamHTTP(session, retries=2, backoff_s=0.01, connect_timeout_s=2,
                        idle_timeout_s=5, total_timeout_s=30)
