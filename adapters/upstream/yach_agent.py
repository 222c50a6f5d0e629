"""Yach digital-partner agent (yach-agent-chat.md; the stream read is SPEC §7).

`POST {api_base}/openapi/v2/agent/chat` (JSON: app `access_token`, `query`, `biz_id`,
`chat_session_id` after the first turn, `inputs` as a JSON string, `msg_type`, `create_at`)
answers `{"code":200,"obj":{"stream_id","chat_session_id"}}`; the answer is then read as
Server-Sent Events from `BRIDGE_YACH_AGENT_STREAM_URL` (default
`{api_base}/openapi/v2/agent/chat?stream_id={stream_id}&stream_version=v2`, `access_token`
appended). Each `data:` is `{"msg_id","is_finished","finish_reason","type",
"content":{"type","content"}}`; `content.content` is a delta.

Decisions the notes leave open:
- `biz_id` is the sender's work code, else `BRIDGE_YACH_AGENT_BIZ_ID`, else the sender's id.
- `inputs` is always sent (`"{}"` when `BRIDGE_YACH_AGENT_INPUTS` is unset); `chat_privacy`
  is not sent (the platform default).
- `chat_session_id` is the upstream's; when an answer omits it, the one sent is kept.
- Frames typed `think` (also `thinking`, `reasoning`) are reasoning; frames typed `error`,
  a `finish_reason` of `error`/`failed`, or an open-API `{"code","msg"}` object in the
  stream end the turn as an upstream error; media/tool frames (`image`, `file`, `card`, …)
  are not answer text; every other type with string content is answer text.
- An invalid token is refreshed once: on the POST when it answers HTTP 401/403 or a
  `code`/`msg` saying the token is invalid (a `code` 401 or 403 does), on the stream read
  when it answers such a JSON object instead of a stream (an HTTP 401/403 there, just after
  the POST accepted the same token, is reported as it is). The token comes from `YachAPI`;
  the calls themselves go through the shared `UpstreamHTTP`, so they get its retries and
  typed errors.
- The notes call any `code` but 200 unsuccessful and list none. One that is an HTTP status
  (429, 5xx) is read as that status, and retried as it is, before the first byte; one that
  is the platform's own (`40014`, `50010`) by what its `msg` says, else it is a rejection.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, aclosing
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp

from adapters.upstream._common import (
    is_done,
    json_object,
    json_value,
    relay,
    reported_error,
    require,
)
from adapters.yach_api import YachAPI, YachAPIError, check_answer
from bridge.config import Settings
from bridge.events import (
    ConversationRef,
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    UpstreamError,
)
from bridge.http import (
    UpstreamAuthError,
    UpstreamFailure,
    UpstreamHTTP,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    failure_of,
    http_status,
    iter_sse,
    reported_kind,
)
from bridge.interfaces import KeyValue, Turn
from bridge.logging import clip
from bridge.sse import SSEEvent

__all__ = ["YachAgentParser", "YachAgentUpstream", "create", "image_text_query"]

NAME = "yach-agent"
CHAT_PATH = "/openapi/v2/agent/chat"
DEFAULT_STREAM_PATH = CHAT_PATH + "?stream_id={stream_id}&stream_version=v2"
_REASONING_TYPES = frozenset({"think", "thinking", "reasoning"})
_NON_TEXT_TYPES = frozenset(
    {"image", "file", "audio", "video", "card", "tool_call", "tool_result", "function_call"}
)
_ERROR_FINISH_REASONS = frozenset({"error", "failed", "fail"})
_TRUE = (True, "true", 1)
_STREAM_HEADERS = {"Accept": "text/event-stream"}


def image_text_query(text: str, image_urls: list[str]) -> str:
    """`query` of an `image_text` message: the text, then one `image::URL::` marker per image."""
    markers = [f"image::{url}::" for url in image_urls]
    return " ".join([text, *markers] if text else markers)


class YachAgentParser:
    """The events of one agent answer, SSE message by message. Pure: no I/O."""

    def __init__(self) -> None:
        self.finished = False

    def feed(self, message: SSEEvent) -> list[Event]:
        if is_done(message.data):
            self.finished = True
            return [Done()]
        return self.feed_frame(json_object(message.data, upstream=NAME))

    def feed_frame(self, frame: Mapping[str, Any]) -> list[Event]:
        content = frame.get("content")
        if isinstance(content, Mapping):
            kind, text = content.get("type") or frame.get("type"), content.get("content")
        else:
            kind, text = frame.get("type"), content
        kind = str(kind or "").lower()
        text = text if isinstance(text, str) else ""
        error = _frame_error(frame, kind, text)
        if error is not None:
            self.finished = True
            status = http_status(frame.get("code"))
            return [UpstreamError(reported_kind(status, error), clip(error, 300))]
        events: list[Event] = []
        if text and kind in _REASONING_TYPES:
            events.append(ReasoningDelta(text))
        elif text and kind not in _NON_TEXT_TYPES:
            events.append(TextDelta(text))
        if frame.get("is_finished") in _TRUE:
            self.finished = True
            events.append(Done())
        return events


def _frame_error(frame: Mapping[str, Any], kind: str, text: str) -> str | None:
    if kind == "error":
        return text or "error frame"
    reason = str(frame.get("finish_reason") or "").lower()
    if reason in _ERROR_FINISH_REASONS:
        return f"finish_reason {reason}: {text}"
    code = frame.get("code")
    if "content" not in frame and code is not None and code not in (0, 200):
        return f"code {code}: {frame.get('msg') or frame.get('message') or ''}"
    return None


def _token_failure(exc: YachAPIError) -> UpstreamFailure:
    """What a failed `/gettoken` means for the turn."""
    if exc.rate_limited:
        return UpstreamRateLimited(exc.reason, retry_after=exc.retry_after)
    if exc.reason.startswith("cannot reach") or re.match(r"HTTP 5\d\d", exc.reason):
        return UpstreamUnavailable(f"gettoken: {exc.reason}")
    return UpstreamAuthError(f"gettoken: {exc.reason}")


def _answer_failure(exc: YachAPIError, payload: object) -> UpstreamFailure:
    """What an unsuccessful `{"code", "msg"}` answer means for the turn."""
    if exc.rate_limited:
        return UpstreamRateLimited(exc.reason, retry_after=exc.retry_after)
    if exc.invalid_token:
        return UpstreamAuthError(exc.reason)
    report = payload if isinstance(payload, Mapping) else None
    return failure_of(reported_error(NAME, report).kind, exc.reason)


def _not_a_stream(status: int, text: str) -> UpstreamFailure:
    """Why the stream read answered something other than a stream: the failure its JSON
    reports (an invalid token, an overload: retried), else a protocol error."""
    try:
        payload = json_value(text, upstream=NAME)
        check_answer(status, payload, {})
    except UpstreamProtocolError:
        pass
    except YachAPIError as exc:
        return _answer_failure(exc, payload)
    return UpstreamProtocolError(f"expected text/event-stream, got: {clip(text, 300)}")


class YachAgentUpstream:
    name = NAME
    keeps_history = True

    def __init__(
        self,
        settings: Settings,
        http: UpstreamHTTP,
        api: YachAPI,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._api = api
        self._chat_url = api.api_base + CHAT_PATH
        self._stream_template = settings.yach_agent_stream_url or api.api_base + DEFAULT_STREAM_PATH
        self._biz_id = settings.yach_agent_biz_id
        self._inputs = json.dumps(settings.yach_agent_inputs, ensure_ascii=False)
        self._clock = clock

    def _body(self, turn: Turn) -> dict[str, Any]:
        urls = [image.url for image in turn.images]
        body: dict[str, Any] = {
            "query": image_text_query(turn.text, urls) if urls else turn.text,
            "biz_id": turn.sender.work_code or self._biz_id or turn.sender.id,
            "inputs": self._inputs,
            "msg_type": "image_text" if urls else "text",
            "create_at": turn.created_at_s or int(self._clock()),
        }
        chat_session_id = (turn.conversation or {}).get("chat_session_id")
        if chat_session_id:
            body["chat_session_id"] = chat_session_id
        return body

    async def stream(self, turn: Turn) -> AsyncIterator[Event]:
        body = self._body(turn)
        started = await self._start(body)
        chat_session_id = started.get("chat_session_id") or body.get("chat_session_id")
        if chat_session_id:
            yield ConversationRef({"chat_session_id": str(chat_session_id)})
        url, params = self._stream_location(str(started["stream_id"]))
        async with AsyncExitStack() as stack:
            response = await self._read(stack, url, params)
            events = relay(iter_sse(response), YachAgentParser(), upstream=self.name)
            async with aclosing(events):
                async for event in events:
                    yield event

    async def _start(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """POST the question; the answer's `obj` (`stream_id`, `chat_session_id`)."""
        token: str | None = None
        for fresh in (False, True):
            token = await self._token(refused=token)
            try:
                answer = await self._http.retried(partial(self._ask, token, body))
            except UpstreamAuthError:
                if fresh:
                    raise
                continue
            obj = answer.get("obj")
            if not isinstance(obj, dict) or not obj.get("stream_id"):
                raise UpstreamProtocolError(f"answer without stream_id: {clip(str(answer), 300)}")
            return obj
        raise AssertionError("unreachable")

    async def _ask(self, token: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """One try of the POST: its successful answer, else the failure it reports, raised
        (the caller retries those of the retried kinds, as it does the statuses)."""
        payload = await self._http.json(
            "POST", self._chat_url, json={"access_token": token, **body}, retry=False
        )
        try:
            answer: Mapping[str, Any] = check_answer(200, payload, {})
        except YachAPIError as exc:
            raise _answer_failure(exc, payload) from exc
        return answer

    async def _read(
        self, stack: AsyncExitStack, url: str, params: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """The answer's event stream, left open on `stack`; a token the read's JSON answer
        calls invalid is replaced once (an HTTP 401/403 there, just after the POST accepted
        the same token, is reported as it is)."""
        for fresh in (False, True):
            params["access_token"] = await self._token(refused=params.get("access_token"))
            read = self._http.open(
                "GET", url, params=params, headers=_STREAM_HEADERS, not_a_stream=_not_a_stream
            )
            try:
                return await stack.enter_async_context(read)
            except UpstreamAuthError as exc:
                if fresh or exc.status is not None:
                    raise
        raise AssertionError("unreachable")

    async def _token(self, *, refused: str | None) -> str:
        """The app token; a fresh one when `refused` (the last one sent) was called invalid."""
        if refused is not None:
            self._api.invalidate_token(refused)
        async for attempt in self._http.retrying():
            with attempt:
                try:
                    return await self._api.access_token()
                except YachAPIError as exc:
                    raise _token_failure(exc) from exc
        raise AssertionError("unreachable")

    def _stream_location(self, stream_id: str) -> tuple[str, dict[str, str]]:
        if "{stream_id}" in self._stream_template:
            return self._stream_template.replace("{stream_id}", quote(stream_id, safe="")), {}
        return self._stream_template, {"stream_id": stream_id}

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Nothing to delete upstream: the next turn simply omits `chat_session_id`."""

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> YachAgentUpstream:
    app_key, app_secret = require(settings, "yach_app_key", "yach_app_secret")
    api = YachAPI.shared(http.session, settings.yach_api_base, app_key, app_secret)
    return YachAgentUpstream(settings, http, api)
