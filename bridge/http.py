"""The shared HTTP client of every upstream: one ClientSession, typed errors, one retry policy.

Retries happen only before the first streamed byte: `open` retries the request until it has
a good status, and once a response is handed to the caller nothing is retried (a stream
that breaks midway is reported, never silently restarted — SPEC §6). Redirects are followed
within their origin only (`upstream_session`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import hdrs
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from yarl import URL

from bridge import jsontext
from bridge.events import ErrorKind
from bridge.logging import as_text, clip
from bridge.sse import SSEDecoder, SSEEvent, SSELineTooLong
from bridge.tasks import TaskGroup, cancel_requested

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_RETRY_AFTER_S",
    "UpstreamAuthError",
    "UpstreamBroken",
    "UpstreamFailure",
    "UpstreamHTTP",
    "UpstreamNotFound",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamRedirectRefused",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_for_status",
    "failure_of",
    "feed_sse",
    "http_status",
    "iter_sse",
    "parse_retry_after",
    "read_text",
    "reported_kind",
    "upstream_session",
]

# What an answer that should have been an event stream and is not says: the typed error of
# its status and body (`{"code": …, "msg": …}` in place of a stream). Called before the first
# streamed byte, so an error of the retried kinds is retried as its status would be.
NotAStream = Callable[[int, str], "UpstreamFailure"]

MAX_RETRY_AFTER_S = 60.0
MAX_BODY_BYTES = 1 << 20  # a JSON answer longer than this is no answer an API gives
_ERROR_BODY_CHARS = 300
_QUOTED_BODY_BYTES = 1 << 16  # read of an error answer: more than is ever quoted of it
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # those aiohttp follows


class UpstreamFailure(Exception):
    """An upstream call failed; `kind` decides what the user is told."""

    kind: ErrorKind = ErrorKind.UNAVAILABLE

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.status = status  # the HTTP status that said so, if one did


class UpstreamUnavailable(UpstreamFailure):
    kind = ErrorKind.UNAVAILABLE


class UpstreamRateLimited(UpstreamFailure):
    kind = ErrorKind.RATE_LIMITED


class UpstreamAuthError(UpstreamFailure):
    kind = ErrorKind.AUTH


class UpstreamTimeout(UpstreamFailure):
    kind = ErrorKind.TIMEOUT


class UpstreamBroken(UpstreamFailure):
    kind = ErrorKind.BROKEN


class UpstreamRejected(UpstreamFailure):
    kind = ErrorKind.REJECTED


class UpstreamNotFound(UpstreamRejected):
    """404/410: the operator must fix an address or an id; rephrasing cannot help. A
    rejection still, for adapters that read a 404 of their own (Dify's gone conversation)."""

    kind = ErrorKind.NOT_FOUND


class UpstreamProtocolError(UpstreamFailure):
    kind = ErrorKind.PROTOCOL


class UpstreamRedirectRefused(UpstreamFailure):
    """A redirect to another origin, not followed. Told as `unavailable` (the service is not
    where the settings say); not retried: the same request is redirected the same way."""

    kind = ErrorKind.UNAVAILABLE


RETRYABLE = (UpstreamUnavailable, UpstreamRateLimited)
_RETRIED_KINDS = frozenset(failure.kind for failure in RETRYABLE)
_FAILURE_OF_KIND: dict[ErrorKind, type[UpstreamFailure]] = {
    failure.kind: failure
    for failure in (UpstreamUnavailable, UpstreamRateLimited, UpstreamAuthError, UpstreamTimeout,
                    UpstreamBroken, UpstreamRejected, UpstreamNotFound, UpstreamProtocolError)
}
# What an upstream's own error report (a JSON body in place of the stream, an error event in
# it) says in words, in its code, type or message: the first kind whose words occur wins.
# Checked before any status the report states, because upstreams wrap every failure of the
# model behind them in one generic status (Dify: 400 "completion_request_error" with
# "[openai] Rate Limit Error, …"; RuoYi: 500 for every exception).
_KIND_WORDS: tuple[tuple[ErrorKind, tuple[str, ...]], ...] = (
    (ErrorKind.AUTH, ("invalid_api_key", "invalid api key", "incorrect api key", "unauthorized",
                      "unauthenticated", "authentication", "permission", "credential",
                      "token_expired", "认证失败")),
    (ErrorKind.RATE_LIMITED, ("rate limit", "rate_limit", "ratelimit", "too many requests",
                              "too_many_requests", "频繁", "限流", "overload", "busy", "繁忙",
                              "过载")),
    (ErrorKind.UNAVAILABLE, ("server_error", "server error", "internal error", "internal_error",
                             "unavailable", "bad gateway", "connection error", "不可用")),
    (ErrorKind.TIMEOUT, ("timeout", "timed out", "超时")),
)
_Result = TypeVar("_Result")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP-date), capped at one minute."""
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value)
    if seconds is None or not math.isfinite(seconds):  # "nan" would make the wait NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _seconds_until(http_date: str) -> float | None:
    """`Retry-After: Wed, 21 Oct 2015 07:28:00 GMT` (RFC 9110 §10.2.3) as seconds from now."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def error_for_status(status: int, body: str, headers: Mapping[str, str]) -> UpstreamFailure:
    """The one place where an HTTP status becomes a typed upstream error."""
    detail = f"HTTP {status}: {clip(body, _ERROR_BODY_CHARS)}"
    kind = _kind_of_status(status)
    retry_after = parse_retry_after(headers.get("Retry-After")) if kind in _RETRIED_KINDS else None
    return failure_of(kind, detail, retry_after=retry_after, status=status)


