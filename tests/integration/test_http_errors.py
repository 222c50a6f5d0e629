"""bridge/http.py against a fake upstream on loopback: every failure becomes its typed error.

Retries happen before the first byte only: statuses and refused connections are retried, a
stream that stalls or breaks midway is reported once and never requested again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    iter_sse,
)
from bridge.sse import SSEDecoder, SSEEvent
from tests.fakes.base import FIXTURES, FakeServer, rechunk, stream_bytes
from tests.harness import stop_after_first

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EVENTS = b"data: one\n\ndata: two\n\ndata: three\n\n"
FIXTURE = (FIXTURES / "hiagent-chat_query.sse").read_bytes()


class Upstream:
    """A fake upstream: each path answers from a queue of handlers, the last one repeating."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Handler]] = {}
        self.release = asyncio.Event()  # stalled streams wait for it (set at teardown)
        app = web.Application()
        app.router.add_route("*", "/{name}", self._handle)
        self.fake = FakeServer(app)

    def on(self, path: str, *handlers: Handler) -> str:
        self.routes[path] = list(handlers)
        return self.fake.url + path

    def hits(self, path: str) -> int:
        return len(self.fake.on(path))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        handlers = self.routes[request.path]
        handler = handlers.pop(0) if len(handlers) > 1 else handlers[0]
        return await handler(request)


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, text=text, headers=headers)

    return handler


def sse(data: bytes = EVENTS, **options: object) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        chunks = rechunk(data, random.Random(7), max_size=300)
        return await stream_bytes(request, chunks, **options)  # type: ignore[arg-type]

    return handler


