"""OpenAI-compatible chat completions, streamed (`stream: true`, SSE, `[DONE]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import orjson

from adapters.upstream._common import (
    bearer,
    body_failure,
    is_done,
    json_object,
    relay,
    reported_error,
    require,
    usage_from,
)
from bridge.config import Settings
from bridge.events import Done, Event, ReasoningDelta, TextDelta, UpstreamError
from bridge.http import UpstreamHTTP
from bridge.interfaces import KeyValue, Turn
from bridge.sse import SSEEvent

__all__ = [
    "OpenAIParser",
    "OpenAIUpstream",
    "chunk_object",
    "create",
    "parse_chunk",
    "stream_error",
]

NAME = "openai"


def parse_chunk(chunk: Mapping[str, Any]) -> list[Event]:
    """The events of one `chat.completion.chunk`, tolerant of what real servers add.

    Real servers send a role-only first chunk, chunks with empty `choices`, `null`
    content, and usage either in a final choice-less chunk or inside the choice.
    """
    events: list[Event] = []
    choices = chunk.get("choices") or []
    choice: Mapping[str, Any] = choices[0] if choices else {}
    delta: Mapping[str, Any] = choice.get("delta") or {}
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        events.append(ReasoningDelta(reasoning))
    content = delta.get("content")
    if isinstance(content, str) and content:
        events.append(TextDelta(content))
    usage = chunk.get("usage") or choice.get("usage")
    if usage is not None and isinstance(usage, Mapping):  # (no ABC check of every token's None)
        events.append(
            usage_from(
                usage, prompt="prompt_tokens", completion="completion_tokens", total="total_tokens"
            )
        )
    return events


def chunk_object(data: str) -> dict[str, Any]:
    """A chunk's JSON object. orjson reads it three times faster than `json`; what orjson
    refuses (NaN, a lone surrogate, not an object) goes to `json_object`, which reads it or
    raises the usual error. The one other difference, an integer past 64 bits read as a
    float, could only touch the usage counts, which are logged."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return json_object(data, upstream=NAME)
    return value if isinstance(value, dict) else json_object(data, upstream=NAME)


def stream_error(chunk: Mapping[str, Any]) -> UpstreamError | None:
    """The failure a server reports inside a 200 stream, as `{"error": {...}}` in place of a
    chunk (OpenAI, vLLM, LiteLLM; vLLM still ends the stream with `[DONE]` after it), of the
    kind its `type`, `code` and message say (an overload is no rejection of the question)."""
    if not chunk.get("error"):  # (absent, or `null` alongside a chunk)
        return None
    return reported_error(NAME, chunk)


class OpenAIParser:
    """One streamed answer: `chat.completion.chunk` messages, then `[DONE]`; an `error` object
    instead of a chunk ends it as an error. Pure: no I/O."""

    def feed(self, message: SSEEvent) -> list[Event]:
        if is_done(message.data):
            return [Done()]
        chunk = chunk_object(message.data)
        if "error" in chunk and (error := stream_error(chunk)) is not None:
            return [error]
        return parse_chunk(chunk)


def user_content(turn: Turn) -> str | list[dict[str, Any]]:
    """The user message: plain text, or text plus images as data URLs (vision models)."""
    images = [image.data_url for image in turn.images if image.data_url]
    if not images:
        return turn.text
    parts: list[dict[str, Any]] = []
    if turn.text:
        parts.append({"type": "text", "text": turn.text})
    parts.extend({"type": "image_url", "image_url": {"url": url}} for url in images)
    return parts


class OpenAIUpstream:
    name = NAME
    keeps_history = False

    def __init__(self, settings: Settings, http: UpstreamHTTP) -> None:
        api_key, model = require(settings, "openai_api_key", "openai_model")
        self._http = http
        self._url = f"{settings.openai_base_url}/chat/completions"
        self._headers = bearer(api_key)
        self._model = model
        self._system_prompt = settings.openai_system_prompt
        self._temperature = settings.openai_temperature

    def _body(self, turn: Turn) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if self._system_prompt:
            messages.append({"role": "system", "content": self._system_prompt})
        for past in turn.history:
            messages.append({"role": "user", "content": past.question})
            messages.append({"role": "assistant", "content": past.answer})
        messages.append({"role": "user", "content": user_content(turn)})
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._temperature is not None:
            body["temperature"] = self._temperature
        return body

    def stream(self, turn: Turn) -> AsyncIterator[Event]:
        sse = self._http.sse(
            "POST", self._url, json=self._body(turn), headers=self._headers,
            not_a_stream=partial(body_failure, NAME),
        )
        return relay(sse, OpenAIParser(), upstream=self.name)

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Nothing to forget upstream: the history lives in Redis."""

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> OpenAIUpstream:
    return OpenAIUpstream(settings, http)
