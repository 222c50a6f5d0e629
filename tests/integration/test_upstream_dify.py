"""The Dify adapter against a fake `/v1/chat-messages` streaming chat, agent and chatflow apps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.upstream import create_upstream
from bridge.config import load_settings
from bridge.events import ConversationRef, Done, ErrorKind, Event, TextReplace, UpstreamError, Usage
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn, Upstream
from tests.fakes.dify import (
    ANSWER,
    API_KEY,
    CONVERSATION_ID,
    PARTS,
    DifyFake,
    agent,
    chatflow,
    failing,
    render,
    replaced,
)
from tests.fakes.streaming import MemoryKV, Mode, answer_text, collect, refused_url

SESSION_ID = "yach:g:group-1:u:user-1"
PATH = "/v1/chat-messages"
USAGE = Usage(prompt_tokens=1, completion_tokens=44, total_tokens=45,
              latency_s=2.9540078879799694)


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[DifyFake]:
    server = await DifyFake.start(seed=getattr(request, "param", 0))
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def dify(session: aiohttp.ClientSession, base_url: str, *, api_key: str = API_KEY,
         idle_timeout_s: float = 5.0) -> Upstream:
    settings = load_settings({"BRIDGE_UPSTREAM": "dify", "BRIDGE_DIFY_BASE_URL": base_url,
                              "BRIDGE_DIFY_API_KEY": api_key,
                              "BRIDGE_DIFY_INPUTS": '{"grade": "7"}'}, command="demo")
    http = UpstreamHTTP(session, retries=2, backoff_s=0.01, connect_timeout_s=2,
                        idle_timeout_s=idle_timeout_s, total_timeout_s=30)
    return create_upstream(settings, http, MemoryKV())


def turn(text: str = "333", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def bodies(fake: DifyFake) -> list[dict[str, Any]]:
    return [request.json() for request in fake.server.on(PATH)]


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("app", [chatflow, agent])
@pytest.mark.parametrize("ascii_only", [False, True], ids=["utf8", "escaped"])
async def test_answer_usage_and_conversation(fake: DifyFake, session: aiohttp.ClientSession,
                                             app: Any, ascii_only: bool) -> None:
    fake.stream = render(app(), ascii_only=ascii_only)
    events = await collect(dify(session, fake.base_url), turn())

    assert answer_text(events) == ANSWER  # thoughts, tts, workflow outputs add nothing
    assert [e for e in events if isinstance(e, ConversationRef)] == [
        ConversationRef({"conversation_id": CONVERSATION_ID})
    ]
    assert isinstance(events[0], ConversationRef)  # saved before any text
    assert events[-2:] == [USAGE, Done()]


async def test_first_turn_request(fake: DifyFake, session: aiohttp.ClientSession) -> None:
    await collect(dify(session, fake.base_url), turn())

    request = fake.server.on(PATH)[0]
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.json() == {"inputs": {"grade": "7"}, "query": "333",
                              "response_mode": "streaming", "conversation_id": "",
                              "user": SESSION_ID}


async def test_second_turn_sends_the_conversation_id(fake: DifyFake,
                                                     session: aiohttp.ClientSession) -> None:
    upstream = dify(session, fake.base_url)
    first = await collect(upstream, turn())
    ref = next(dict(e.ref) for e in first if isinstance(e, ConversationRef))
    second = await collect(upstream, turn("444", conversation=ref))

    assert answer_text(second) == ANSWER
    assert not any(isinstance(e, ConversationRef) for e in second)
    assert bodies(fake)[1]["conversation_id"] == CONVERSATION_ID


@pytest.mark.parametrize("replacement", ["内容不合规，已被替换。", PARTS[0] + PARTS[1]])
async def test_message_replace_replaces_the_answer(fake: DifyFake,
                                                   session: aiohttp.ClientSession,
                                                   replacement: str) -> None:
    fake.stream = render(replaced(replacement))
    events = await collect(dify(session, fake.base_url), turn())

    assert TextReplace(replacement) in events
    assert answer_text(events) == replacement
    assert events[-1] == Done()


async def test_bad_key_is_an_auth_error(fake: DifyFake, session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamAuthError):
        await collect(dify(session, fake.base_url, api_key="app-wrong"), turn())

    assert len(fake.server.on(PATH)) == 1


async def test_unknown_conversation_is_rejected(fake: DifyFake,
                                                session: aiohttp.ClientSession) -> None:
    fake.script.fail(404, body={"code": "not_found", "message": "Conversation Not Exists.",
                                "status": 404})
    with pytest.raises(UpstreamRejected, match="Conversation Not Exists"):
        await collect(dify(session, fake.base_url), turn(conversation={"conversation_id": "x"}))


@pytest.mark.parametrize(("status", "headers"), [(429, {"Retry-After": "0"}), (500, {})])
async def test_retried_before_the_first_byte(fake: DifyFake, session: aiohttp.ClientSession,
                                             status: int, headers: dict[str, str]) -> None:
    fake.script.fail(status, headers=headers)
    events = await collect(dify(session, fake.base_url), turn())

    assert answer_text(events) == ANSWER
    assert len(fake.server.on(PATH)) == 2


async def test_server_errors_outlast_the_retries(fake: DifyFake,
                                                 session: aiohttp.ClientSession) -> None:
    fake.script.fail(502, times=3)
    with pytest.raises(UpstreamUnavailable):
        await collect(dify(session, fake.base_url), turn())

    assert len(fake.server.on(PATH)) == 3


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(dify(session, refused_url() + "/v1"), turn())


@pytest.mark.parametrize("mode", [Mode.CUT, Mode.TRUNCATED])
async def test_stream_that_stops_midway_is_broken(fake: DifyFake, session: aiohttp.ClientSession,
                                                  mode: Mode) -> None:
    fake.script.mode = mode
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(dify(session, fake.base_url), turn(), into=events)

    assert ANSWER.startswith(answer_text(events))
    assert len(answer_text(events)) < len(ANSWER)


async def test_error_event_ends_the_turn(fake: DifyFake, session: aiohttp.ClientSession) -> None:
    fake.stream = render(failing())
    events = await collect(dify(session, fake.base_url), turn())

    assert answer_text(events) == PARTS[0]
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is ErrorKind.REJECTED
    assert "completion_request_error" in events[-1].message
    assert Done() not in events


async def test_idle_stream_times_out(fake: DifyFake, session: aiohttp.ClientSession) -> None:
    fake.script.mode = Mode.STALL
    with pytest.raises(UpstreamTimeout):
        await collect(dify(session, fake.base_url, idle_timeout_s=0.2), turn())