def _kind_of_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status >= 500 or status == 408:
        return ErrorKind.UNAVAILABLE
    if status in (404, 410):
        return ErrorKind.NOT_FOUND
    return ErrorKind.REJECTED


def failure_of(
    kind: ErrorKind, detail: str, *, retry_after: float | None = None, status: int | None = None
) -> UpstreamFailure:
    """The typed error of `kind`: retried when its kind is, before the first streamed byte."""
    return _FAILURE_OF_KIND[kind](detail, retry_after=retry_after, status=status)


def http_status(value: object) -> int | None:
    """A status an upstream states in a body (`"status": 429`, LiteLLM's `"code": "429"`),
    when it is an HTTP error status; None for anything else (Coze's `4013`, Yach's `40014`)."""
    # (`isdigit` takes "²": no int; and `int` refuses over 4300 digits: a status has three)
    if isinstance(value, str) and value.isdecimal() and len(value) == 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value
    return None


def reported_kind(status: int | None, *texts: object) -> ErrorKind:
    """What an error an upstream reports itself means, from its words (its code, type and
    message, in `texts`), else from the HTTP status it states, else: a rejection."""
    words = " ".join(as_text(text) for text in texts if text).lower()
    for kind, markers in _KIND_WORDS:
        if any(marker in words for marker in markers):
            return kind
    return ErrorKind.REJECTED if status is None else _kind_of_status(status)


def upstream_session(**options: Any) -> aiohttp.ClientSession:
    """The client session of upstream and Yach API calls (`options` as aiohttp takes them):
    its requests follow a redirect only within their origin."""
    return aiohttp.ClientSession(middlewares=(refuse_cross_origin_redirects,), **options)


async def refuse_cross_origin_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """aiohttp's middleware, run for each hop: a redirect to another origin (scheme, host,
    port) fails the request with `UpstreamRedirectRefused`; within the origin aiohttp follows
    it, `max_redirects` times at most. (It acts whatever `allow_redirects` says: a request
    that reads its 3xx itself goes elsewhere.)

    aiohttp strips only `Authorization` and cookies from a request that leaves its origin:
    HiAgent's `x-csrf-token`, an api-key header, a token in the body or one the `Location`
    repeats in its query went along to whatever host a redirect named."""
    response = await handler(request)
    location = response.headers.get(hdrs.LOCATION) or response.headers.get(hdrs.URI)
    if response.status not in _REDIRECT_STATUSES or location is None:
        return response
    target = _resolved(request.url, location)
    if target is None or _origin(target) != _origin(request.url):
        response.close()
        where = "an unreadable address" if target is None else str(target.origin())
        # (Not even from http to https on the same host: aiohttp would drop the
        # Authorization header there, and turn a 301's POST into a GET without a body.)
        upgrade = target is not None and _is_upgrade(request.url, target)
        hint = "; set the https URL" if upgrade else ""
        raise UpstreamRedirectRefused(  # (the origin alone: a query may hold a token)
            f"HTTP {response.status}: a redirect to another origin ({where}), not followed{hint}",
            status=response.status,
        )
    return response


def _resolved(base: URL, location: str) -> URL | None:
    """The absolute URL a `Location` names (resolved as aiohttp resolves it); None if none."""
    try:
        target = base.join(URL(location))
    except ValueError:
        return None
    return target if target.absolute and target.host else None


def _is_upgrade(source: URL, target: URL) -> bool:
    """`http://host/…` sent to `https://host/…`: the setting wants its scheme changed."""
    return source.scheme == "http" and target.scheme == "https" and source.host == target.host


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port  # (`port`: the scheme's default when none is given)


