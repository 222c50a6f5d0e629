"""Scripted fake upstreams, and what the tests of upstream adapters share.

The fake side: a `Script` per route (queued replies — statuses, streams whole, cut, ended
early or stalled — then its default) and `ScriptedFake`, the base of the upstream fakes.
The client side: an adapter built from settings, a dict-backed KeyValue, the events, answer
text and conversation references of one turn, and a URL where nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Self, TypedDict, Unpack

from aiohttp import web

from adapters.upstream import create_upstream
from bridge.config import load_settings
from bridge.events import ConversationRef, Event, TextDelta, TextReplace
from bridge.http import UpstreamHTTP
from bridge.interfaces import KeyValue, Turn, Upstream
from bridge.store import MemoryKeyValue
from tests.fakes.base import FakeServer, rechunk

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Script:
    """Answers of one route: the queued replies in order, then `default` for every request."""

    def __init__(self, default: Reply) -> None:
        self.default = default
        self.queued: deque[Reply] = deque()

    def then(self, *replies: Reply) -> Script:
        self.queued.extend(replies)
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        reply = self.queued.popleft() if self.queued else self.default
        return await reply(request)


def guarded(reply: Reply, refusal: Callable[[web.Request], web.StreamResponse | None]) -> Reply:
    """`reply` to the requests `refusal` lets through (it answers the others itself)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        refused = refusal(request)
        return refused if refused is not None else await reply(request)

    return checked


def status(code: int, body: Any = "", headers: dict[str, str] | None = None) -> Reply:
    """A plain answer with `code`; a dict/list body is sent as JSON."""

    async def reply(request: web.Request) -> web.StreamResponse:
        if isinstance(body, dict | list):
            return web.json_response(body, status=code, headers=headers)
        return web.Response(status=code, text=str(body), headers=headers)

    return reply


def json_reply(payload: Any) -> Reply:
    return status(200, payload)


class _Midway(enum.Enum):
    MIDWAY = "midway"


MIDWAY = _Midway.MIDWAY  # as a count of chunks: those within the first half of the bytes
After = int | _Midway | None


class Breaks(TypedDict, total=False):
    """How a stream stops short: after that many chunks (or `MIDWAY`), at most one of them."""

    cut_after: After  # the connection drops
    truncate_after: After  # the connection drops inside the next HTTP chunk (its size says more)
    end_after: After  # the response ends cleanly, without the rest
    stall_after: After  # nothing more comes until the fake closes


def sse_reply(
    data: bytes | Callable[[web.Request], bytes],
    rng: random.Random,
    *,
    release: asyncio.Event | None = None,
    delay_s: float = 0.001,
    max_size: int = 200,
    cut_after: After = None,
    truncate_after: After = None,
    end_after: After = None,
    stall_after: After = None,
) -> Reply:
    """The bytes (or those made for the request) as an event stream, re-chunked at random
    byte boundaries (`max_size` at most), whole or stopping short as the `Breaks` say; a
    stall lasts until `release` is set.
    """
    given = {"cut": cut_after, "truncate": truncate_after, "end": end_after,
             "stall": stall_after}
    breaks = {how: after for how, after in given.items() if after is not None}
    assert len(breaks) <= 1, breaks
    how, after = next(iter(breaks.items()), ("", None))
    assert how != "stall" or release is not None

    async def reply(request: web.Request) -> web.StreamResponse:
        chunks = rechunk(data(request) if callable(data) else data, rng, max_size)
        sent = len(chunks) if after is None else _midway(chunks) if after is MIDWAY else after
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in chunks[:sent]:
            await response.write(chunk)
            # Even sleep(0) lets the client read before the next write: the chunk boundaries
            # reach it (adjacent chunks sometimes merge, still at random places).
            await asyncio.sleep(delay_s)
        if how == "cut":
            assert request.transport is not None
            request.transport.close()
        elif how == "truncate":  # a chunk whose size line promises more than comes
            assert request.transport is not None
            rest = b"".join(chunks[sent:])[:32]
            request.transport.write(b"%x\r\n" % (len(rest) + 4096) + rest)
            request.transport.close()
        elif how == "stall":
            assert release is not None
            await release.wait()
        else:
            await response.write_eof()
        return response

    return reply


def _midway(chunks: Sequence[bytes]) -> int:
    """How many chunks carry at most half of the bytes."""
    half, total = sum(map(len, chunks)) // 2, 0
    for count, chunk in enumerate(chunks):
        total += len(chunk)
        if total > half:
            return count
    return len(chunks)


def sse_payloads(payloads: Sequence[Any]) -> bytes:
    """`data:` events for JSON-able payloads (strings are sent as they are)."""
    out = []
    for payload in payloads:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        out.append(f"data: {text}\n\n")
    return "".join(out).encode()


class ScriptedFake:
    """The base of the upstream fakes: a FakeServer on loopback whose routes answer from
    Scripts, streams re-chunked by one seeded rng, and stalled streams released on close.

    `async with` starts and closes it. What the shared upstream tests drive: `script`, the
    route that streams the answer; `answer(**breaks)`, that answer as a reply (by default
    `stream`, read at each request so that a test may replace it); and `env()`, the settings
    of the adapter pointed at the fake (or at `url`, with the fake's base path).
    """

    max_size = 200  # of the stream's chunks, in bytes
    delay_s = 0.0  # after each chunk: even no delay lets the client read before the next one
    script: Script
    stream: bytes

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.release = asyncio.Event()
        self.app = web.Application()
        self.server = FakeServer(self.app)

    async def serve(self) -> Self:
        await self.server.start()
        return self

    async def close(self) -> None:
        self.release.set()
        await self.server.close()

    async def __aenter__(self) -> Self:
        return await self.serve()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.server.url

    def sse(self, data: bytes | Callable[[web.Request], bytes], **breaks: Unpack[Breaks]) -> Reply:
        return sse_reply(data, self.rng, release=self.release, delay_s=self.delay_s,
                         max_size=self.max_size, **breaks)

    def answer(self, **breaks: Unpack[Breaks]) -> Reply:
        return self.sse(lambda request: self.stream, **breaks)

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        raise NotImplementedError


# The client side.


def connect(http: UpstreamHTTP, env: Mapping[str, str], kv: KeyValue | None = None) -> Upstream:
    """The adapter `env` chooses, made as the bridge makes it."""
    return create_upstream(load_settings(dict(env), command="demo"), http, kv or MemoryKV())


MemoryKV = MemoryKeyValue  # the KeyValue port on a dict (the core's is Redis)


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


def refs(events: Sequence[Event]) -> list[dict[str, str]]:
    """The conversation references of one turn, in order."""
    return [dict(event.ref) for event in events if isinstance(event, ConversationRef)]


def free_port() -> int:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def refused_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def unanswered_url() -> Iterator[str]:
    """A loopback URL where connecting never completes, as to a host that drops packets:
    a listener that accepts nothing, its accept queue filled, so that the kernel drops
    every further SYN and the client waits for its connect timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield f"http://127.0.0.1:{port}"
        finally:
            for filler in fillers:
                filler.close()
