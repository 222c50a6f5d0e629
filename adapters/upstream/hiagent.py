"""HiAgent web chat through its page's proxy API (hiagent-web-chat.md).

The page sets the `hiagent-csrf`/`x-csrf-token` cookies; every API call sends them back with
the `x-csrf-token` and `app-visitor-key` headers. A session's first turn creates an app
conversation (`AppConversationID`); the first stream names the `conversation_id` that keeps
the context on later turns. The stream nests SSE in SSE: each outer event's data is itself
`data: {json}` followed by blank lines.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from http.cookies import Morsel
from typing import Any

import aiohttp
from yarl import URL

from adapters.upstream._common import (
    ConversationIds,
    body_failure,
    json_object,
    relay,
    reported_error,
    require,
    usage_from,
)
from bridge.config import Settings
from bridge.events import Done, Event, ReasoningDelta, Suggestions, TextDelta
from bridge.http import (
    UpstreamAuthError,
    UpstreamHTTP,
    UpstreamProtocolError,
    UpstreamRejected,
    iter_sse,
    read_text,
)
from bridge.interfaces import KeyValue, Turn
from bridge.logging import clip_value, register_issued_secret
from bridge.sse import SSEEvent

__all__ = ["HiAgentParser", "HiAgentUpstream", "create", "inner_payloads"]

NAME = "hiagent"
API_PATH = "/api/proxy/chat/v2"
CSRF_COOKIE = "x-csrf-token"  # its value is also sent as the header of the same name
_CREDENTIAL_COOKIES = (CSRF_COOKIE, "hiagent-csrf")
VISITOR_KEY_NAME = "visitor_key"  # in the adapter's KeyValue
APP_CONVERSATION = "AppConversationID"  # keys of the conversation reference (SPEC §5)
CONVERSATION = "conversation_id"
_JSON_ACCEPT = "application/json, text/plain, */*"
_STREAM_ACCEPT = "application/json, text/event-stream"
# What the web client sends with every API call (the seed's `timeout` header, in ms): the
# platform's proxy may hold a long answer that long.
_PROXY_TIMEOUT_MS = "300000"
_FAILURES = frozenset({"message_failed", "error"})  # inner events that end the turn as errors


def inner_payloads(data: str) -> list[str]:
    """The JSON payloads inside one outer event's data (`data: {json}` plus blank lines).

    A bare JSON line is accepted too, in case the proxy ever stops double-wrapping. The data's
    lines are joined with LF alone (SSE); `str.splitlines` would also cut at U+2028, U+2029
    and NEL, which the proxy's JSON carries raw inside answer text.
    """
    payloads = []
    for line in data.split("\n"):
        payload = line.strip()
        if payload.startswith("data:"):
            payload = payload[len("data:") :].strip()
        if payload:
            payloads.append(payload)
    return payloads


class HiAgentParser:
    """The inner events: `message` (text), `think_message` (reasoning, in its `answer`),
    `suggestion` (follow-up questions, in `suggested_questions`), `message_cost` (usage),
    `message_end`, and the failures `message_failed` (HiAgent's own, with its `error` text)
    and `error`.

    `message_start`, `message_output_start`/`_end`, `think_message_output_start`/`_end`,
    `suggestion_cost` and unknown events only reveal the conversation id. (Event names and
    fields: HiAgent's open-API chat_query, the same engine behind the web proxy.)
    """

    def __init__(self, ids: ConversationIds | None = None) -> None:
        self._ids = ids if ids is not None else ConversationIds()

    def feed(self, message: SSEEvent) -> list[Event]:
        events: list[Event] = []
        for payload in inner_payloads(message.data):
            events.extend(self._on(json_object(payload, upstream=NAME)))
        return events

    def _on(self, inner: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        ref = self._ids.update(conversation_id=inner.get(CONVERSATION))
        if ref is not None:
            events.append(ref)
        kind = inner.get("event")
        answer = inner.get("answer")
        if kind == "message" and isinstance(answer, str) and answer:
            events.append(TextDelta(answer))
        elif kind == "think_message" and isinstance(answer, str) and answer:
            events.append(ReasoningDelta(answer))
        elif kind == "suggestion":
            events.extend(_suggestions(inner.get("suggested_questions")))
        elif kind == "message_cost":
            events.append(_usage(inner))
        elif kind == "message_end":
            events.append(Done())
        elif kind in _FAILURES:
            events.append(reported_error(NAME, inner))
        return events


def _suggestions(questions: object) -> list[Event]:
    """The non-blank questions of a `suggestion` event, as one `Suggestions` (none: nothing)."""
    if not isinstance(questions, list):
        return []
    items = tuple(q.strip() for q in questions if isinstance(q, str) and q.strip())
    return [Suggestions(items)] if items else []


def _usage(cost: Mapping[str, Any]) -> Event:
    return usage_from(cost, prompt="input_tokens", completion="output_tokens", latency="latency")


@dataclass(frozen=True, slots=True)
class _Csrf:
    """What the page handed out: its cookies, and the token the header repeats.

    The cookies are kept as morsels so that they go back exactly as the server coded them.
    """

    token: str
    cookies: Mapping[str, Morsel[str]]


def _cookies_set_by(response: aiohttp.ClientResponse) -> dict[str, Morsel[str]]:
    """Cookies of the response and of any redirect before it (the shared session's cookie jar
    is not relied upon: it belongs to every adapter)."""
    cookies: dict[str, Morsel[str]] = {}
    for hop in (*response.history, response):
        cookies.update(hop.cookies.items())
    return cookies


def _check_base_resp(data: Mapping[str, Any], path: str) -> None:
    """A failure reported in the body (`BaseResp` with a non-zero `StatusCode`)."""
    base_resp = data.get("BaseResp")
    if isinstance(base_resp, Mapping) and base_resp.get("StatusCode") not in (None, 0):
        code = clip_value(base_resp.get("StatusCode"), 100)
        detail = clip_value(base_resp.get("StatusMessage") or "no message", 300)
        raise UpstreamRejected(f"hiagent {path}: {code}: {detail}")


class HiAgentUpstream:
    name = NAME
    keeps_history = True

    def __init__(self, settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> None:
        base_url, app_key = require(settings, "hiagent_base_url", "hiagent_app_key")
        self._http = http
        self._kv = kv
        self._api_url = base_url + API_PATH
        self._page_url = base_url + settings.hiagent_page_path.replace("{app_key}", app_key)
        self._origin = str(URL(base_url).origin())
        self._app_key = app_key
        self._inputs = dict(settings.hiagent_inputs)
        self._visitor_key = settings.hiagent_visitor_key
        self._csrf: _Csrf | None = None
        self._lock = asyncio.Lock()

    async def stream(self, turn: Turn) -> AsyncIterator[Event]:
        ids = ConversationIds(turn.conversation)
        if not ids.get(APP_CONVERSATION):  # a session's first turn
            ids = ConversationIds()
            ref = ids.update(**{APP_CONVERSATION: await self._create_conversation()})
            if ref is not None:
                yield ref
        async with (
            self._post("chat_query", self._query(turn, ids), stream=True) as response,
            aclosing(relay(iter_sse(response), HiAgentParser(ids), upstream=NAME)) as events,
        ):
            async for event in events:
                yield event

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Delete the app conversation upstream."""
        app_conversation_id = conversation.get(APP_CONVERSATION)
        if app_conversation_id:
            body = {"AppKey": self._app_key, "AppConversationID": app_conversation_id}
            await self._call("delete_conversation", body)

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""

    def _query(self, turn: Turn, ids: ConversationIds) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Query": turn.text,
            "AppConversationID": ids.get(APP_CONVERSATION),
            "AppKey": self._app_key,
            "QueryExtends": {"Files": []},
        }
        if ids.get(CONVERSATION):  # learnt from the first stream: it keeps the context
            body["ConversationID"] = ids.get(CONVERSATION)
        return body

    async def _create_conversation(self) -> str:
        body = {"AppKey": self._app_key, "Inputs": self._inputs}
        data = await self._call("create_conversation", body)
        conversation = data.get("Conversation")
        app_conversation_id = (
            conversation.get("AppConversationID") if isinstance(conversation, Mapping) else None
        )
        if not isinstance(app_conversation_id, str) or not app_conversation_id:
            raise UpstreamProtocolError("hiagent create_conversation: no AppConversationID")
        return app_conversation_id

    async def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON call of the proxy API."""
        async with self._post(path, body) as response:
            text = await read_text(response)
        data = json_object(text, upstream=NAME)
        _check_base_resp(data, path)
        return data

    @asynccontextmanager
    async def _post(
        self, path: str, body: Mapping[str, Any], *, stream: bool = False
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response to a proxy API call; on 401/403 the CSRF cookies are fetched again, once."""
        csrf = await self._current_csrf()
        async with AsyncExitStack() as stack:
            try:
                response = await self._open(stack, path, body, csrf, stream)
            except UpstreamAuthError:
                csrf = await self._current_csrf(stale=csrf)
                response = await self._open(stack, path, body, csrf, stream)
            yield response

    async def _open(
        self, stack: AsyncExitStack, path: str, body: Mapping[str, Any], csrf: _Csrf, stream: bool
    ) -> aiohttp.ClientResponse:
        headers = {
            "Accept": _STREAM_ACCEPT if stream else _JSON_ACCEPT,
            "x-csrf-token": csrf.token,
            "app-visitor-key": await self._visitor(),
            "timeout": _PROXY_TIMEOUT_MS,
            "Origin": self._origin,
            "Referer": self._page_url,
        }
        not_a_stream = partial(body_failure, NAME) if stream else None
        request = self._http.open(
            "POST", f"{self._api_url}/{path}", json=body, headers=headers,
            cookies=dict(csrf.cookies), not_a_stream=not_a_stream,
        )
        return await stack.enter_async_context(request)

    async def _current_csrf(self, stale: _Csrf | None = None) -> _Csrf:
        """The page's CSRF cookies, fetched when missing or when `stale` was refused.

        Concurrent turns refused with the same token fetch the page only once.
        """
        async with self._lock:
            if self._csrf is None or self._csrf is stale:
                self._csrf = await self._fetch_csrf()
            return self._csrf

    async def _fetch_csrf(self) -> _Csrf:
        headers = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        async with self._http.open("GET", self._page_url, headers=headers) as response:
            cookies = _cookies_set_by(response)
        token = cookies.get(CSRF_COOKIE)
        if token is None or not token.value:
            raise UpstreamProtocolError(f"hiagent page set no {CSRF_COOKIE} cookie")
        # Credentials of the visitor: masked wherever an answer quotes them. (Only these two:
        # another cookie may hold a common word, `zh-CN`, that masking would garble.)
        for name in _CREDENTIAL_COOKIES:
            if name in cookies:
                register_issued_secret(f"hiagent-{name}", cookies[name].value)
        return _Csrf(token=token.value, cookies=cookies)

    async def _visitor(self) -> str:
        """`BRIDGE_HIAGENT_VISITOR_KEY`, else a random id made once per bot and kept."""
        if not self._visitor_key:
            async with self._lock:
                if not self._visitor_key:
                    self._visitor_key = await self._stored_visitor_key()
                    # (one made here is no setting: masked as one)
                    register_issued_secret("hiagent-visitor-key", self._visitor_key)
        return self._visitor_key

    async def _stored_visitor_key(self) -> str:
        stored = await self._kv.get(VISITOR_KEY_NAME)
        if stored:
            return stored
        made = uuid.uuid4().hex
        await self._kv.set(VISITOR_KEY_NAME, made)
        # Two processes starting at once may both write: reading back narrows the window in
        # which they disagree (KeyValue has no set-if-absent to close it).
        return await self._kv.get(VISITOR_KEY_NAME) or made


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> HiAgentUpstream:
    return HiAgentUpstream(settings, http, kv)