def _wait_for_retry(base: wait_random_exponential) -> Any:
    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, UpstreamFailure) and exc.retry_after is not None:
            return exc.retry_after
        return float(base(state))

    return wait


class _Body:
    __slots__ = ("content", "deadline", "seen", "since")

    def __init__(self, content: aiohttp.StreamReader, since: float, deadline: float) -> None:
        self.content = content
        self.seen = content.total_bytes  # bytes received when last looked at …
        self.since = since  # … and a time at or after their arrival
        self.deadline = deadline  # the total timeout's end (inf: none)


class TotalTimeout(TimeoutError):
    """The whole answer took longer than the total timeout."""


class _Watch:
    """The idle and total timeouts of every open response body, kept by one timer.

    aiohttp re-arms a timer on every read from the socket (`sock_read`) and enters one
    (`total`) around every wait for data: on a token stream, timers per token, a tenth of the
    bridge's CPU. So aiohttp is given no total timeout at all, and once a response's headers
    are in (aiohttp's `sock_read` timer covers the wait for them) that timer is switched off
    too: one task looks at every open body four times per timeout (at least once a second).
    A body that did not grow for the idle timeout fails as aiohttp would fail it, its next
    read raising `SocketTimeoutError`; one still open at the total timeout's end (counted from
    its request) raises `TotalTimeout`. Either is noticed up to a quarter of its timeout (at
    most a second) late, never early.
    """

    def __init__(self, idle_s: float, total_s: float) -> None:
        self._idle_s = idle_s
        self._total_s = total_s
        self._period_s = min([limit / 4 for limit in (idle_s, total_s) if limit] + [1.0])
        self._bodies: dict[int, _Body] = {}
        self._task: asyncio.Task[None] | None = None

    def deadline(self) -> float:
        """When an answer whose request starts now must have ended (inf: no total timeout)."""
        return asyncio.get_running_loop().time() + self._total_s if self._total_s else math.inf

    def add(self, response: aiohttp.ClientResponse, deadline: float) -> None:
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if not (self._idle_s or self._total_s) or protocol is None:  # none, or all read
            return
        protocol.read_timeout = None
        protocol.start_timeout()  # drops the timer armed by the last read
        loop = asyncio.get_running_loop()
        self._bodies[id(response)] = _Body(response.content, loop.time(), deadline)
        if self._task is None:
            self._task = loop.create_task(self._run(), name="upstream-timeout-watch")

    def discard(self, response: aiohttp.ClientResponse) -> None:
        if self._bodies.pop(id(response), None) is None or self._bodies:
            return
        if self._task is not None:  # no task outlives the last response
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop, idle_s = asyncio.get_running_loop(), self._idle_s or math.inf
        while True:
            await asyncio.sleep(self._period_s)
            now = loop.time()
            for key, body in list(self._bodies.items()):
                content = body.content
                if content.is_eof():
                    continue
                if now >= body.deadline:
                    content.set_exception(TotalTimeout("the answer took too long"))
                    del self._bodies[key]
                elif content.total_bytes != body.seen:
                    body.seen, body.since = content.total_bytes, now
                elif now - body.since >= idle_s:
                    content.set_exception(
                        aiohttp.SocketTimeoutError("Timeout on reading data from socket")
                    )
                    del self._bodies[key]
            if not self._bodies:  # the last ones timed out: the next `add` starts a new task
                self._task = None
                return


class _Tails:
    """The ends of bodies whose reader stopped before them, read so that their connections
    go back to the pool.

    A streamed answer is read up to its end marker (`[DONE]`, `message_end`…) and no
    further, while the end of the body itself (the last chunk of a chunked response) most
    often arrives a moment later. aiohttp closes a connection released before its body's
    end, so every turn paid a new connection (on the internet, TCP and TLS handshakes)
    before its first token. What is here already is read at once; the rest in the
    background, up to `max_bytes` within `timeout_s` (the turn does not wait for it); a body
    that has not ended by then is closed. The bounds are small because a reader that
    stopped early (its turn failed to send) leaves a body that is still growing: the
    upstream goes on generating until the connection closes.
    """

    def __init__(self, timeout_s: float, max_bytes: int = 16384) -> None:
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._reading = TaskGroup()

    def finish(self, response: aiohttp.ClientResponse) -> None:
        content = response.content
        if content.exception() is None and not content.is_eof():
            content.read_nowait(self._max_bytes)
            if not content.is_eof() and self._timeout_s > 0:
                self._reading.spawn(self._read(response), name="upstream-body-end")
                return
        _release(response)

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        left = self._max_bytes
        try:
            async with asyncio.timeout(self._timeout_s):
                while left > 0 and (chunk := await response.content.readany()):
                    left -= len(chunk)
        except (TimeoutError, aiohttp.ClientError, RuntimeError):
            pass  # (RuntimeError: aiohttp's "Connection closed.", the session closing)
        finally:
            _release(response)

    async def aclose(self) -> None:
        await self._reading.cancel()


