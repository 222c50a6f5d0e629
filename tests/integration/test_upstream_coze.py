"""The Coze adapter against a fake `/v3/chat` streaming what the notes and the docs show."""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.upstream import create_upstream
from bridge.config import load_settings
from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    Suggestions,
    UpstreamError,
    Usage,
)
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn, Upstream
from tests.fakes.coze import (
    ANSWER,
    BOT_ID,
    CONVERSATION_ID,
    FOLLOW_UPS,
    TOKEN,
    CozeFake,
    error_frames,
    failed_frames,
)
from tests.fakes.streaming import Mode, answer_text, collect, refused_url

SESSION_ID = "yach:g:group-1:u:user-1"


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[CozeFake]:
    server = await CozeFake.start(seed=getattr(request, "param", 0))
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def coze(session: aiohttp.ClientSession, base_url: str, *, token: str = TOKEN,
         idle_timeout_s: float = 5.0) -> Upstream:
    settings = load_settings({"BRIDGE_UPSTREAM": "coze", "BRIDGE_COZE_BASE_URL": base_url,
                              "BRIDGE_COZE_TOKEN": token, "BRIDGE_COZE_BOT_ID": BOT_ID},
                             command="demo")
    http = UpstreamHTTP(session, retries=2, backoff_s=0.01, connect_timeout_s=2,
                        idle_timeout_s=idle_timeout_s, total_timeout_s=30)
    return create_upstream(settings, http, _NoKV())


class _NoKV:
    async def get(self, name: str) -> str | None:
        raise AssertionError("coze keeps nothing")

    async def set(self, name: str, value: str) -> None:
        raise AssertionError("coze keeps nothing")


