"""The chatgpt-web adapter against a fake backend-api: SSE and WebSocket answers, /stop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import aiohttp
import pytest

from adapters.upstream import chatgpt_web
from bridge.config import ConfigError, load_settings
from bridge.events import ConversationRef, Done, ErrorKind, Event, TextDelta, UpstreamError
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn
from tests.fakes.chatgpt_web import (
    ANSWER,
    CONVERSATION,
    CONVERSATION_ID,
    PIECES,
    QUESTION,
    STOP,
    WS,
    FakeChatGPT,
)
from tests.fakes.scripted import free_port, sse_payloads, sse_reply, status

ACCESS_TOKEN = "chatgpt-test-access-token"


class DictKV:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str) -> None:
        self.values[name] = value


def turn(text: str = QUESTION, conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("u1"), chat_session_id="yach:u:u1",
                conversation=conversation)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture(params=[3, 4])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeChatGPT]:
    server = await FakeChatGPT(seed=request.param).start()
    yield server
    await server.close()


def make(session: aiohttp.ClientSession, base_url: str,
         idle_timeout_s: float = 5.0) -> chatgpt_web.ChatGPTWebUpstream:
    settings = load_settings({
        "BRIDGE_UPSTREAM": "chatgpt-web",
        "BRIDGE_CHATGPT_BASE_URL": base_url,
        "BRIDGE_CHATGPT_ACCESS_TOKEN": ACCESS_TOKEN,
        "BRIDGE_CHATGPT_MODEL": "gpt-4o",
    }, command="demo")
    http = UpstreamHTTP(session, retries=2, backoff_s=0.01, idle_timeout_s=idle_timeout_s)
    return chatgpt_web.create(settings, http, DictKV())


async def collect(upstream: chatgpt_web.ChatGPTWebUpstream, the_turn: Turn,
                  into: list[Event] | None = None) -> list[Event]:
    events = [] if into is None else into
    async for event in upstream.stream(the_turn):
        events.append(event)
    return events


def answer(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def refs(events: list[Event]) -> list[dict[str, str]]:
    return [dict(e.ref) for e in events if isinstance(e, ConversationRef)]


async def test_sse_answer_exact_with_refs_and_request_shape(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == ANSWER
    assert [e.text for e in events if isinstance(e, TextDelta)] == PIECES
    assert events[-1] == Done()
    (request,) = fake.server.on(CONVERSATION)
    body = request.json()
    assert request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert body["action"] == "next"
    assert body["model"] == "gpt-4o"
    assert "conversation_id" not in body
    (message,) = body["messages"]
    assert message["author"] == {"role": "user"}
    assert message["content"] == {"content_type": "text", "parts": [QUESTION]}
    assert uuid.UUID(message["id"]) != uuid.UUID(body["parent_message_id"])
    first, last = refs(events)[0], refs(events)[-1]
    assert first == {"conversation_id": CONVERSATION_ID, "parent_message_id": message["id"]}
    assert last["conversation_id"] == CONVERSATION_ID
    assert last["parent_message_id"].startswith("a5515fa1-")
    assert not fake.server.on(STOP)


async def test_second_turn_continues_from_the_assistant_message(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    upstream = make(session, fake.base_url)
    first = await collect(upstream, turn())
    stored = refs(first)[-1]
    second = await collect(upstream, turn("噢噢好的", conversation=stored))
    assert answer(second) == ANSWER
    body = fake.server.on(CONVERSATION)[1].json()
    assert body["conversation_id"] == CONVERSATION_ID
    assert body["parent_message_id"] == stored["parent_message_id"]
    assert refs(second)[-1]["parent_message_id"] != stored["parent_message_id"]


@pytest.mark.parametrize("ws_mode", ["done", "hub"])
async def test_websocket_answer_exact(
    ws_mode: str, fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.ws_mode = "ws", ws_mode
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == ANSWER
    assert events[-1] == Done()
    assert refs(events)[0]["conversation_id"] == CONVERSATION_ID
    assert refs(events)[-1]["parent_message_id"].startswith("a5515fa1-")
    assert len(fake.server.on(WS)) == 1


async def test_fallback_wss_url_when_wss_url_is_unreachable(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.wss_target = "ws", "dead"
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == ANSWER
    assert events[-1] == Done()


async def test_no_socket_reachable_is_unavailable(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.wss_target = "ws", "all_dead"
    with pytest.raises(UpstreamUnavailable):
        await collect(make(session, fake.base_url), turn())


async def test_socket_closed_normally_ends_the_turn(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "close"
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == ANSWER
    assert events[-1] == Done()


async def test_socket_dropped_is_broken(fake: FakeChatGPT, session: aiohttp.ClientSession) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "drop"
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(make(session, fake.base_url), turn(), into=events)
    assert answer(events) == "".join(PIECES[:2])


async def test_socket_idle_timeout(fake: FakeChatGPT, session: aiohttp.ClientSession) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "stall"
    with pytest.raises(UpstreamTimeout):
        await collect(make(session, fake.base_url, idle_timeout_s=0.3), turn())


@pytest.mark.parametrize("mode", ["sse", "ws"])
async def test_stop_request_sent_when_the_consumer_stops_early(
    mode: str, fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.ws_mode = mode, "stall"
    if mode == "sse":
        fake.script.then(lambda request: stalled_sse(fake, request))
    async with aclosing(make(session, fake.base_url).stream(turn())) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                break
    (stop,) = await fake.server.wait_for_requests(1, STOP, timeout=5)
    sent = fake.server.on(CONVERSATION)[0].json()
    assert stop.json() == {"websocket_request_id": sent["websocket_request_id"]}
    assert stop.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"


async def test_stop_request_sent_when_the_turn_is_cancelled(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "stall"
    first_text = asyncio.Event()

    async def consume() -> None:
        async for event in make(session, fake.base_url).stream(turn()):
            if isinstance(event, TextDelta):
                first_text.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_text.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(await fake.server.wait_for_requests(1, STOP, timeout=5)) == 1


async def stalled_sse(
    fake: FakeChatGPT, request: aiohttp.web.Request
) -> aiohttp.web.StreamResponse:
    """The first answer pieces, then silence (until the fake closes)."""
    data = sse_payloads(fake._payloads(await request.json())[:4])
    return await sse_reply(data, fake.rng, stall_after=10**6, release=fake.release)(request)


async def test_error_message_in_the_stream(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    data = sse_payloads([
        {"message": None, "conversation_id": CONVERSATION_ID,
         "error": "Something went wrong while generating the response."},
    ])
    fake.script.then(sse_reply(data, fake.rng))
    events = await collect(make(session, fake.base_url), turn())
    assert events[-1] == UpstreamError(
        ErrorKind.REJECTED, "Something went wrong while generating the response."
    )
    assert refs(events) == [
        {"conversation_id": CONVERSATION_ID,
         "parent_message_id": fake.server.on(CONVERSATION)[0].json()["messages"][0]["id"]}
    ]


@pytest.mark.parametrize("code", [401, 403])
async def test_auth_failure(code: int, fake: FakeChatGPT, session: aiohttp.ClientSession) -> None:
    fake.script.then(status(code, {"detail": "token expired"}))
    with pytest.raises(UpstreamAuthError):
        await collect(make(session, fake.base_url), turn())
    assert len(fake.server.on(CONVERSATION)) == 1
    assert not fake.server.on(STOP)


async def test_429_retry_after_is_honoured(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(429, {"detail": "Too many requests"}, {"Retry-After": "0.3"}))
    started = time.monotonic()
    events = await collect(make(session, fake.base_url), turn())
    assert time.monotonic() - started >= 0.3
    assert answer(events) == ANSWER
    assert len(fake.server.on(CONVERSATION)) == 2


async def test_5xx_is_retried_then_reported(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(500), status(502), status(503))
    with pytest.raises(UpstreamUnavailable):
        await collect(make(session, fake.base_url), turn())
    assert len(fake.server.on(CONVERSATION)) == 3


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(make(session, f"http://127.0.0.1:{free_port()}/backend-api"), turn())


async def test_sse_cut_midway_is_broken(
    fake: FakeChatGPT, session: aiohttp.ClientSession
) -> None:
    async def cut(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        data = sse_payloads(fake._payloads(await request.json()))
        return await sse_reply(data, fake.rng, cut_after=12, max_size=60)(request)

    fake.script.then(cut)
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(make(session, fake.base_url), turn(), into=events)
    assert ANSWER.startswith(answer(events))
    assert len(await fake.server.wait_for_requests(1, STOP, timeout=5)) == 1


async def test_sse_idle_timeout(fake: FakeChatGPT, session: aiohttp.ClientSession) -> None:
    fake.script.then(lambda request: stalled_sse(fake, request))
    with pytest.raises(UpstreamTimeout):
        await collect(make(session, fake.base_url, idle_timeout_s=0.3), turn())


async def test_missing_access_token_is_a_configuration_error(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(ConfigError, match="BRIDGE_CHATGPT_ACCESS_TOKEN"):
        chatgpt_web.create(load_settings({}, command="demo"), UpstreamHTTP(session), DictKV())
