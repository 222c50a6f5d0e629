"""What the streaming upstream adapters share: the stream loop, JSON payloads, ids, usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Container, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Protocol

import structlog

from bridge import jsontext
from bridge.config import ConfigError, Settings, env_name
from bridge.events import ConversationRef, Done, Event, UpstreamError, Usage
from bridge.http import (
    UpstreamBroken,
    UpstreamFailure,
    UpstreamHTTP,
    UpstreamProtocolError,
    failure_of,
    http_status,
    reported_kind,
)
from bridge.interfaces import Turn
from bridge.logging import clip, clip_value
from bridge.sse import SSEEvent

__all__ = [
    "ConversationGone",
    "ConversationIds",
    "StreamParser",
    "as_failure",
    "as_id",
    "as_int",
    "bearer",
    "body_failure",
    "is_done",
    "is_error_report",
    "json_object",
    "json_value",
    "recover_gone_conversation",
    "relay",
    "reported_error",
    "request_stop",
    "require",
    "usage_from",
]

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 5.0  # how long a stop request may hold up the end of a stopped turn
_SHOWN_CHARS = 300  # how much of an upstream's payload goes into a log message
_CODE_CHARS = 100  # how much of an error code it reports
_ENDS = (Done, UpstreamError)
_SUCCESS_CODES = (0, 200, "0", "200", "", None, "success")
# What a parser raises on a message whose JSON holds other types than it reads, or values
# nested so deep (orjson reads 1024 levels) that `str` of one runs out of Python's stack.
_UNEXPECTED_SHAPE = (AttributeError, LookupError, TypeError, ValueError, RecursionError)


class StreamParser(Protocol):
    """Turns one SSE message of an upstream's wire format into internal events (all of them
    at once: a protocol error is raised by the call)."""

    def feed(self, message: SSEEvent) -> Sequence[Event]: ...


async def relay(
    messages: AsyncIterator[SSEEvent], parser: StreamParser, *, upstream: str
) -> AsyncGenerator[Event, None]:
    """The parser's events up to the protocol's end: `Done` or an error event ends the turn.

    A stream that ends before either is broken (SPEC §6): what arrived stays, the user is told.
    The SSE iterator is closed on every way out, so the connection is freed at once; callers
    close this generator with `contextlib.aclosing` so that `/stop` frees it at once too.
    """
    try:
        async for message in messages:
            if not message.data and message.event == "message":
                continue  # `data:` alone: a proxy's keep-alive, in no protocol a message
            try:
                events = parser.feed(message)
            except UpstreamProtocolError as exc:
                if await _ended(messages):
                    raise UpstreamBroken(f"{upstream} stream ended inside a message") from exc
                raise
            except _UNEXPECTED_SHAPE as exc:
                # JSON, but not of the shape the parser reads there (a string where the
                # `choices` list goes, a list as an event name): as unreadable as JSON that
                # does not parse. Left to escape, it failed the entry with a traceback and
                # had the question asked again after the answer had begun.
                raise UpstreamProtocolError(
                    f"{upstream}: unexpected message ({type(exc).__name__}: "
                    f"{clip(str(exc), 100)}): {clip(message.data, _SHOWN_CHARS)!r}"
                ) from exc
            for event in events:
                yield event
                if isinstance(event, _ENDS):
                    return
    finally:
        await _aclose(messages)
    raise UpstreamBroken(f"{upstream} stream ended before its end marker")


async def _ended(messages: AsyncIterator[SSEEvent]) -> bool:
    """Whether the stream ended right after the message in hand.

    The SSE decoder dispatches an unterminated last message at end of stream, so a stream
    cut inside a message leaves a torn one: that is a broken stream, not a protocol error.
    """
    try:
        await anext(messages)
    except StopAsyncIteration:
        return True
    return False


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)  # async generators have it, plain iterators not
    if aclose is not None:
        await aclose()


def is_done(data: str) -> bool:
    """The `[DONE]` end marker of OpenAI-style streams."""
    return "[DONE]" in data and data.strip() == "[DONE]"  # (no copy of every chunk's data)


def json_value(data: str, *, upstream: str) -> Any:
    """One JSON value from an upstream (older servers escape it as `\\uXXXX`: loads undoes it);
    what `json.loads` cannot read (`jsontext.UNREADABLE`) is a protocol error."""
    try:
        return json.loads(data)
    except jsontext.UNREADABLE as exc:
        raise UpstreamProtocolError(f"{upstream}: not JSON: {clip(data, _SHOWN_CHARS)!r}") from exc


def json_object(data: str, *, upstream: str) -> dict[str, Any]:
    """One JSON object from an upstream, as `json_value` reads it."""
    value = json_value(data, upstream=upstream)
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"{upstream}: not a JSON object: {clip(data, _SHOWN_CHARS)!r}")
    return value


def as_id(value: object) -> str:
    """An id as text; numbers are accepted, anything else is no id."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, str | int):
        return str(value)
    return ""


def as_int(value: object) -> int | None:
    """A token count, also when sent as a numeric string (Coze does)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdecimal():  # (`isdigit` takes "²": no int)
        try:
            return int(value)
        except ValueError:  # more digits than `int` converts (4300)
            return None
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def usage_from(
    data: Mapping[str, Any],
    *,
    prompt: str,
    completion: str,
    total: str | None = None,
    latency: str | None = None,
) -> Usage:
    """Usage from an upstream's own field names; the total is the sum when not given."""
    prompt_tokens = as_int(data.get(prompt))
    completion_tokens = as_int(data.get(completion))
    total_tokens = as_int(data.get(total)) if total else None
    if total_tokens is None and prompt_tokens is not None and completion_tokens is not None:
        total_tokens = prompt_tokens + completion_tokens
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=total_tokens,
        latency_s=_as_float(data.get(latency)) if latency else None,
    )


