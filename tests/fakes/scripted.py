"""Scripted answers for fake upstream routes: status codes, streams cut or stalled midway."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.fakes.base import rechunk, stream_bytes

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


def status(code: int, body: Any = "", headers: dict[str, str] | None = None) -> Reply:
    """A plain answer with `code`; a dict/list body is sent as JSON."""

    async def reply(request: web.Request) -> web.StreamResponse:
        if isinstance(body, dict | list):
            return web.json_response(body, status=code, headers=headers)
        return web.Response(status=code, text=str(body), headers=headers)

    return reply


def json_reply(payload: Any) -> Reply:
    return status(200, payload)


def sse_reply(
    data: bytes | Callable[[web.Request], bytes],
    rng: random.Random,
    *,
    cut_after: int | None = None,
    stall_after: int | None = None,
    release: asyncio.Event | None = None,
    delay_s: float = 0.001,
    max_size: int = 200,
) -> Reply:
    """The bytes as a chunked event stream, re-chunked at random byte boundaries.

    `cut_after` drops the connection after that many chunks; `stall_after` sends that many
    chunks and then nothing until `release` is set (the fake's close sets it).
    """

    async def reply(request: web.Request) -> web.StreamResponse:
        raw = data(request) if callable(data) else data
        chunks = rechunk(raw, rng, max_size)
        if stall_after is None:
            return await stream_bytes(request, chunks, delay_s=delay_s, cut_after=cut_after)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks[:stall_after]:
            await response.write(chunk)
        assert release is not None
        await release.wait()
        return response

    return reply


def free_port() -> int:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def sse_payloads(payloads: list[Any]) -> bytes:
    """`data:` events for JSON-able payloads (strings are sent as they are)."""
    out = []
    for payload in payloads:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        out.append(f"data: {text}\n\n")
    return "".join(out).encode()