def _release(response: aiohttp.ClientResponse) -> None:
    """Back to the pool when its body was read to the end; closed otherwise."""
    response.release()
    response.close()


@dataclass
class UpstreamHTTP:
    """What every upstream adapter shares: the session, the timeouts, the retry policy."""

    session: aiohttp.ClientSession
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 90.0
    total_timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 0.5  # first backoff step; tests shrink it
    tail_timeout_s: float = 1.0  # how long the end of a body read up to its end marker may take
    _watch: _Watch = field(init=False, repr=False, compare=False)
    _tails: _Tails = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._watch = _Watch(self.idle_timeout_s, self.total_timeout_s)
        self._tails = _Tails(self.tail_timeout_s)

    async def aclose(self) -> None:
        """Stop reading the ends of bodies (before the session closes)."""
        await self._tails.aclose()

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=_wait_for_retry(wait_random_exponential(multiplier=self.backoff_s, max=30)),
            retry=retry_if_exception_type(RETRYABLE),
            reraise=True,
        )

    async def retried(self, call: Callable[[], Awaitable[_Result]]) -> _Result:
        """`call` under the retry policy. The first attempt goes out at once: setting the
        policy up costs about as much as a loopback request, so it is set up only once that
        attempt failed with a retryable error, which it then counts as its own first attempt.

        For a call whose good answer is JSON that may report an error of the retried kinds
        (an overload in a 200 body): its requests are opened with `retry=False`, so that
        each is tried as often as any request is, not that many times over."""
        try:
            return await call()
        except RETRYABLE as exc:
            first_failure: UpstreamFailure | None = exc
        async for attempt in self.retrying():
            with attempt:
                if first_failure is not None:
                    failed, first_failure = first_failure, None
                    raise failed
                return await call()
        raise AssertionError("unreachable")  # (the policy re-raises the last failure)

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        """aiohttp's part of the timeouts; the total one is kept by `_Watch` and `_open_once`."""
        return aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.connect_timeout_s or None,
            sock_read=self.idle_timeout_s or None,
        )

    @asynccontextmanager
    async def open(
        self,
        method: str,
        url: str,
        *,
        expect_sse: bool = False,
        not_a_stream: NotAStream | None = None,
        retry: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a good status, retried before its first byte (unless not to
        `retry`: the caller's `retried` does). On exit its connection goes back to the pool
        once the body has ended (`_Tails`), unless the reader failed or was cancelled
        (`/stop`): then it is closed at once.

        With `expect_sse`, an answer that is not an event stream is a protocol error, or
        what `not_a_stream` makes of it (given, it implies `expect_sse`): an upstream that
        reports an overload or an outage in a 200 JSON body is retried as for its status."""

        async def open_once() -> tuple[aiohttp.ClientResponse, float]:
            return await self._open_once(
                method, url, expect_sse=expect_sse or not_a_stream is not None,
                not_a_stream=not_a_stream, **kwargs
            )

        response, deadline = await (self.retried(open_once) if retry else open_once())
        reader_done = False
        try:
            self._watch.add(response, deadline)
            try:
                yield response
            except GeneratorExit:  # the reader's generator closed: it read all it wanted,
                # unless its turn is being cancelled (a `/stop` that found it awaiting
                # something else, a save: the generators are closed rather than cancelled)
                reader_done = not cancel_requested()
                raise
            reader_done = True
        except TotalTimeout as exc:
            raise UpstreamTimeout(f"no whole answer within {self.total_timeout_s:g} s") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"no data for {self.idle_timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"stream broke: {type(exc).__name__}") from exc
        finally:
            self._watch.discard(response)
            if reader_done:
                self._tails.finish(response)
            else:
                _release(response)

    async def _open_once(
        self,
        method: str,
        url: str,
        *,
        expect_sse: bool,
        not_a_stream: NotAStream | None = None,
        **kwargs: Any,
    ) -> tuple[aiohttp.ClientResponse, float]:
        """A response with a good status, and when its answer must have ended."""
        deadline = self._watch.deadline()
        try:
            async with asyncio.timeout_at(None if deadline == math.inf else deadline) as total:
                response = await self.session.request(method, url, timeout=self.timeout, **kwargs)
        except aiohttp.SocketTimeoutError as exc:
            # The request went out and no answer came: not retried, the upstream may be
            # working on it (one that keeps conversations would get the question twice).
            raise UpstreamTimeout(f"no answer for {self.idle_timeout_s:g} s") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            if total.expired():  # not retried either, for the same reason
                raise UpstreamTimeout(f"no answer within {self.total_timeout_s:g} s") from exc
            raise UpstreamUnavailable(f"timed out connecting to {_host(url)}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"cannot reach {_host(url)}: {type(exc).__name__}") from exc
        if response.status >= 400:
            body = await _read_text_quietly(response)
            raise error_for_status(response.status, body, response.headers)
        if expect_sse and not response.content_type.startswith("text/event-stream"):
            body = await _read_text_quietly(response)
            response.close()
            if not_a_stream is not None:
                raise not_a_stream(response.status, body)
            raise UpstreamProtocolError(
                f"expected text/event-stream, got {response.content_type}: "
                f"{clip(body, _ERROR_BODY_CHARS)}"
            )
        return response, deadline

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        """A non-streaming call answered with JSON, retried like any other request."""
        async with self.open(method, url, **kwargs) as response:
            text = await read_text(response)
        try:
            return json.loads(text)
        except jsontext.UNREADABLE as exc:
            raise UpstreamProtocolError(f"not JSON: {clip(text, _ERROR_BODY_CHARS)}") from exc

    async def sse(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[SSEEvent]:
        """The events of a streamed answer; the request is closed when iteration stops."""
        async with self.open(method, url, expect_sse=True, **kwargs) as response:
            async for event in iter_sse(response):
                yield event


def feed_sse(decoder: SSEDecoder, data: bytes) -> list[SSEEvent]:
    """The events `data` completes, for streams whose bytes come other than as a response
    body (the frames of a WebSocket): a line over the decoder's limit is the upstream's
    protocol error, as in `iter_sse`."""
    try:
        return decoder.feed(data)
    except SSELineTooLong as exc:
        raise UpstreamProtocolError(str(exc)) from exc


async def iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    """The events of a streamed body. A body that fails (reset, truncated, timed out) gives
    the complete events it had received before the failure is raised: aiohttp raises a
    body's failure ahead of the data it still holds, and what arrived is shown (SPEC §6)."""
    decoder = SSEDecoder()
    content = response.content
    read = content.readany  # (`iter_any` would add a layer of iteration per read)
    try:
        try:
            while chunk := await read():
                for event in decoder.feed(chunk):
                    yield event
        except (aiohttp.ClientError, TimeoutError):
            for event in decoder.feed(_received(content)):  # (an unfinished one stays torn)
                yield event
            raise
        for event in decoder.close():
            yield event
    except SSELineTooLong as exc:
        raise UpstreamProtocolError(str(exc)) from exc


def _received(content: aiohttp.StreamReader) -> bytes:
    """What a failed body had received and not yet handed out. Every public read raises the
    failure first, so aiohttp's own unchecked read is used (b"" should it ever go)."""
    read_buffered = getattr(content, "_read_nowait", None)
    try:
        return bytes(read_buffered(-1)) if read_buffered is not None else b""
    except Exception:  # (its internals changed: what arrived is lost, as before)
        return b""


async def read_text(response: aiohttp.ClientResponse, *, limit: int = MAX_BODY_BYTES) -> str:
    """A body that is not a stream (a JSON answer), as text. At most `limit` bytes are read:
    a longer body (a download, an endless stream of another kind) is the upstream's protocol
    error, never read into memory whole."""
    body, whole = await _read_prefix(response, limit)
    text = _decode(response, body)
    if not whole:
        raise UpstreamProtocolError(
            f"an answer over {limit} bytes ({response.content_type}): "
            f"{clip(text, _ERROR_BODY_CHARS)}"
        )
    return text


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether it ended within them."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _decode(response: aiohttp.ClientResponse, body: bytes) -> str:
    try:
        return body.decode(response.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


async def _read_text_quietly(response: aiohttp.ClientResponse) -> str:
    """The start of an answer that is not read for itself (an error, a body that should
    have been a stream): enough to quote, never all of a body that does not end."""
    whole = False
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel (`/stop`) that
    # arrives as the body is read, and the turn would go on to wait for its retry
    try:
        async with asyncio.timeout(5):
            body, whole = await _read_prefix(response, _QUOTED_BODY_BYTES)
        return _decode(response, body)
    except (TimeoutError, aiohttp.ClientError):
        return ""
    finally:
        response.release()
        if not whole:  # (the rest is never read: the connection cannot be used again)
            response.close()


def _host(url: str) -> str:
    return URL(url).host or url
