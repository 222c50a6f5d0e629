"""Coze bots: `POST /v3/chat` streamed, the conversation continued by its id (coze-v3-chat.md)."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

from adapters.upstream._common import (
    ConversationIds,
    as_failure,
    as_id,
    as_int,
    bearer,
    json_object,
    recover_gone_conversation,
    relay,
    reported_error,
    require,
    usage_from,
)
from bridge.config import Settings
from bridge.events import (
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    UpstreamError,
)
from bridge.http import UpstreamFailure, UpstreamHTTP, UpstreamProtocolError, iter_sse
from bridge.interfaces import KeyValue, Turn
from bridge.sse import SSEEvent

__all__ = ["CozeParser", "CozeUpstream", "api_error", "coze_error", "create"]

NAME = "coze"
ANSWER_SEPARATOR = "\n\n"  # several answer messages of one chat are joined with a blank line
# Coze's own error codes (its public error-code table): token invalid / lacking permission,
# request rate exceeded, internal server error. Other codes: what the message says.
_KIND_OF_CODE = {
    4100: ErrorKind.AUTH,
    4101: ErrorKind.AUTH,
    4013: ErrorKind.RATE_LIMITED,
    5000: ErrorKind.UNAVAILABLE,
}
# "Requested resource … does not exist" (the same table), naming what is missing: a stored
# conversation deleted or not the bot's, or the bot itself (`Requested resource
# bot_id=7496… does not exist.`, as coze-dev/coze-java#92 quotes it).
_MISSING_RESOURCE = re.compile(r"\b4200\b")
_TEXT_CONTENT = frozenset({"", "text"})  # not `card`, `object_string`, `audio`

_Handler = Callable[[Mapping[str, Any]], list[Event]]


class CozeParser:
    """Coze's SSE messages (`event:conversation.…` + JSON data, `event:done`) as events.

    Only `answer` deltas are text (`verbose`, `function_call`, `tool_*` are not); the
    `completed` answer message repeats the deltas and is skipped; `follow_up` messages are
    gathered and given as one `Suggestions` at the end.
    """

    def __init__(self, ids: ConversationIds | None = None) -> None:
        self._ids = ids if ids is not None else ConversationIds()
        self._answer_id: str | None = None  # the answer message whose deltas came last
        self._suggestions: list[str] = []
        self._handlers: dict[str, _Handler] = {
            "conversation.chat.created": _nothing,
            "conversation.chat.in_progress": _nothing,
            "conversation.message.delta": self._on_delta,
            "conversation.message.completed": self._on_completed,
            "conversation.chat.completed": _on_chat_completed,
            "conversation.chat.failed": _on_chat_failed,
            "conversation.chat.requires_action": _on_requires_action,
            "error": lambda payload: [coze_error(payload)],
        }

    def feed(self, message: SSEEvent) -> list[Event]:
        if message.event == "done":  # its data is `"[DONE]"`
            return self._finish()
        handler = self._handlers.get(message.event)
        if handler is None:  # e.g. conversation.audio.delta
            return []
        payload = json_object(message.data, upstream=NAME)
        events: list[Event] = []
        ref = self._ids.update(conversation_id=payload.get("conversation_id"))
        if ref is not None:
            events.append(ref)
        events.extend(handler(payload))
        return events

    def _on_delta(self, message: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            events.append(ReasoningDelta(reasoning))
        content = message.get("content")
        if _is_answer(message) and isinstance(content, str) and content:
            message_id = as_id(message.get("id"))
            if self._answer_id is not None and message_id != self._answer_id:
                events.append(TextDelta(ANSWER_SEPARATOR))
            self._answer_id = message_id
            events.append(TextDelta(content))
        return events

    def _on_completed(self, message: Mapping[str, Any]) -> list[Event]:
        content = message.get("content")
        if message.get("type") == "follow_up" and isinstance(content, str) and content.strip():
            self._suggestions.append(content.strip())
        return []

    def _finish(self) -> list[Event]:
        events: list[Event] = []
        if self._suggestions:
            events.append(Suggestions(tuple(self._suggestions)))
        events.append(Done())
        return events


def _is_answer(message: Mapping[str, Any]) -> bool:
    return message.get("type") == "answer" and (message.get("content_type") or "") in _TEXT_CONTENT


def _nothing(payload: Mapping[str, Any]) -> list[Event]:
    return []


def _on_chat_completed(chat: Mapping[str, Any]) -> list[Event]:
    usage = chat.get("usage")
    if not isinstance(usage, Mapping):
        return []
    return [usage_from(usage, prompt="input_count", completion="output_count", total="token_count")]


def _on_chat_failed(chat: Mapping[str, Any]) -> list[Event]:
    last_error = chat.get("last_error")
    return [coze_error(last_error if isinstance(last_error, Mapping) else None)]


def _on_requires_action(chat: Mapping[str, Any]) -> list[Event]:
    message = "coze bot asked for a client-side tool call (requires_action); the bridge has none"
    return [UpstreamError(kind=ErrorKind.REJECTED, message=message)]


def coze_error(data: Mapping[str, Any] | None) -> UpstreamError:
    """An error Coze reports (`{"code", "msg"}`: an `error` event, a failed chat's
    `last_error`, a body): of the kind its message says, as for every upstream (a 5000
    saying "model is overloaded" is an overload), else of its code's kind where the code is
    known, else a rejection."""
    error = reported_error(NAME, data)
    kind = _KIND_OF_CODE.get(as_int((data or {}).get("code")) or 0)
    if kind is None or error.kind is not ErrorKind.REJECTED:
        return error
    return UpstreamError(kind, error.message)


def api_error(data: Mapping[str, Any]) -> UpstreamFailure:
    """The failure in a `{"code": …, "msg": …}` body, which Coze sends instead of a stream."""
    if not as_int(data.get("code")):
        return UpstreamProtocolError("coze answered JSON without an error code, not a stream")
    return as_failure(coze_error(data))


def _conversation_gone(failure: UpstreamFailure | UpstreamError) -> bool:
    """Coze's missing-resource error naming the conversation: in place of the stream, or as
    the `conversation.chat.failed` that ends it."""
    message = failure.message
    return bool(_MISSING_RESOURCE.search(message)) and "conversation" in message.lower()


def _not_a_stream(status: int, text: str) -> UpstreamFailure:
    """A JSON answer in place of the stream: the error it reports (a rate limit is retried)."""
    try:
        return api_error(json_object(text, upstream=NAME))
    except UpstreamProtocolError as exc:
        return exc


class CozeUpstream:
    name = NAME
    keeps_history = True

    def __init__(self, settings: Settings, http: UpstreamHTTP) -> None:
        token, bot_id = require(settings, "coze_token", "coze_bot_id")
        self._http = http
        self._base_url = settings.coze_base_url
        self._headers = bearer(token)
        self._bot_id = bot_id

    def _body(self, turn: Turn) -> dict[str, Any]:
        return {
            "bot_id": self._bot_id,
            "user_id": turn.chat_session_id,
            "stream": True,
            "auto_save_history": True,
            "additional_messages": [{"role": "user", "content": turn.text, "content_type": "text"}],
        }

    def stream(self, turn: Turn) -> AsyncIterator[Event]:
        return recover_gone_conversation(turn, self._answer, _conversation_gone, upstream=NAME)

    async def _answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        ids = ConversationIds(turn.conversation)
        conversation_id = ids.get("conversation_id")
        # A stored conversation is continued through the query string, not the body (SPEC §7).
        params = {"conversation_id": conversation_id} if conversation_id else None
        async with self._http.open(
            "POST", f"{self._base_url}/v3/chat", params=params, json=self._body(turn),
            headers=self._headers, not_a_stream=_not_a_stream,
        ) as response:
            parsed = relay(iter_sse(response), CozeParser(ids), upstream=NAME)
            async with aclosing(parsed) as events:
                async for event in events:
                    yield event

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Delete the conversation upstream (`DELETE /v1/conversations/{id}`)."""
        conversation_id = conversation.get("conversation_id")
        if not conversation_id:
            return
        url = f"{self._base_url}/v1/conversations/{quote(conversation_id, safe='')}"
        data = await self._http.json("DELETE", url, headers=self._headers)
        if isinstance(data, Mapping) and as_int(data.get("code")):
            raise api_error(data)

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> CozeUpstream:
    return CozeUpstream(settings, http)
