"""The HiAgent adapter against a fake web-chat proxy serving the recorded chat_query stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.upstream import create_upstream
from bridge.config import load_settings
from bridge.events import ConversationRef, Done, ErrorKind, Event, UpstreamError, Usage
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import KeyValue, Sender, Turn, Upstream
from tests.fakes.hiagent import (
    API,
    APP_CONVERSATION_ID,
    APP_KEY,
    FIXTURE,
    FIXTURE_CONVERSATION_ID,
    PAGE_PATH,
    HiAgentFake,
    message,
    nested_stream,
)
from tests.fakes.streaming import MemoryKV, Mode, answer_text, collect, refused_url

CHAT_QUERY = f"{API}/chat_query"
CREATE = f"{API}/create_conversation"
SESSION_ID = "yach:g:group-1:u:user-1"


def recorded_answer() -> str:
    """The fixture's answer, read without the adapter: every `message` event's `answer`."""
    answer = ""
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if line.startswith("data:data:"):
            inner = json.loads(line.removeprefix("data:data:"))
            if inner["event"] == "message":
                answer += inner["answer"]
    return answer


EXPECTED = recorded_answer()


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[HiAgentFake]:
    server = await HiAgentFake.start(seed=getattr(request, "param", 0))
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: the adapter must carry the CSRF cookies itself (the session is shared).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


def hiagent(session: aiohttp.ClientSession, base_url: str, *, kv: KeyValue | None = None,
            idle_timeout_s: float = 5.0, **env: str) -> Upstream:
    settings = load_settings({"BRIDGE_UPSTREAM": "hiagent", "BRIDGE_HIAGENT_BASE_URL": base_url,
                              "BRIDGE_HIAGENT_APP_KEY": APP_KEY, **env}, command="demo")
    http = UpstreamHTTP(session, retries=2, backoff_s=0.01, connect_timeout_s=2,
                        idle_timeout_s=idle_timeout_s, total_timeout_s=30)
    return create_upstream(settings, http, kv or MemoryKV())


def turn(text: str = "你知道OVS吗？", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def refs(events: list[Event]) -> list[dict[str, str]]:
    return [dict(event.ref) for event in events if isinstance(event, ConversationRef)]


def bodies(fake: HiAgentFake, path: str) -> list[dict[str, Any]]:
    return [request.json() for request in fake.server.on(path)]


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
async def test_recorded_answer_arrives_whole(fake: HiAgentFake,
                                             session: aiohttp.ClientSession) -> None:
    events = await collect(hiagent(session, fake.url), turn())

    assert answer_text(events) == EXPECTED
    assert EXPECTED.startswith("OpenStack 是一个开源的云计算管理平台项目")
    assert events[-1] == Done()
    assert Usage(prompt_tokens=686, completion_tokens=126, total_tokens=812,
                 latency_s=8.636) in events
    assert refs(events) == [
        {"app_conversation_id": APP_CONVERSATION_ID},
        {"app_conversation_id": APP_CONVERSATION_ID, "conversation_id": FIXTURE_CONVERSATION_ID},
    ]
    first_text = next(i for i, e in enumerate(events) if answer_text([e]))
    assert max(i for i, e in enumerate(events) if isinstance(e, ConversationRef)) < first_text


async def test_first_turn_creates_the_conversation_with_csrf_and_visitor_key(
    fake: HiAgentFake, session: aiohttp.ClientSession
) -> None:
    kv = MemoryKV()
    await collect(hiagent(session, fake.url, kv=kv, BRIDGE_HIAGENT_INPUTS='{"lang":"zh"}'),
                  turn())

    assert len(fake.server.on(PAGE_PATH)) == 1
    assert bodies(fake, CREATE) == [{"AppKey": APP_KEY, "Inputs": {"lang": "zh"}}]
    assert bodies(fake, CHAT_QUERY) == [{
        "Query": "你知道OVS吗？", "AppConversationID": APP_CONVERSATION_ID, "AppKey": APP_KEY,
        "QueryExtends": {"Files": []},
    }]
    query = fake.server.on(CHAT_QUERY)[0]
    assert query.headers["x-csrf-token"] == "csrf/token+1=="
    assert query.headers["app-visitor-key"] == kv.values["visitor_key"]
    assert query.headers["Referer"] == fake.url + PAGE_PATH


async def test_second_turn_reuses_both_conversation_ids(fake: HiAgentFake,
                                                        session: aiohttp.ClientSession) -> None:
    upstream = hiagent(session, fake.url)
    first = await collect(upstream, turn())
    second = await collect(upstream, turn("那你知道OVN吗？", conversation=refs(first)[-1]))

    assert answer_text(second) == EXPECTED
    assert refs(second) == []  # nothing new to save
    assert len(fake.server.on(CREATE)) == 1
    assert len(fake.server.on(PAGE_PATH)) == 1  # the CSRF cookies are kept
    later = bodies(fake, CHAT_QUERY)[1]
    assert later["AppConversationID"] == APP_CONVERSATION_ID
    assert later["ConversationID"] == FIXTURE_CONVERSATION_ID
    assert later["Query"] == "那你知道OVN吗？"


async def test_visitor_key_is_made_once_per_bot_and_kept(fake: HiAgentFake,
                                                         session: aiohttp.ClientSession) -> None:
    kv = MemoryKV()
    await collect(hiagent(session, fake.url, kv=kv), turn())
    await collect(hiagent(session, fake.url, kv=kv), turn())  # another process of the bot

    keys = {request.headers["app-visitor-key"] for request in fake.server.on(CHAT_QUERY)}
    assert keys == {kv.values["visitor_key"]}


async def test_visitor_key_from_settings_wins(fake: HiAgentFake,
                                              session: aiohttp.ClientSession) -> None:
    kv = MemoryKV()
    upstream = hiagent(session, fake.url, kv=kv, BRIDGE_HIAGENT_VISITOR_KEY="visitor-from-env")
    await collect(upstream, turn())

    assert fake.server.on(CHAT_QUERY)[0].headers["app-visitor-key"] == "visitor-from-env"
    assert kv.values == {}


async def test_refused_csrf_token_is_fetched_again_once(fake: HiAgentFake,
                                                        session: aiohttp.ClientSession) -> None:
    upstream = hiagent(session, fake.url)
    first = await collect(upstream, turn())
    fake.expire_csrf()
    second = await collect(upstream, turn(conversation=refs(first)[-1]))

    assert answer_text(second) == EXPECTED
    assert len(fake.server.on(PAGE_PATH)) == 2
    tokens = [request.headers["x-csrf-token"] for request in fake.server.on(CHAT_QUERY)]
    assert tokens == ["csrf/token+1==", "csrf/token+1==", "csrf/token+2=="]


async def test_csrf_refused_twice_is_an_auth_error(fake: HiAgentFake,
                                                   session: aiohttp.ClientSession) -> None:
    fake.refuse_all = True
    with pytest.raises(UpstreamAuthError):
        await collect(hiagent(session, fake.url), turn())

    assert len(fake.server.on(PAGE_PATH)) == 2
    assert len(fake.server.on(CREATE)) == 2


async def test_reset_deletes_the_app_conversation(fake: HiAgentFake,
                                                  session: aiohttp.ClientSession) -> None:
    upstream = hiagent(session, fake.url)
    await upstream.reset({})  # nothing stored: nothing to delete
    await upstream.reset({"app_conversation_id": "app-1", "conversation_id": "c-1"})

    assert bodies(fake, f"{API}/delete_conversation") == [
        {"AppKey": APP_KEY, "AppConversationID": "app-1"}
    ]


@pytest.mark.parametrize(("status", "headers"), [(429, {"Retry-After": "0"}), (502, {})])
async def test_retried_before_the_first_byte(fake: HiAgentFake, session: aiohttp.ClientSession,
                                             status: int, headers: dict[str, str]) -> None:
    fake.script.fail(status, headers=headers)
    events = await collect(hiagent(session, fake.url), turn())

    assert answer_text(events) == EXPECTED
    assert len(fake.server.on(CHAT_QUERY)) == 2


async def test_server_errors_outlast_the_retries(fake: HiAgentFake,
                                                 session: aiohttp.ClientSession) -> None:
    fake.script.fail(503, times=3)
    with pytest.raises(UpstreamUnavailable):
        await collect(hiagent(session, fake.url), turn())

    assert len(fake.server.on(CHAT_QUERY)) == 3


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(hiagent(session, refused_url()), turn())


@pytest.mark.parametrize("mode", [Mode.CUT, Mode.TRUNCATED])
async def test_stream_that_stops_midway_is_broken(fake: HiAgentFake,
                                                  session: aiohttp.ClientSession,
                                                  mode: Mode) -> None:
    fake.script.mode = mode
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(hiagent(session, fake.url), turn(), into=events)

    assert EXPECTED.startswith(answer_text(events))
    assert len(answer_text(events)) < len(EXPECTED)
    assert refs(events)[-1]["conversation_id"] == FIXTURE_CONVERSATION_ID  # kept though failed


async def test_error_event_ends_the_turn(fake: HiAgentFake,
                                         session: aiohttp.ClientSession) -> None:
    fake.stream = nested_stream([
        message("Open"), message("Stack"),
        {"event": "error", "code": 500, "message": "model overloaded",
         "conversation_id": FIXTURE_CONVERSATION_ID},
        message("never shown"),
    ])
    events = await collect(hiagent(session, fake.url), turn())

    assert answer_text(events) == "OpenStack"
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is ErrorKind.REJECTED
    assert "model overloaded" in events[-1].message


async def test_idle_stream_times_out(fake: HiAgentFake, session: aiohttp.ClientSession) -> None:
    fake.script.mode = Mode.STALL
    events: list[Event] = []
    with pytest.raises(UpstreamTimeout):
        await collect(hiagent(session, fake.url, idle_timeout_s=0.2), turn(), into=events)

    assert EXPECTED.startswith(answer_text(events))
