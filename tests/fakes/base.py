"""What every fake server shares: a recorder of requests and realistic SSE framing."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestServer

# The recorded real streams (../shared/fixtures), as the package ships them for `demo`: in
# the repository, so the tests run wherever it is cloned (test_fixtures.py keeps them equal).
FIXTURES = Path(__file__).resolve().parents[2] / "bridge" / "recordings"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeServer:
    """An aiohttp app on 127.0.0.1:0 that keeps every request it received."""

    app: web.Application
    requests: list[Recorded] = field(default_factory=list)
    server: TestServer | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> FakeServer:
        self.app.middlewares.append(self._record)
        self.server = TestServer(self.app, host="127.0.0.1", port=0)
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        async with self._arrived:
            self.requests.append(
                Recorded(request.method, request.path, dict(request.query),
                         dict(request.headers), body)
            )
            self._arrived.notify_all()
        return await handler(request)

    def on(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def wait_for_requests(self, n: int, path: str | None = None,
                                timeout: float = 10.0) -> list[Recorded]:
        """Wait until `n` requests (to `path`, if given) arrived; fail after `timeout`."""
        def enough() -> bool:
            return len(self.on(path) if path else self.requests) >= n

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(enough), timeout)
        return self.on(path) if path else list(self.requests)


_Cut = TypeVar("_Cut", str, bytes)


def chunked(whole: _Cut, cuts: Iterable[int]) -> list[_Cut]:
    """`whole` cut at the given offsets, taken modulo its length (so that a property test
    can draw any ints), as the reads or deltas it comes in."""
    offsets: list[int] = sorted({cut % (len(whole) + 1) for cut in cuts})
    return [whole[a:b] for a, b in zip([0, *offsets], [*offsets, len(whole)], strict=True)]


def rechunk(data: bytes, rng: random.Random, max_size: int = 64) -> list[bytes]:
    """Split bytes at random offsets, inside lines, CRLFs and UTF-8 characters alike."""
    chunks, i = [], 0
    while i < len(data):
        size = rng.randint(1, max_size)
        chunks.append(data[i : i + size])
        i += size
    return chunks


async def stream_bytes(request: web.Request, chunks: Iterable[bytes], *, delay_s: float = 0.0,
                       content_type: str = "text/event-stream",
                       cut_after: int | None = None) -> web.StreamResponse:
    """Serve chunks as a chunked streaming response; `cut_after` drops the connection early."""
    response = web.StreamResponse(headers={"Content-Type": content_type,
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index, chunk in enumerate(chunks):
        if cut_after is not None and index >= cut_after:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(chunk)
        if delay_s:
            await asyncio.sleep(delay_s)
    await response.write_eof()
    return response


def sse_lines(payloads: Iterable[str], *, event: str | None = None) -> bytes:
    """Frame data payloads as SSE events, one blank line after each."""
    out = []
    for payload in payloads:
        if event:
            out.append(f"event: {event}\n")
        out.extend(f"data: {line}\n" for line in payload.split("\n"))
        out.append("\n")
    return "".join(out).encode()