def turn(text: str = "你知道薛之谦吗?", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def chats(fake: CozeFake) -> list[Any]:
    return fake.server.on("/v3/chat")


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
async def test_answer_suggestions_usage_and_conversation(fake: CozeFake,
                                                         session: aiohttp.ClientSession) -> None:
    events = await collect(coze(session, fake.url), turn())

    assert answer_text(events) == ANSWER  # two answer messages, a blank line between them
    assert [e for e in events if isinstance(e, ConversationRef)] == [
        ConversationRef({"conversation_id": CONVERSATION_ID})
    ]
    assert isinstance(events[0], ConversationRef)  # saved before any text
    assert Usage(prompt_tokens=2618, completion_tokens=44, total_tokens=2662) in events
    assert events[-2:] == [Suggestions(FOLLOW_UPS), Done()]


async def test_first_turn_request(fake: CozeFake, session: aiohttp.ClientSession) -> None:
    await collect(coze(session, fake.url), turn())

    request = chats(fake)[0]
    assert request.query == {}
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json() == {
        "bot_id": BOT_ID, "user_id": SESSION_ID, "stream": True, "auto_save_history": True,
        "additional_messages": [{"role": "user", "content": "你知道薛之谦吗?",
                                 "content_type": "text"}],
    }


async def test_second_turn_continues_by_query_parameter(fake: CozeFake,
                                                        session: aiohttp.ClientSession) -> None:
    upstream = coze(session, fake.url)
    first = await collect(upstream, turn())
    ref = next(dict(e.ref) for e in first if isinstance(e, ConversationRef))
    second = await collect(upstream, turn("他的代表作有哪些?", conversation=ref))

    assert answer_text(second) == ANSWER
    assert not any(isinstance(e, ConversationRef) for e in second)  # nothing new to save
    later = chats(fake)[1]
    assert later.query == {"conversation_id": CONVERSATION_ID}
    assert "conversation_id" not in later.json()


async def test_reset_deletes_the_conversation(fake: CozeFake,
                                              session: aiohttp.ClientSession) -> None:
    upstream = coze(session, fake.url)
    await upstream.reset({})
    await upstream.reset({"conversation_id": CONVERSATION_ID})

    assert fake.deleted == [CONVERSATION_ID]


async def test_bad_token_is_an_auth_error(fake: CozeFake,
                                          session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamAuthError):
        await collect(coze(session, fake.url, token="pat_wrong"), turn())

    assert len(chats(fake)) == 1  # never retried


@pytest.mark.parametrize(("code", "error"), [
    (4100, UpstreamAuthError), (4013, UpstreamRateLimited), (4000, UpstreamRejected),
])
async def test_json_error_instead_of_a_stream(fake: CozeFake, session: aiohttp.ClientSession,
                                              code: int, error: type[Exception]) -> None:
    fake.script.fail(200, body={"code": code, "msg": "something is wrong"})
    with pytest.raises(error, match=f"coze error {code}"):
        await collect(coze(session, fake.url), turn())


@pytest.mark.parametrize(("status", "headers"), [(429, {"Retry-After": "0"}), (502, {})])
async def test_retried_before_the_first_byte(fake: CozeFake, session: aiohttp.ClientSession,
                                             status: int, headers: dict[str, str]) -> None:
    fake.script.fail(status, headers=headers)
    events = await collect(coze(session, fake.url), turn())

    assert answer_text(events) == ANSWER
    assert len(chats(fake)) == 2


async def test_server_errors_outlast_the_retries(fake: CozeFake,
                                                 session: aiohttp.ClientSession) -> None:
    fake.script.fail(503, times=3)
    with pytest.raises(UpstreamUnavailable):
        await collect(coze(session, fake.url), turn())

    assert len(chats(fake)) == 3


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(coze(session, refused_url()), turn())


@pytest.mark.parametrize("mode", [Mode.CUT, Mode.TRUNCATED])
async def test_stream_that_stops_midway_is_broken(fake: CozeFake, session: aiohttp.ClientSession,
                                                  mode: Mode) -> None:
    fake.script.mode = mode
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(coze(session, fake.url), turn(), into=events)

    assert ANSWER.startswith(answer_text(events))
    assert ConversationRef({"conversation_id": CONVERSATION_ID}) in events  # kept though failed


@pytest.mark.parametrize(("frames", "text", "detail"), [
    (error_frames(), "当然知道，", "Request parameter error"),
    (failed_frames(), "当然", "model is overloaded"),
])
async def test_error_events_end_the_turn(fake: CozeFake, session: aiohttp.ClientSession,
                                         frames: list[str], text: str, detail: str) -> None:
    fake.stream = "".join(frames).encode()
    events = await collect(coze(session, fake.url), turn())

    assert answer_text(events) == text
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is ErrorKind.REJECTED
    assert detail in events[-1].message
    assert Done() not in events


async def test_idle_stream_times_out(fake: CozeFake, session: aiohttp.ClientSession) -> None:
    fake.script.mode = Mode.STALL
    with pytest.raises(UpstreamTimeout):
        await collect(coze(session, fake.url, idle_timeout_s=0.2), turn())


async def test_official_sdk_reads_the_fake(fake: CozeFake) -> None:
    """The fake is only as good as its likeness: cozepy must read the same answer from it."""
    # cozepy imports deprecated authlib modules, and authlib forces its warning "always".
    with warnings.catch_warnings(record=True):
        cozepy = pytest.importorskip("cozepy")
        async with cozepy.AsyncHTTPClient() as http_client:
            client = cozepy.AsyncCoze(auth=cozepy.AsyncTokenAuth(TOKEN), base_url=fake.url,
                                      http_client=http_client)
            question = cozepy.Message.build_user_question_text("你知道薛之谦吗?")
            stream = client.chat.stream(bot_id=BOT_ID, user_id=SESSION_ID,
                                        additional_messages=[question])
            deltas, follow_ups, usage = [], [], None
            async for event in stream:
                if event.event == cozepy.ChatEventType.CONVERSATION_MESSAGE_DELTA:
                    deltas.append(event.message.content)
                elif (event.event == cozepy.ChatEventType.CONVERSATION_MESSAGE_COMPLETED
                      and event.message.type == "follow_up"):
                    follow_ups.append(event.message.content)
                elif event.event == cozepy.ChatEventType.CONVERSATION_CHAT_COMPLETED:
                    usage = event.chat.usage

    assert "".join(deltas) == ANSWER.replace("\n\n", "")
    assert tuple(follow_ups) == FOLLOW_UPS
    assert usage is not None and usage.token_count == 2662
    assert json.loads(chats(fake)[0].body)["bot_id"] == BOT_ID

