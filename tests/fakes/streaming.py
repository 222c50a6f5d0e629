"""What the streaming upstream fakes and their tests share.

The fake side: a `Script` of canned failures first, then the stream, whole or broken.
The client side: a dict-backed KeyValue, and the events and answer text of one turn.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bridge.events import Event, TextDelta, TextReplace
from bridge.interfaces import Turn, Upstream
from tests.fakes.base import rechunk


@dataclass(frozen=True)
class Canned:
    """One non-stream answer (an error status, or Coze's JSON instead of a stream)."""

    status: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=self.body, headers=self.headers,
                            content_type=self.content_type)


class Mode(enum.Enum):
    WHOLE = "whole"  # the stream as written
    CUT = "cut"  # the connection drops halfway through
    TRUNCATED = "truncated"  # half the stream, then a clean end of the response
    STALL = "stall"  # half the stream, then silence until the fake closes


@dataclass
class Script:
    """What one streaming route of a fake answers next."""

    seed: int = 0
    mode: Mode = Mode.WHOLE
    max_chunk: int = 64
    delay_s: float = 0.0
    failures: deque[Canned] = field(default_factory=deque)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def fail(self, status: int, *, times: int = 1, body: Any = None,
             headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` requests with `status` (a JSON `body`) instead of the stream."""
        text = json.dumps(body if body is not None else {"error": f"HTTP {status}"})
        self.failures.extend([Canned(status, text, headers or {})] * times)

    def release(self) -> None:
        """End a stalled stream (called when the fake closes)."""
        self._released.set()

    async def serve(self, request: web.Request, data: bytes) -> web.StreamResponse:
        if self.failures:
            return self.failures.popleft().response()
        chunks = rechunk(data, self.rng, self.max_chunk)
        stop = len(chunks) if self.mode is Mode.WHOLE else len(chunks) // 2
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in chunks[:stop]:
            await response.write(chunk)
            # Even sleep(0) lets the client read before the next write: the chunk
            # boundaries reach it (adjacent chunks sometimes merge, still at random places).
            await asyncio.sleep(self.delay_s)
        if self.mode is Mode.CUT:
            assert request.transport is not None
            request.transport.close()
        elif self.mode is Mode.STALL:
            await self._released.wait()
        else:
            await response.write_eof()
        return response


class MemoryKV:
    """The KeyValue port on a dict (the core's is Redis)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str) -> None:
        self.values[name] = value


async def collect(upstream: Upstream, turn: Turn, into: list[Event] | None = None) -> list[Event]:
    """Every event of one turn; `into` keeps those that came before an exception."""
    events = [] if into is None else into
    async for event in upstream.stream(turn):
        events.append(event)
    return events


def answer_text(events: Sequence[Event]) -> str:
    """The answer as the core composes it: deltas appended, a replacement replacing."""
    text = ""
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, TextReplace):
            text = event.text
    return text


def refused_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
