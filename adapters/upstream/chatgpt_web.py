"""ChatGPT web backend-api conversations (chatgpt-dify-coze-web-compare.md, SPEC §7).

`POST {base}/conversation` with `action: next`, a fresh user message id, `parent_message_id`
and, after the first turn, `conversation_id`; `Authorization: Bearer <access token>`. The
answer is either `text/event-stream` on the POST itself or JSON naming a `wss_url` (and a
`fallback_wss_url`, tried when `wss_url` cannot be reached) where each text frame carries
one message as it would follow `data:`. Messages carry the assistant's *cumulative*
`content.parts`; only the new suffix is emitted. The turn ends at `[DONE]`, at an assistant
message with `status: finished_successfully` and `end_turn: true`, or when the socket closes.

Decisions the notes leave open:
- Conversation reference: `conversation_id` + `parent_message_id`. Until the assistant's
  message id is known the parent is our own user message (it exists in the conversation
  tree), then the assistant's message id; a new reference is emitted whenever it changes.
- Several assistant messages in one turn (e.g. after a tool call) are joined with a blank
  line; a cumulative text that does not extend the previous one becomes a `TextReplace` of
  the whole answer. Messages addressed to a tool (`recipient` other than `all`) and
  non-string parts are not answer text; `parts` that are no list are a protocol error.
- A socket closed with a normal close code (1000/1001) ends the turn; a dropped connection
  or another close code is a broken stream. Frames in the hub envelope real servers use
  (`{"type": "http.response.body", "body": <base64 SSE>}`) are unwrapped too.
- `/stop` (cancelling the generator) sends `POST {base}/stop_conversation` with the turn's
  `websocket_request_id`, as the notes show, when the request was accepted but the turn did
  not finish; it is best-effort (5 s, failures logged).
- `reset` is a no-op: the notes show no call that deletes or hides a conversation.
- The sockets are named by the server, so they pass §8's fetch rules first (`URLGuard`):
  `wss`, or `ws` to a BRIDGE_FETCH_ALLOW_HOSTS host or to the configured base URL's host
  when that is `http` itself; a host neither of those must resolve to public addresses
  only, and the socket is opened to the addresses checked (a pinned resolver: a second DNS
  answer cannot point it inside the network). A refused URL is skipped as an unreachable
  one is, and when none is left the turn fails as unavailable (not as an answer to
  rephrase: the question is not the cause).
- A stored conversation the server no longer has (deleted in the web UI, or another
  account's token) answers `404 {"detail": {"message": "Conversation not found", "code":
  "conversation_not_found"}}` (older servers: `{"detail": "Conversation not found"}`), as
  reported by users of other clients of this protocol (xtekky/gpt4free#1767,
  RockChinQ/revLibs#15): the question is asked again in a new conversation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, aclosing
from functools import partial
from typing import Any

import aiohttp
import structlog
from yarl import URL

from adapters.upstream._common import (
    as_failure,
    is_done,
    json_value,
    recover_gone_conversation,
    relay,
    reported_error,
    request_stop,
    require,
)
from bridge.config import Settings
from bridge.events import (
    ConversationRef,
    Done,
    Event,
    TextDelta,
    TextReplace,
    UpstreamError,
)
from bridge.fetch import FetchFailed, FetchRefused, PinnedResolver, URLGuard, pinned_session
from bridge.http import (
    UpstreamBroken,
    UpstreamFailure,
    UpstreamHTTP,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRedirectRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_for_status,
    feed_sse,
    iter_sse,
    read_text,
    refuse_cross_origin_redirects,
)
from bridge.interfaces import KeyValue, Turn
from bridge.logging import clip
from bridge.sse import SSEDecoder, SSEEvent

__all__ = ["ChatGPTParser", "ChatGPTWebUpstream", "create", "frame_payloads"]

log = structlog.get_logger(__name__)

NAME = "chatgpt-web"
SOCKET_CLOSE_TIMEOUT_S = 2.0
_TEXT_CONTENT_TYPES = ("text", "multimodal_text")
_NORMAL_CLOSE_CODES = (aiohttp.WSCloseCode.OK, aiohttp.WSCloseCode.GOING_AWAY)


class ChatGPTParser:
    """The events of one answer, message by message (WebSocket frames come as `SSEEvent`s).

    Pure: no I/O.
    """

    def __init__(self, user_message_id: str, conversation_id: str | None = None) -> None:
        self.conversation_id = conversation_id
        self.parent_message_id = user_message_id
        self._sent_ref: tuple[str, str] | None = None
        self._message_id: str | None = None  # the assistant message being streamed
        self._base: str | None = None  # the answer before that message, with its separator
        self.answer = ""
        self.finished = False

    def feed(self, message: SSEEvent) -> list[Event]:
        data = message.data
        if is_done(data):
            self.finished = True
            return [Done()]
        payload = json_value(data, upstream=NAME)
        if not isinstance(payload, dict):
            return []  # e.g. the `"v1"` announcing a delta encoding; nothing to show
        return self.feed_payload(payload)

    def feed_payload(self, payload: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        conversation_id = payload.get("conversation_id")
        if isinstance(conversation_id, str) and conversation_id:
            self.conversation_id = conversation_id
        message = payload.get("message")
        if payload.get("error") and not isinstance(message, Mapping):
            self.finished = True
            return [*self._ref(), reported_error(NAME, payload)]
        if isinstance(message, Mapping) and _is_answer(message):
            events.extend(self._message(message))
        events[:0] = self._ref()
        return events

    def _message(self, message: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        message_id = message.get("id")
        if isinstance(message_id, str) and message_id:
            if message_id != self._message_id:
                self._message_id, self._base = message_id, None
            self.parent_message_id = message_id
        text = _text_of(message)
        if text:
            if self._base is None:
                self._base = self.answer + "\n\n" if self.answer else ""
            events.extend(self._update(self._base + text))
        if message.get("status") == "finished_successfully" and message.get("end_turn") is True:
            self.finished = True
            events.append(Done())
        return events

    def _update(self, answer: str) -> list[Event]:
        previous, self.answer = self.answer, answer
        if answer == previous:
            return []
        if answer.startswith(previous):
            return [TextDelta(answer[len(previous) :])]
        return [TextReplace(answer)]

    def _ref(self) -> list[Event]:
        if not self.conversation_id:
            return []
        ref = (self.conversation_id, self.parent_message_id)
        if ref == self._sent_ref:
            return []
        self._sent_ref = ref
        return [ConversationRef({"conversation_id": ref[0], "parent_message_id": ref[1]})]


def _is_answer(message: Mapping[str, Any]) -> bool:
    author = message.get("author")
    role = author.get("role") if isinstance(author, Mapping) else None
    return role == "assistant" and message.get("recipient", "all") in ("all", None)


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if not isinstance(content, Mapping):
        return ""
    if content.get("content_type", "text") not in _TEXT_CONTENT_TYPES:
        return ""
    parts = content.get("parts")
    if not parts:  # none yet (absent, null, or an empty value of any type)
        return ""
    if not isinstance(parts, list):  # (iterated, a string's letters or a dict's keys were text)
        raise UpstreamProtocolError(f"{NAME}: parts of a {type(parts).__name__}, not a list")
    return "".join(part for part in parts if isinstance(part, str))


def frame_payloads(frame: str, decoder: SSEDecoder, websocket_request_id: str) -> list[str]:
    """The `data` payloads of one WebSocket text frame.

    A frame is one payload as it would follow `data:`; the hub envelope of real servers
    (`http.response.body` with base64 SSE bytes) is unwrapped through the SSE decoder, and
    envelopes of other requests sharing the socket are skipped.
    """
    try:
        envelope = json_value(frame, upstream=NAME)
    except UpstreamProtocolError:  # (not JSON: the parser refuses it as a message)
        return [frame]
    if not (isinstance(envelope, dict) and envelope.get("type") == "http.response.body"):
        return [frame]
    request_id = envelope.get("websocket_request_id")
    if request_id and request_id != websocket_request_id:
        return []
    try:
        body = base64.b64decode(str(envelope.get("body") or ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpstreamProtocolError("bad hub frame body") from exc
    return [event.data for event in feed_sse(decoder, body)]


class ChatGPTWebUpstream:
    name = NAME
    keeps_history = True

    def __init__(
        self,
        settings: Settings,
        http: UpstreamHTTP,
        *,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._http = http
        self._base = settings.chatgpt_base_url
        (access_token,) = require(settings, "chatgpt_access_token")
        self._auth = {"Authorization": f"Bearer {access_token}"}
        self._headers = {**self._auth, "Accept": "text/event-stream"}
        self._model = settings.chatgpt_model
        self._new_id = new_id
        base = URL(self._base)
        base_host = base.raw_host or ""
        # The configured host takes `ws` only where the operator chose plain http for it: a
        # server named over https does not get the socket's token sent in the clear.
        plain_base = {base_host} if base.scheme == "http" else set()
        self._sockets = URLGuard(
            allow_hosts={*settings.fetch_allow_hosts, base_host},
            plain_hosts={*settings.fetch_allow_hosts, *plain_base},
            schemes=("wss", "ws"),
        )

    def _body(self, turn: Turn, message_id: str, request_id: str) -> dict[str, Any]:
        conversation = turn.conversation or {}
        body: dict[str, Any] = {
            "action": "next",
            "messages": [
                {
                    "id": message_id,
                    "author": {"role": "user"},
                    "content": {"content_type": "text", "parts": [turn.text]},
                    "metadata": {},
                }
            ],
            "parent_message_id": conversation.get("parent_message_id") or self._new_id(),
            "model": self._model,
            "timezone_offset_min": -time.localtime().tm_gmtoff // 60,
            "history_and_training_disabled": False,
            "conversation_mode": {"kind": "primary_assistant"},
            "websocket_request_id": request_id,
            "force_use_sse": False,
        }
        if conversation.get("conversation_id"):
            body["conversation_id"] = conversation["conversation_id"]
        return body

    def stream(self, turn: Turn) -> AsyncIterator[Event]:
        return recover_gone_conversation(turn, self._answer, _conversation_gone, upstream=self.name)

    async def _answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        message_id, request_id = self._new_id(), self._new_id()
        parser = ChatGPTParser(message_id, (turn.conversation or {}).get("conversation_id"))
        accepted = False
        body = self._body(turn, message_id, request_id)
        try:
            async with AsyncExitStack() as stack:
                answer = await self._http.retried(partial(self._ask, stack, body))
                accepted = True
                if isinstance(answer, aiohttp.ClientResponse):
                    events = relay(iter_sse(answer), parser, upstream=self.name)
                    async with aclosing(events):
                        async for event in events:
                            yield event
                    return
            hub = answer
            for event in parser.feed_payload(hub):
                yield event
            async with aclosing(self._read_socket(hub, parser, request_id)) as events:
                async for event in events:
                    yield event
        finally:
            if accepted and not parser.finished:
                await self._stop(request_id)

    async def _ask(
        self, stack: AsyncExitStack, body: Mapping[str, Any]
    ) -> aiohttp.ClientResponse | dict[str, Any]:
        """One try of the question: its event stream (left open on `stack`), or the JSON
        answer naming the socket. An error that answer reports is raised: the caller retries
        those of the retried kinds (an overload), as it does the statuses."""
        url = f"{self._base}/conversation"
        async with AsyncExitStack() as attempt:
            response = await attempt.enter_async_context(
                self._http.open("POST", url, json=body, headers=self._headers, retry=False)
            )
            if response.content_type.startswith("text/event-stream"):
                stack.push_async_exit(attempt.pop_all())
                return response
            text = await read_text(response)
        return _hub_answer(text)

    async def _read_socket(
        self, hub: Mapping[str, Any], parser: ChatGPTParser, request_id: str
    ) -> AsyncGenerator[Event, None]:
        """The answer's events from the socket, read as an SSE stream is (`relay`: the end
        marker, errors, a message that cannot be read)."""
        resolver = PinnedResolver()
        # A handshake redirected elsewhere is not followed: a redirect to an IP literal is
        # connected to without the resolver, past the check (and the URL's token with it).
        async with pinned_session(
            resolver,
            headers=self._http.session.headers,
            middlewares=(refuse_cross_origin_redirects,),
        ) as session:
            ws = await self._connect(session, resolver, hub)
            try:
                messages = self._messages(ws, request_id)
                async with aclosing(relay(messages, parser, upstream=self.name)) as events:
                    async for event in events:
                        yield event
            finally:
                await ws.close()

    async def _messages(
        self, ws: aiohttp.ClientWebSocketResponse, request_id: str
    ) -> AsyncGenerator[SSEEvent, None]:
        """Each text frame's messages as SSE messages; a normal close as `[DONE]`."""
        decoder = SSEDecoder()
        deadline = asyncio.get_running_loop().time() + (self._http.total_timeout_s or 1e9)
        while True:
            message = await self._receive(ws, deadline)
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                frame = (
                    message.data
                    if isinstance(message.data, str)
                    else bytes(message.data).decode("utf-8", errors="replace")
                )
                for payload in frame_payloads(frame, decoder, request_id):
                    yield SSEEvent(payload)
                continue
            if message.type == aiohttp.WSMsgType.CLOSE and ws.close_code in _NORMAL_CLOSE_CODES:
                yield SSEEvent("[DONE]")  # the socket closed normally: the turn ended
                return
            raise UpstreamBroken(f"socket closed: {message.type.name} {ws.close_code}")

    async def _connect(
        self, session: aiohttp.ClientSession, resolver: PinnedResolver, hub: Mapping[str, Any]
    ) -> aiohttp.ClientWebSocketResponse:
        urls = [str(u) for u in (hub.get("wss_url"), hub.get("fallback_wss_url")) if u]
        failure: UpstreamFailure = UpstreamProtocolError("answer names no wss_url")
        for url in urls:
            try:
                return await asyncio.wait_for(
                    self._open_socket(session, resolver, url),
                    self._http.connect_timeout_s or None,
                )
            except FetchRefused as exc:
                failure = UpstreamUnavailable(f"the socket is refused: {exc.reason}")
                log.warning("chatgpt_socket_refused", reason=exc.reason, url=clip(url, 300))
                continue
            except FetchFailed as exc:  # its host does not resolve
                failure = UpstreamUnavailable(f"cannot reach the socket: {exc.reason}")
            except UpstreamRedirectRefused as exc:
                failure = exc
            except aiohttp.WSServerHandshakeError as exc:
                failure = error_for_status(exc.status, exc.message, exc.headers or {})
                if isinstance(failure, UpstreamNotFound):  # the answer's socket, not a setting
                    failure = UpstreamUnavailable(f"the socket is gone: {failure.message}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                failure = UpstreamUnavailable(f"cannot reach the socket: {type(exc).__name__}")
            log.warning("chatgpt_socket_unreachable", error=failure.message)
        raise failure

    async def _open_socket(
        self, session: aiohttp.ClientSession, resolver: PinnedResolver, url: str
    ) -> aiohttp.ClientWebSocketResponse:
        """The socket at `url`, once the fetch rules allow it, at the addresses checked."""
        target = await self._sockets.pin(url, resolver)
        timeout = aiohttp.ClientWSTimeout(ws_close=SOCKET_CLOSE_TIMEOUT_S)
        return await session.ws_connect(target, timeout=timeout)

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, deadline: float
    ) -> aiohttp.WSMessage:
        remaining = deadline - asyncio.get_running_loop().time()
        idle = self._http.idle_timeout_s or remaining
        try:
            return await ws.receive(timeout=max(min(idle, remaining), 0.0))
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no data for {min(idle, remaining):g} s") from exc

    async def _stop(self, request_id: str) -> None:
        body = {"websocket_request_id": request_id}
        await request_stop(
            self._http,
            f"{self._base}/stop_conversation",
            upstream=self.name,
            json=body,
            headers=self._auth,
        )

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """A no-op: the notes show no call that deletes or hides a conversation."""

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def _conversation_gone(failure: UpstreamFailure | UpstreamError) -> bool:
    """The 404 for a `conversation_id` the server does not have (not that of a wrong URL)."""
    return (
        isinstance(failure, UpstreamFailure)
        and failure.status == 404
        and "conversation not found" in failure.message.lower().replace("_", " ")
    )


def _hub_answer(text: str) -> dict[str, Any]:
    """The JSON answer naming the socket; an error answer becomes a typed error."""
    payload = json_value(text, upstream=NAME)
    if not isinstance(payload, dict):
        raise UpstreamProtocolError(f"unexpected answer: {clip(text, 300)}")
    if not payload.get("wss_url") and not payload.get("fallback_wss_url"):
        detail = payload.get("detail") or payload.get("error")
        if detail:  # `{"detail": "Too many requests…"}`, `{"detail": {"code": "token_expired"…}}`
            report = detail if isinstance(detail, Mapping) else {"message": detail}
            raise as_failure(reported_error(NAME, report))
        raise UpstreamProtocolError(f"answer names no wss_url: {clip(text, 300)}")
    return payload


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> ChatGPTWebUpstream:
    return ChatGPTWebUpstream(settings, http)