def stalled(upstream: Upstream, first: bytes) -> Handler:
    """Sends `first`, then nothing until the test is over."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await upstream.release.wait()
        return response

    return handler


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.fake.start()
    yield server
    server.release.set()
    await server.fake.close()


@pytest.fixture
async def http() -> AsyncIterator[UpstreamHTTP]:
    async with aiohttp.ClientSession() as session:
        client = UpstreamHTTP(session, retries=2, backoff_s=0.01, idle_timeout_s=0.3,
                              tail_timeout_s=0.3)
        yield client
        await client.aclose()


async def collect(http: UpstreamHTTP, url: str, into: list[SSEEvent] | None = None,
                  method: str = "POST") -> list[SSEEvent]:
    events = [] if into is None else into
    async for event in http.sse(method, url, json={"q": "hi"}):
        events.append(event)
    return events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- success ----------------------------------------------------------------------------------


async def test_a_recorded_stream_arrives_whole(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", sse(FIXTURE))
    decoder = SSEDecoder()
    expected = decoder.feed(FIXTURE) + decoder.close()
    assert await collect(http, url) == expected
    assert upstream.hits("/chat") == 1


async def test_stream_without_trailing_blank_line(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", sse(b"data: a\n\ndata: [DONE]"))
    assert [e.data for e in await collect(http, url)] == ["a", "[DONE]"]


# -- retried before the first byte -----------------------------------------------------------


async def test_429_retry_after_is_honoured(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(429, "slow down", {"Retry-After": "1"}), sse())
    started = time.monotonic()
    events = await collect(http, url)
    assert time.monotonic() - started >= 1.0  # the advised second, not the 10 ms backoff
    assert [e.data for e in events] == ["one", "two", "three"]
    assert upstream.hits("/chat") == 2


async def test_429_until_retries_run_out(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(429, "quota", {"Retry-After": "0"}))
    with pytest.raises(UpstreamRateLimited) as caught:
        await collect(http, url)
    assert caught.value.retry_after == 0.0
    assert upstream.hits("/chat") == 3


async def test_5xx_retried_then_succeeds(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(502), status(503), sse())
    assert len(await collect(http, url)) == 3
    assert upstream.hits("/chat") == 3


async def test_5xx_retried_then_unavailable(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(500, "boom"))
    with pytest.raises(UpstreamUnavailable, match="HTTP 500: boom"):
        await collect(http, url)
    assert upstream.hits("/chat") == 3  # the first try and two retries


async def test_no_retries_means_one_attempt(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(503), sse())
    once = UpstreamHTTP(http.session, retries=0, backoff_s=0.01)
    with pytest.raises(UpstreamUnavailable, match="HTTP 503"):
        await collect(once, url)
    assert upstream.hits("/chat") == 1


async def test_connection_refused_is_unavailable(http: UpstreamHTTP) -> None:
    with pytest.raises(UpstreamUnavailable, match=r"cannot reach 127\.0\.0\.1"):
        await collect(http, f"http://127.0.0.1:{free_port()}/chat")


# -- not retried ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403])
async def test_auth_error_is_not_retried(upstream: Upstream, http: UpstreamHTTP,
                                         code: int) -> None:
    url = upstream.on("/chat", status(code, "bad token"))
    with pytest.raises(UpstreamAuthError, match=f"HTTP {code}"):
        await collect(http, url)
    assert upstream.hits("/chat") == 1


async def test_400_is_rejected(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", status(400, '{"error": "input too long"}'))
    with pytest.raises(UpstreamRejected, match="input too long"):
        await collect(http, url)
    assert upstream.hits("/chat") == 1


async def test_wrong_content_type_is_a_protocol_error(upstream: Upstream,
                                                      http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", sse(b'{"answer": "not a stream"}', content_type="application/json"))
    with pytest.raises(UpstreamProtocolError, match="application/json"):
        await collect(http, url)
    assert upstream.hits("/chat") == 1


async def test_line_too_long_is_a_protocol_error(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", sse(b"data: " + b"x" * (1 << 20) + b"\n\n"))
    with pytest.raises(UpstreamProtocolError, match="line longer than"):
        await collect(http, url)


# -- after the first byte: reported, never retried ----------------------------------------


async def test_idle_timeout_mid_stream(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", stalled(upstream, b"data: one\n\ndata: tw"))
    events: list[SSEEvent] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await collect(http, url, events)
    assert 0.3 <= time.monotonic() - started < 5
    assert [e.data for e in events] == ["one"]
    assert upstream.hits("/chat") == 1
    await asyncio.sleep(0)
    assert not idle_watches()  # the watch ended with the body it failed


async def test_no_answer_within_the_idle_timeout_is_a_timeout_never_retried(
    upstream: Upstream, http: UpstreamHTTP
) -> None:
    """The request went out and its headers never came: the upstream may be working on it,
    so it is not asked again (only connect errors, 429 and 5xx are retried)."""

    async def silent(request: web.Request) -> web.StreamResponse:
        await upstream.release.wait()
        return web.Response(status=503)

    url = upstream.on("/chat", silent)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"no answer for 0\.3 s"):
        await collect(http, url)
    assert 0.3 <= time.monotonic() - started < 5
    assert upstream.hits("/chat") == 1


def idle_watches() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "upstream-timeout-watch"]


def trickle(count: int, every_s: float) -> Handler:
    """`count` events, one every `every_s`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(count):
            await asyncio.sleep(every_s)
            await response.write(f"data: {n}\n\n".encode())
        return response

    return handler


async def test_idle_timeout_counts_from_the_last_data(upstream: Upstream,
                                                       http: UpstreamHTTP) -> None:
    # 1 s in all, never 0.3 s without data: the idle timeout (0.3 s) never fires
    url = upstream.on("/chat", trickle(10, 0.1))
    assert [e.data for e in await collect(http, url)] == [str(n) for n in range(10)]


