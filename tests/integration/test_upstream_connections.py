"""The upstream's connections: kept for the next turn once a streamed answer has ended,
closed at once when the turn is stopped, and closed when a body does not end after its
end marker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.events import Done, TextDelta
from bridge.http import UpstreamHTTP
from bridge.interfaces import Sender, Turn
from tests.fakes.scripted import collect, connect
from tests.harness import openai_env, stop_after_first


def _chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


class Streams:
    """`POST /v1/chat/completions`: "Hello", then the end marker a moment later (unless
    `hold_before_done`), then the end of the body (unless `end_body` is False). Keeps each
    request's transport, and so its connection."""

    def __init__(self) -> None:
        self.end_body = True
        self.hold_before_done = False
        self.transports: list[asyncio.Transport] = []
        self.release = asyncio.Event()  # lets held streams go, so the server can stop
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self.server = TestServer(app, host="127.0.0.1")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        self.transports.append(request.transport)  # type: ignore[arg-type]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("Hello"))
        if self.hold_before_done:
            await self.release.wait()
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.01)  # the body's end comes a moment after the marker, as it does
        if not self.end_body:
            await self.release.wait()
        await response.write_eof()
        return response

    @property
    def connections(self) -> int:
        """How many connections the requests came on."""
        return len({id(transport) for transport in self.transports})

    def env(self) -> dict[str, str]:
        return openai_env(str(self.server.make_url("/v1")))


@pytest.fixture
async def streams() -> AsyncIterator[Streams]:
    fake = Streams()
    await fake.server.start_server()
    yield fake
    fake.release.set()
    await fake.server.close()


@pytest.fixture
async def http(session: aiohttp.ClientSession) -> AsyncIterator[UpstreamHTTP]:
    client = UpstreamHTTP(session, retries=0, tail_timeout_s=0.3)
    yield client
    await client.aclose()


def turn() -> Turn:
    return Turn(text="hi", sender=Sender("u1"), chat_session_id="yach:g:1")


async def _closed(transport: asyncio.Transport, within_s: float) -> bool:
    async with asyncio.timeout(within_s):
        while not transport.is_closing():
            await asyncio.sleep(0.01)
    return True


async def test_the_next_turns_reuse_the_connection(streams: Streams, http: UpstreamHTTP) -> None:
    """Read up to `[DONE]` and no further, the body's end came a moment later and aiohttp
    closed the connection: every turn paid a new one (TCP and TLS) before its first token."""
    upstream = connect(http, streams.env())
    for _ in range(3):
        events = await collect(upstream, turn())
        assert events == [TextDelta("Hello"), Done()]
        await asyncio.sleep(0.05)  # the next question comes after the body's end, as a rule

    assert streams.connections == 1


async def test_a_body_that_does_not_end_is_closed_without_holding_up_the_turn(
    streams: Streams, http: UpstreamHTTP
) -> None:
    streams.end_body = False
    upstream = connect(http, streams.env())

    async with asyncio.timeout(0.2):  # the turn does not wait for the body's end
        assert await collect(upstream, turn()) == [TextDelta("Hello"), Done()]
    assert await _closed(streams.transports[0], within_s=1.0)  # after tail_timeout_s

    await collect(upstream, turn())
    assert streams.connections == 2


async def test_a_stopped_turn_closes_its_connection_at_once(
    streams: Streams, http: UpstreamHTTP
) -> None:
    streams.hold_before_done = True
    await stop_after_first(connect(http, streams.env()).stream(turn()))
    assert await _closed(streams.transports[0], within_s=0.1)


async def test_a_turn_stopped_between_two_events_closes_its_connection_at_once(
    streams: Streams, http: UpstreamHTTP
) -> None:
    """`/stop` while the turn awaits something else than the stream (a save after the
    conversation reference): the generator is closed, not cancelled, in a task that is
    being cancelled: the connection is given up at once, not read to its end."""
    streams.hold_before_done = True
    events = connect(http, streams.env()).stream(turn())
    got_first = asyncio.Event()

    async def run_turn() -> None:
        try:
            async for _event in events:
                got_first.set()
                await asyncio.sleep(3600)  # the turn's own await, between two events
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # as the relay closes it

    turn_task = asyncio.create_task(run_turn())
    await asyncio.wait_for(got_first.wait(), 5)
    turn_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn_task
    assert await _closed(streams.transports[0], within_s=0.1)
