"""The HiAgent adapter against a fake web-chat proxy serving the recorded chat_query stream.

The failures every adapter meets are in test_upstream_failures.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    ReasoningDelta,
    Suggestions,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamAuthError, UpstreamHTTP
from bridge.interfaces import KeyValue, Sender, Turn, Upstream
from tests.fakes.hiagent import (
    APP_CONVERSATION_ID,
    APP_KEY,
    CHAT_QUERY,
    CREATE,
    DELETE,
    FIXTURE_CONVERSATION_ID,
    PAGE_PATH,
    HiAgentFake,
    message,
    nested_stream,
    recorded_answer,
)
from tests.fakes.scripted import MemoryKV, answer_text, collect, connect, refs

SESSION_ID = "yach:g:group-1:u:user-1"
EXPECTED = recorded_answer()


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[HiAgentFake]:
    async with HiAgentFake(seed=getattr(request, "param", 0)) as server:
        yield server


def hiagent(http: UpstreamHTTP, fake: HiAgentFake, *, kv: KeyValue | None = None,
            **env: str) -> Upstream:
    return connect(http, fake.env(**env), kv)


def turn(text: str = "你知道OVS吗？", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def bodies(fake: HiAgentFake, path: str) -> list[dict[str, Any]]:
    return [request.json() for request in fake.server.on(path)]


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
async def test_recorded_answer_arrives_whole(fake: HiAgentFake, http: UpstreamHTTP) -> None:
    events = await collect(hiagent(http, fake), turn())

    assert answer_text(events) == EXPECTED
    assert EXPECTED.startswith("OpenStack 是一个开源的云计算管理平台项目")
    assert events[-1] == Done()
    assert Usage(prompt_tokens=686, completion_tokens=126, total_tokens=812,
                 latency_s=8.636) in events
    assert refs(events) == [
        {"AppConversationID": APP_CONVERSATION_ID},
        {"AppConversationID": APP_CONVERSATION_ID, "conversation_id": FIXTURE_CONVERSATION_ID},
    ]
    first_text = next(i for i, e in enumerate(events) if answer_text([e]))
    assert max(i for i, e in enumerate(events) if isinstance(e, ConversationRef)) < first_text


async def test_first_turn_creates_the_conversation_with_csrf_and_visitor_key(
    fake: HiAgentFake, http: UpstreamHTTP
) -> None:
    kv = MemoryKV()
    await collect(hiagent(http, fake, kv=kv, BRIDGE_HIAGENT_INPUTS='{"lang":"zh"}'),
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
    assert query.headers["timeout"] == "300000"  # as the web client sends it (the seed)


async def test_second_turn_reuses_both_conversation_ids(fake: HiAgentFake,
                                                        http: UpstreamHTTP) -> None:
    upstream = hiagent(http, fake)
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
                                                         http: UpstreamHTTP) -> None:
    kv = MemoryKV()
    await collect(hiagent(http, fake, kv=kv), turn())
    await collect(hiagent(http, fake, kv=kv), turn())  # another process of the bot

    keys = {request.headers["app-visitor-key"] for request in fake.server.on(CHAT_QUERY)}
    assert keys == {kv.values["visitor_key"]}


async def test_visitor_key_from_settings_wins(fake: HiAgentFake, http: UpstreamHTTP) -> None:
    kv = MemoryKV()
    upstream = hiagent(http, fake, kv=kv, BRIDGE_HIAGENT_VISITOR_KEY="visitor-from-env")
    await collect(upstream, turn())

    assert fake.server.on(CHAT_QUERY)[0].headers["app-visitor-key"] == "visitor-from-env"
    assert kv.values == {}


async def test_refused_csrf_token_is_fetched_again_once(fake: HiAgentFake,
                                                        http: UpstreamHTTP) -> None:
    upstream = hiagent(http, fake)
    first = await collect(upstream, turn())
    fake.expire_csrf()
    second = await collect(upstream, turn(conversation=refs(first)[-1]))

    assert answer_text(second) == EXPECTED
    assert len(fake.server.on(PAGE_PATH)) == 2
    tokens = [request.headers["x-csrf-token"] for request in fake.server.on(CHAT_QUERY)]
    assert tokens == ["csrf/token+1==", "csrf/token+1==", "csrf/token+2=="]


async def test_csrf_refused_twice_is_an_auth_error(fake: HiAgentFake, http: UpstreamHTTP) -> None:
    fake.refuse_all = True
    with pytest.raises(UpstreamAuthError):
        await collect(hiagent(http, fake), turn())

    assert len(fake.server.on(PAGE_PATH)) == 2
    assert len(fake.server.on(CREATE)) == 2


async def test_reset_deletes_the_app_conversation(fake: HiAgentFake, http: UpstreamHTTP) -> None:
    upstream = hiagent(http, fake)
    await upstream.reset({}, SESSION_ID)  # nothing stored: nothing to delete
    await upstream.reset({"AppConversationID": "app-1", "conversation_id": "c-1"}, SESSION_ID)

    assert bodies(fake, DELETE) == [
        {"AppKey": APP_KEY, "AppConversationID": "app-1"}
    ]


async def test_error_event_ends_the_turn(fake: HiAgentFake, http: UpstreamHTTP) -> None:
    fake.stream = nested_stream([
        message("Open"), message("Stack"),
        {"event": "error", "code": 500, "message": "model overloaded",
         "conversation_id": FIXTURE_CONVERSATION_ID},
        message("never shown"),
    ])
    events = await collect(hiagent(http, fake), turn())

    assert answer_text(events) == "OpenStack"
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is ErrorKind.RATE_LIMITED  # the service is busy: no rejection
    assert "model overloaded" in events[-1].message


async def test_reasoning_and_suggestions_reach_the_core(fake: HiAgentFake,
                                                        http: UpstreamHTTP) -> None:
    # A reasoning model's thinking before the answer, the app's follow-up questions after it,
    # each in the proxy's nested framing, as the web page receives them.
    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"event": kind, "task_id": "t1", "id": "t1",
                "conversation_id": FIXTURE_CONVERSATION_ID, **fields}

    fake.stream = nested_stream([
        event("message_start"), event("think_message_output_start"),
        event("think_message", answer="用户问 OVS，"), event("think_message", answer="先给定义。"),
        event("think_message_output_end"), event("message_output_start"),
        message("Open"), message("vSwitch"), event("message_output_end"),
        event("message_cost", input_tokens=10, output_tokens=5, latency=1.5),
        event("suggestion", suggested_questions=["OVS 和 OVN 有什么区别？", "如何安装 OVS？"]),
        event("suggestion_cost", input_tokens=30, output_tokens=12, latency=0.4),
        event("message_end"),
    ])
    events = await collect(hiagent(http, fake), turn())

    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    assert reasoning == ["用户问 OVS，", "先给定义。"]
    assert answer_text(events) == "OpenvSwitch"
    assert [e for e in events if isinstance(e, Suggestions)] == [
        Suggestions(("OVS 和 OVN 有什么区别？", "如何安装 OVS？"))
    ]
    assert events[-1] == Done()


async def test_unicode_line_separators_inside_the_answer_are_text(
    fake: HiAgentFake, http: UpstreamHTTP
) -> None:
    # The proxy writes its JSON as Python does (`ensure_ascii=False`): U+2028/U+2029, NEL and
    # the C1/FS-style separators go raw. They end no SSE line, so they are answer text.
    pieces = ["第一行\u2028第二行", "段落\u2029下一段", "a\x85b\x1cc\x1dd\x1ee\x0bf\x0cg"]
    fake.stream = nested_stream([*map(message, pieces), {
        "event": "message_end", "conversation_id": FIXTURE_CONVERSATION_ID}])
    events = await collect(hiagent(http, fake), turn())

    assert answer_text(events) == "".join(pieces)
    assert events[-1] == Done()


@pytest.mark.parametrize("then_end", [False, True], ids=["stream-closes", "then-message-end"])
async def test_message_failed_ends_the_turn_as_an_error_of_its_kind(
    then_end: bool, fake: HiAgentFake, http: UpstreamHTTP
) -> None:
    # HiAgent's own failure event (its SDK's `MessageFailedChatEvent`: `error` text), which
    # the proxy streams instead of the rest of the answer.
    failed = {"event": "message_failed", "task_id": "t1", "id": "t1",
              "conversation_id": FIXTURE_CONVERSATION_ID, "error": "LLM request timeout"}
    end = {"event": "message_end", "task_id": "t1", "id": "t1",
           "conversation_id": FIXTURE_CONVERSATION_ID}
    fake.stream = nested_stream([message("Open"), failed, *([end] if then_end else [])])
    events = await collect(hiagent(http, fake), turn())

    assert answer_text(events) == "Open"
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is ErrorKind.TIMEOUT  # (the model's own: "try again later")
    assert "LLM request timeout" in events[-1].message