async def test_idle_timeout_of_a_whole_body(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/api", stalled(upstream, b'{"code": 2'))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"no data for 0\.3 s"):
        await http.json("GET", url)
    assert 0.3 <= time.monotonic() - started < 5


async def test_idle_timeouts_of_many_streams_and_no_timer_left(upstream: Upstream,
                                                                http: UpstreamHTTP) -> None:
    # one timer watches every open response: the stalled ones fail, the others go on, and
    # the timer stops with the last response
    upstream.on("/stall", stalled(upstream, b"data: one\n\n"))
    url = upstream.on("/chat", trickle(6, 0.1))
    results = await asyncio.gather(
        *(collect(http, upstream.fake.url + ("/stall" if n % 2 else "/chat")) for n in range(6)),
        return_exceptions=True,
    )
    assert [type(r) for r in results[1::2]] == [UpstreamTimeout] * 3
    assert results[::2] == [await collect(http, url)] * 3
    await asyncio.sleep(0)
    assert not idle_watches()


async def test_the_total_timeout_ends_a_stream_that_keeps_going(upstream: Upstream,
                                                                 http: UpstreamHTTP) -> None:
    """An answer that never ends, never idle (a keep-alive every 0.1 s): it fails at the
    total timeout, counted from its request, and says so; it is not asked again."""
    url = upstream.on("/chat", trickle(1000, 0.1))
    watching = UpstreamHTTP(http.session, retries=2, backoff_s=0.01, idle_timeout_s=0.3,
                            total_timeout_s=1.0)
    events: list[SSEEvent] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"no whole answer within 1 s"):
        await collect(watching, url, events)
    assert 1.0 <= time.monotonic() - started < 3
    assert 5 <= len(events) <= 12 and upstream.hits("/chat") == 1
    await asyncio.sleep(0)
    assert not idle_watches()


async def test_the_total_timeout_while_waiting_for_the_headers(upstream: Upstream,
                                                              http: UpstreamHTTP) -> None:
    """A total timeout shorter than the idle one ends the wait for the headers too, as a
    timeout (the upstream may be working on it: not asked again)."""

    async def silent(request: web.Request) -> web.StreamResponse:
        await upstream.release.wait()
        return web.Response(status=503)

    url = upstream.on("/chat", silent)
    watching = UpstreamHTTP(http.session, retries=2, backoff_s=0.01, idle_timeout_s=30,
                            total_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"no answer within 0\.5 s"):
        await collect(watching, url)
    assert 0.5 <= time.monotonic() - started < 3
    assert upstream.hits("/chat") == 1


async def test_connection_dropped_mid_stream(upstream: Upstream, http: UpstreamHTTP) -> None:
    url = upstream.on("/chat", sse(FIXTURE, cut_after=10))
    events: list[SSEEvent] = []
    with pytest.raises(UpstreamBroken, match="stream broke"):
        await collect(http, url, events)
    assert 0 < len(events) < len(SSEDecoder().feed(FIXTURE))
    assert upstream.hits("/chat") == 1


@pytest.mark.parametrize("how", ["reset", "truncated-chunk", "idle-timeout"])
async def test_what_arrived_before_the_body_failed_is_read_though_read_after(
    upstream: Upstream, http: UpstreamHTTP, how: str
) -> None:
    """The events that had arrived when the body failed, not yet read by then, come before
    the failure: aiohttp raises a body's failure ahead of the data it still holds, and a
    reader busy elsewhere at that moment lost them (a turn showed less than had arrived, or
    that the answer "broke off before it began")."""
    go = asyncio.Event()
    rest = b"data: two\n\ndata: three\n\ndata: fo"

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await go.wait()
        assert request.transport is not None
        if how == "truncated-chunk":  # a chunk whose size line promises more than comes
            request.transport.write(b"%x\r\n" % (len(rest) + 100) + rest)
        else:
            await response.write(rest)
        if how == "idle-timeout":
            await upstream.release.wait()
        else:
            request.transport.close()
        return response

    url = upstream.on("/chat", handler)
    events: list[SSEEvent] = []
    with pytest.raises(UpstreamTimeout if how == "idle-timeout" else UpstreamBroken):
        async with http.open("POST", url, expect_sse=True) as response:
            stream = iter_sse(response)
            events.append(await anext(stream))
            go.set()
            async with asyncio.timeout(5):  # nothing is read until the body has failed
                while response.content.exception() is None:
                    await asyncio.sleep(0.01)
            async for event in stream:
                events.append(event)
    assert [e.data for e in events] == ["one", "two", "three"]  # not the torn "fo"


