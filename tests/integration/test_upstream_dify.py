"""The Dify adapter against a fake `/v1/chat-messages` streaming chat, agent and chatflow apps.

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
    TextDelta,
    TextReplace,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamAuthError, UpstreamHTTP, UpstreamRejected
from bridge.interfaces import Sender, Turn
from tests.fakes.dify import (
    ANSWER,
    API_KEY,
    CONVERSATION_ID,
    PARTS,
    PATH,
    STOP,
    DifyFake,
    agent,
    chatflow,
    failing,
    render,
    replaced,
)
from tests.fakes.scripted import answer_text, collect, connect, status
from tests.harness import stop_after_first

SESSION_ID = "yach:g:group-1:u:user-1"
USAGE = Usage(prompt_tokens=1, completion_tokens=44, total_tokens=45,
              latency_s=2.9540078879799694)


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[DifyFake]:
    async with DifyFake(seed=getattr(request, "param", 0)) as server:
        yield server


def turn(text: str = "333", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def bodies(fake: DifyFake) -> list[dict[str, Any]]:
    return [request.json() for request in fake.server.on(PATH)]


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("app", [chatflow, agent])
@pytest.mark.parametrize("ascii_only", [False, True], ids=["utf8", "escaped"])
async def test_answer_usage_and_conversation(fake: DifyFake, http: UpstreamHTTP,
                                             app: Any, ascii_only: bool) -> None:
    fake.stream = render(app(), ascii_only=ascii_only)
    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == ANSWER  # thoughts, tts, workflow outputs add nothing
    assert [e for e in events if isinstance(e, ConversationRef)] == [
        ConversationRef({"conversation_id": CONVERSATION_ID})
    ]
    assert isinstance(events[0], ConversationRef)  # saved before any text
    assert events[-2:] == [USAGE, Done()]


async def test_first_turn_request(fake: DifyFake, http: UpstreamHTTP) -> None:
    await collect(connect(http, fake.env()), turn())

    request = fake.server.on(PATH)[0]
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.json() == {"inputs": {"grade": "7"}, "query": "333",
                              "response_mode": "streaming", "conversation_id": "",
                              "user": SESSION_ID}


async def test_second_turn_sends_the_conversation_id(fake: DifyFake, http: UpstreamHTTP) -> None:
    upstream = connect(http, fake.env())
    first = await collect(upstream, turn())
    ref = next(dict(e.ref) for e in first if isinstance(e, ConversationRef))
    second = await collect(upstream, turn("444", conversation=ref))

    assert answer_text(second) == ANSWER
    assert not any(isinstance(e, ConversationRef) for e in second)
    assert bodies(fake)[1]["conversation_id"] == CONVERSATION_ID


@pytest.mark.parametrize("replacement", ["内容不合规，已被替换。", PARTS[0] + PARTS[1]])
async def test_message_replace_replaces_the_answer(fake: DifyFake,
                                                   http: UpstreamHTTP,
                                                   replacement: str) -> None:
    fake.stream = render(replaced(replacement))
    events = await collect(connect(http, fake.env()), turn())

    assert TextReplace(replacement) in events
    assert answer_text(events) == replacement
    assert events[-1] == Done()


async def test_reset_deletes_the_conversation_for_the_session(fake: DifyFake,
                                                               http: UpstreamHTTP) -> None:
    upstream = connect(http, fake.env())
    await upstream.reset({}, SESSION_ID)  # no conversation yet: nothing to delete
    await upstream.reset({"conversation_id": CONVERSATION_ID}, SESSION_ID)

    assert fake.deleted == [(CONVERSATION_ID, SESSION_ID)]  # the user the turns were sent as


async def test_a_refused_reset_raises(fake: DifyFake, http: UpstreamHTTP) -> None:
    upstream = connect(http, fake.env(BRIDGE_DIFY_API_KEY="app-wrong"))
    with pytest.raises(UpstreamAuthError):
        await upstream.reset({"conversation_id": CONVERSATION_ID}, SESSION_ID)

    assert fake.deleted == []


async def test_bad_key_is_an_auth_error(fake: DifyFake, http: UpstreamHTTP) -> None:
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env(BRIDGE_DIFY_API_KEY="app-wrong")), turn())

    assert len(fake.server.on(PATH)) == 1


STALE = "0b7c1c2e-stale-conversation"
NOT_EXISTS = {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
INVALID = {"code": "invalid_param", "message": "query is required", "status": 400}


async def test_a_conversation_dify_no_longer_has_is_started_afresh(
    fake: DifyFake, http: UpstreamHTTP
) -> None:
    # Deleted in the console, or the API key now names another app: Dify refuses the kept
    # conversation before any answer, so the question is asked again in a new conversation
    # (else every later turn of the session fails the same way, "try rephrasing it").
    fake.script.then(status(404, NOT_EXISTS))

    events = await collect(connect(http, fake.env()), turn(conversation={"conversation_id": STALE}))

    assert [body["conversation_id"] for body in bodies(fake)] == [STALE, ""]
    assert answer_text(events) == ANSWER
    assert [e.ref for e in events if isinstance(e, ConversationRef)] == [
        {"conversation_id": CONVERSATION_ID}
    ]
    assert events[-1] == Done()


@pytest.mark.parametrize(("conversation", "code", "body"), [
    (None, 404, NOT_EXISTS),  # a first turn: nothing stale to drop
    ({"conversation_id": STALE}, 400, INVALID),
    ({"conversation_id": STALE}, 404, {"code": "not_found", "message": "App not found"}),
])
async def test_other_refusals_are_reported_and_not_asked_again(
    fake: DifyFake, http: UpstreamHTTP, conversation: dict[str, str] | None, code: int,
    body: dict[str, Any],
) -> None:
    fake.script.then(status(code, body))

    with pytest.raises(UpstreamRejected, match=str(body["message"])):
        await collect(connect(http, fake.env()), turn(conversation=conversation))
    assert len(fake.server.on(PATH)) == 1


async def test_error_event_ends_the_turn(fake: DifyFake, http: UpstreamHTTP) -> None:
    fake.stream = render(failing())
    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == PARTS[0]
    assert isinstance(events[-1], UpstreamError)
    # a 400 `completion_request_error`, but the model behind it is down: no rejection
    assert events[-1].kind is ErrorKind.UNAVAILABLE
    assert "completion_request_error" in events[-1].message
    assert Done() not in events


async def test_stop_stops_the_generation_upstream(fake: DifyFake, http: UpstreamHTTP) -> None:
    # Dify goes on generating (and billing) when the request is closed: `/stop` tells it.
    fake.script.then(fake.answer(stall_after=10**6))
    events = connect(http, fake.env()).stream(turn())
    await stop_after_first(events, lambda event: isinstance(event, TextDelta))

    (request,) = await fake.server.wait_for_requests(1, STOP, timeout=5)
    assert request.json() == {"user": SESSION_ID}
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


async def test_an_answer_read_to_its_end_is_not_stopped(fake: DifyFake,
                                                         http: UpstreamHTTP) -> None:
    await collect(connect(http, fake.env()), turn())  # ends at message_end
    fake.stream = render(failing())  # ends at an error event
    await collect(connect(http, fake.env()), turn())

    assert not fake.server.on(STOP)
