"""Dify chat apps: `POST /chat-messages` streamed (`response_mode: streaming`); `/reset` deletes.

An answer left unfinished (`/stop`, a broken stream) is stopped with
`POST /chat-messages/{task_id}/stop`: Dify generates in a worker of its own, which goes on
(and spends tokens) when the request that asked is closed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from functools import partial
from typing import Any
from urllib.parse import quote

from adapters.upstream._common import (
    ConversationIds,
    as_id,
    bearer,
    body_failure,
    json_object,
    recover_gone_conversation,
    relay,
    reported_error,
    request_stop,
    require,
    usage_from,
)
from bridge.config import Settings
from bridge.events import Done, Event, TextDelta, TextReplace, UpstreamError
from bridge.http import UpstreamFailure, UpstreamHTTP, iter_sse
from bridge.interfaces import KeyValue, Turn
from bridge.sse import SSEEvent

__all__ = ["DifyParser", "DifyUpstream", "create"]

NAME = "dify"
# `message` in chat apps, `agent_message` in agent apps. Everything else (`ping`, `tts_*`,
# `agent_thought`, `message_file`, `workflow_*`, `node_*`) is not answer text, even when
# its payload repeats the answer.
_ANSWER_EVENTS = frozenset({"message", "agent_message"})


class DifyParser:
    """Dify's SSE messages (`data: {"event": …}`) as internal events."""

    def __init__(self, ids: ConversationIds | None = None) -> None:
        self._ids = ids if ids is not None else ConversationIds()
        self.task_id = ""  # the generation to stop, should the answer be left unfinished
        self.finished = False

    def feed(self, message: SSEEvent) -> list[Event]:
        if not message.data.strip():  # `event: ping` comes without data
            return []
        payload = json_object(message.data, upstream=NAME)
        self.task_id = self.task_id or as_id(payload.get("task_id"))
        events: list[Event] = []
        ref = self._ids.update(conversation_id=payload.get("conversation_id"))
        if ref is not None:
            events.append(ref)
        events.extend(self._on(str(payload.get("event") or message.event), payload))
        self.finished = self.finished or any(isinstance(e, Done | UpstreamError) for e in events)
        return events

    def _on(self, kind: str, payload: Mapping[str, Any]) -> list[Event]:
        answer = payload.get("answer")
        if kind in _ANSWER_EVENTS:
            return [TextDelta(answer)] if isinstance(answer, str) and answer else []
        if kind == "message_replace":
            return [TextReplace(answer)] if isinstance(answer, str) else []
        if kind == "message_end":
            return [*_usage(payload), Done()]
        if kind == "error":
            return [reported_error(NAME, payload)]
        return []


def _conversation_gone(failure: UpstreamFailure | UpstreamError) -> bool:
    """Dify's `404 {"code": "not_found", "message": "Conversation Not Exists."}` (deleted in
    the console, or the API key now names another app)."""
    return (
        isinstance(failure, UpstreamFailure)
        and failure.status == 404
        and "conversation not exist" in failure.message.lower()
    )


def _usage(payload: Mapping[str, Any]) -> list[Event]:
    metadata = payload.get("metadata")
    usage = metadata.get("usage") if isinstance(metadata, Mapping) else None
    if not isinstance(usage, Mapping):
        return []
    return [
        usage_from(
            usage,
            prompt="prompt_tokens",
            completion="completion_tokens",
            total="total_tokens",
            latency="latency",
        )
    ]


class DifyUpstream:
    name = NAME
    keeps_history = True

    def __init__(self, settings: Settings, http: UpstreamHTTP) -> None:
        base_url, api_key = require(settings, "dify_base_url", "dify_api_key")
        self._http = http
        self._base_url = base_url
        self._url = f"{base_url}/chat-messages"
        self._auth = bearer(api_key)
        self._headers = {**self._auth, "Accept": "text/event-stream"}
        self._inputs = dict(settings.dify_inputs)

    def _body(self, turn: Turn, ids: ConversationIds) -> dict[str, Any]:
        return {
            "inputs": self._inputs,
            "query": turn.text,
            "response_mode": "streaming",
            "conversation_id": ids.get("conversation_id"),  # "" starts a new one
            "user": turn.chat_session_id,
        }

    def stream(self, turn: Turn) -> AsyncIterator[Event]:
        return recover_gone_conversation(turn, self._answer, _conversation_gone, upstream=NAME)

    async def _answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        ids = ConversationIds(turn.conversation)
        body = self._body(turn, ids)
        parser = DifyParser(ids)
        try:
            async with (
                self._http.open(
                    "POST", self._url, json=body, headers=self._headers,
                    not_a_stream=partial(body_failure, NAME),
                ) as response,
                aclosing(relay(iter_sse(response), parser, upstream=NAME)) as events,
            ):
                async for event in events:
                    yield event
        finally:
            if parser.task_id and not parser.finished:
                await self._stop(parser.task_id, turn.chat_session_id)

    async def _stop(self, task_id: str, chat_session_id: str) -> None:
        url = f"{self._url}/{quote(task_id, safe='')}/stop"
        await request_stop(
            self._http, url, upstream=NAME, json={"user": chat_session_id}, headers=self._auth
        )

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Delete the conversation upstream: `DELETE /conversations/{id}` for the `user` the
        turns were sent as (the session)."""
        conversation_id = conversation.get("conversation_id")
        if not conversation_id:
            return
        url = f"{self._base_url}/conversations/{quote(conversation_id, safe='')}"
        body = {"user": chat_session_id}
        # 204 No Content, or `{"result": "success"}` from older servers; failures raise.
        async with self._http.open("DELETE", url, json=body, headers=self._auth):
            pass

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> DifyUpstream:
    return DifyUpstream(settings, http)