def reported_error(
    upstream: str, data: Mapping[str, Any] | None, *, plain_statuses: Container[int] = ()
) -> UpstreamError:
    """An error the upstream reported itself (`{"code"|"status", "type", "message"|"msg"}`,
    or OpenAI's `{"error": {…}}`), of the kind its words say, else the HTTP status it states
    (`status`, or a `code` that is one; those in `plain_statuses` say only "an error"), else
    a rejection of the question."""
    data = data or {}
    inner = data.get("error")
    if isinstance(inner, Mapping):
        data = inner
    code = data.get("code", data.get("status"))
    text = data.get("message") or data.get("msg") or data.get("error") or "no message"
    status = http_status(data.get("status")) or http_status(data.get("code"))
    if status in plain_statuses:
        status = None
    label = f"{upstream} error"
    if code not in (None, ""):
        label += f" {clip_value(code, _CODE_CHARS)}"
    return UpstreamError(
        kind=reported_kind(status, code, data.get("type"), text),
        message=f"{label}: {clip_value(text, _SHOWN_CHARS)}",
    )


def as_failure(error: UpstreamError) -> UpstreamFailure:
    """An error event of the upstream's, as the typed error it is before the first byte."""
    return failure_of(error.kind, error.message)


def body_failure(
    upstream: str, status: int, text: str, *, plain_statuses: Container[int] = ()
) -> UpstreamFailure:
    """What a JSON answer in place of the stream reports (`http.NotAStream`): its error, of
    its kind (an overload is retried, refused credentials are an auth error); a body that
    reports none is a protocol error."""
    try:
        data = json_object(text, upstream=upstream)
    except UpstreamProtocolError:
        data = {}
    if not is_error_report(data):
        return UpstreamProtocolError(
            f"{upstream}: expected text/event-stream, got HTTP {status}: "
            f"{clip(text, _SHOWN_CHARS)}"
        )
    return as_failure(reported_error(upstream, data, plain_statuses=plain_statuses))


def is_error_report(data: Mapping[str, Any]) -> bool:
    """Whether a JSON object reports an error: an `error`, an error `status`, or a `code`
    other than the usual ones of success."""
    return (
        bool(data.get("error"))
        or http_status(data.get("status")) is not None
        or data.get("code", 0) not in _SUCCESS_CODES
    )


class ConversationIds:
    """The conversation reference of one turn: announced whenever the upstream changes it.

    The core saves each `ConversationRef` as the whole reference (SPEC §5), so every
    announcement carries every key known so far, not only the new one.
    """

    def __init__(self, known: Mapping[str, str] | None = None) -> None:
        self._ref: dict[str, str] = dict(known or {})

    def get(self, key: str) -> str:
        return self._ref.get(key, "")

    def update(self, **ids: object) -> ConversationRef | None:
        """A reference to save, or None when nothing new was learnt (ids may be absent)."""
        merged = dict(self._ref)
        merged.update((key, as_id(value)) for key, value in ids.items() if as_id(value))
        if merged == self._ref:
            return None
        self._ref = merged
        return ConversationRef(ref=dict(merged))


ConversationGone = Callable[[UpstreamFailure | UpstreamError], bool]
"""Whether a failure is the upstream's answer to a conversation it no longer has (deleted,
expired, another app's), as opposed to any other refusal."""


async def recover_gone_conversation(
    turn: Turn,
    ask: Callable[[Turn], AsyncGenerator[Event, None]],
    gone: ConversationGone,
    *,
    upstream: str,
) -> AsyncGenerator[Event, None]:
    """The events of `ask(turn)`; but when the upstream refuses the stored conversation as
    `gone` says, before anything of the answer came, the question is asked once more without
    it: the upstream starts a new conversation, saved as any first turn's is. Else every
    later turn of the session would fail the same way until a `/reset`."""
    refusal: str | None = None
    answered = not turn.conversation  # a first turn: nothing stale to drop
    async with aclosing(ask(turn)) as events:
        try:
            async for event in events:
                if not answered and isinstance(event, UpstreamError) and gone(event):
                    refusal = event.message
                    break
                answered = answered or not isinstance(event, ConversationRef)
                yield event
        except UpstreamFailure as exc:
            if answered or not gone(exc):
                raise
            refusal = exc.message
    if refusal is None:
        return
    log.warning("upstream_conversation_gone", upstream=upstream, error=refusal)
    async with aclosing(ask(replace(turn, conversation=None))) as events:
        async for event in events:
            yield event


async def request_stop(http: UpstreamHTTP, url: str, *, upstream: str, **kwargs: Any) -> None:
    """Ask the upstream to stop generating an answer no longer read (`/stop`, a broken
    stream), where closing the request does not stop it: best-effort, a failure only logged."""
    try:
        await asyncio.wait_for(http.json("POST", url, **kwargs), STOP_TIMEOUT_S)
    except (TimeoutError, UpstreamFailure) as exc:
        log.warning("upstream_stop_failed", upstream=upstream, error=str(exc))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def require(settings: Settings, *attrs: str) -> tuple[str, ...]:
    """The named settings, which the chosen upstream cannot work without."""
    values = tuple(getattr(settings, attr) or "" for attr in attrs)
    missing = [env_name(attr) for attr, value in zip(attrs, values, strict=True) if not value]
    if missing:
        raise ConfigError([f"{name}: required but not set" for name in missing])
    return values