async def test_stopping_early_gives_the_response_up(upstream: Upstream,
                                                   http: UpstreamHTTP) -> None:
    """A reader that stops before the body's end (its turn failed): the rest is read for a
    moment, in case the body is about to end, then the connection is given up."""
    url = upstream.on("/chat", stalled(upstream, b"data: one\n\n"))
    stream = http.sse("GET", url)
    assert (await anext(stream)).data == "one"
    await stream.aclose()
    connector = http.session.connector
    assert connector is not None
    async with asyncio.timeout(http.tail_timeout_s + 1):
        while connector._acquired:
            await asyncio.sleep(0.02)


async def test_a_cancelled_reader_gives_the_response_up_at_once(upstream: Upstream,
                                                                http: UpstreamHTTP) -> None:
    """What `/stop` does to a turn: its task is cancelled, and its connection closed."""
    url = upstream.on("/chat", stalled(upstream, b"data: one\n\n"))
    await stop_after_first(http.sse("GET", url))
    assert not http.session.connector or not http.session.connector._acquired


# -- JSON calls share the policy --------------------------------------------------------------


async def test_json_call_retried_and_parsed(upstream: Upstream, http: UpstreamHTTP) -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"code": 200})

    url = upstream.on("/api", status(503), ok)
    assert await http.json("POST", url, json={}) == {"code": 200}
    assert upstream.hits("/api") == 2


# (JSON nested deeper than Python's stack raised RecursionError, an integer of more digits than
# `int` converts a ValueError, which escaped as a traceback)
@pytest.mark.parametrize(
    "body", ["<html>maintenance</html>", "[" * 100_000, '{"code": ' + "1" * 5000 + "}"]
)
async def test_json_call_with_a_body_that_is_not_json(upstream: Upstream, http: UpstreamHTTP,
                                                      body: str) -> None:
    url = upstream.on("/api", status(200, body))
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        await http.json("GET", url)


def endless(code: int, sent: list[int]) -> Handler:
    """A body that never ends (a download, another kind of stream); `sent` counts its bytes
    until the client hangs up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=code, headers={"Content-Type": "text/html"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b"x" * 65536)
                sent[0] += 65536
        return response

    return handler


@pytest.mark.parametrize(("call", "code", "error"), [
    ("json", 200, UpstreamProtocolError),  # a JSON call answered by what is no JSON answer
    ("sse", 200, UpstreamProtocolError),  # a stream answered by something else
    ("sse", 500, UpstreamUnavailable),  # an error answer (retried: three bodies)
    ("sse", 400, UpstreamRejected),
])
async def test_a_body_that_does_not_end_is_read_no_further_than_needed(
    upstream: Upstream, http: UpstreamHTTP, call: str, code: int, error: type[Exception]
) -> None:
    """Error bodies and bodies that should have been a stream are read only as far as they
    are quoted; a JSON answer up to MAX_BODY_BYTES. They were read whole (in memory) — for
    a body that never ends, until the idle timeout, or for ever while data kept coming."""
    sent = [0]
    url = upstream.on("/api", endless(code, sent))
    with pytest.raises(error):
        if call == "json":
            await http.json("GET", url)
        else:
            await collect(http, url)
    assert sent[0] < 32 << 20  # (a few reads, and what the sockets buffer)


@pytest.mark.parametrize("delay_s", [None, 0, 0.001, 0.003, 0.01, 0.2])
async def test_cancel_before_the_first_byte_is_not_lost(upstream: Upstream, http: UpstreamHTTP,
                                                        delay_s: float | None) -> None:
    # `/stop` while an error answer is read or a retry is awaited: the turn ends at once.
    # (Python 3.11's asyncio.wait_for dropped a cancel that came as the body was read, and
    # the turn slept 30 s and asked again.)
    url = upstream.on("/chat", status(429, "quota", {"Retry-After": "30"}))
    task = asyncio.ensure_future(collect(http, url))
    await upstream.fake.wait_for_requests(1, "/chat")
    if delay_s is not None:
        await asyncio.sleep(delay_s)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:  # the cancel was lost: stop the task for good before failing
        task.cancel()
        await asyncio.wait({task})
    assert done and task.cancelled()
    assert upstream.hits("/chat") == 1
