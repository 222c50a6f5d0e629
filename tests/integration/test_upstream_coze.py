"""The Coze adapter against a fake `/v3/chat` streaming what the notes and the docs show.

The failures every adapter meets are in test_upstream_failures.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.events import ConversationRef, Done, ErrorKind, Suggestions, UpstreamError, Usage
from bridge.http import UpstreamAuthError, UpstreamHTTP, UpstreamRateLimited, UpstreamRejected
from bridge.interfaces import Sender, Turn, Upstream
from tests.fakes.coze import (
    ANSWER,
    BOT_ID,
    CONVERSATION_ID,
    FOLLOW_UPS,
    TOKEN,
    CozeFake,
    chat,
    chat_frames,
    error_frames,
    failed_frames,
    frame,
    gone_frames,
    missing,
)
from tests.fakes.scripted import Reply, answer_text, collect, connect, json_reply, refs

SESSION_ID = "yach:g:group-1:u:user-1"


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[CozeFake]:
    async with CozeFake(seed=getattr(request, "param", 0)) as server:
        yield server


class _NoKV:
    async def get(self, name: str) -> str | None:
        raise AssertionError("coze keeps nothing")

    async def set(self, name: str, value: str) -> None:
        raise AssertionError("coze keeps nothing")


def coze(http: UpstreamHTTP, fake: CozeFake, **env: str) -> Upstream:
    return connect(http, fake.env(**env), _NoKV())


def turn(text: str = "你知道薛之谦吗?", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("user-1"), chat_session_id=SESSION_ID,
                conversation=conversation)


def chats(fake: CozeFake) -> list[Any]:
    return fake.server.on("/v3/chat")


@pytest.mark.parametrize("fake", [1, 2, 3], indirect=True)
async def test_answer_suggestions_usage_and_conversation(fake: CozeFake,
                                                         http: UpstreamHTTP) -> None:
    events = await collect(coze(http, fake), turn())

    assert answer_text(events) == ANSWER  # two answer messages, a blank line between them
    assert [e for e in events if isinstance(e, ConversationRef)] == [
        ConversationRef({"conversation_id": CONVERSATION_ID})
    ]
    assert isinstance(events[0], ConversationRef)  # saved before any text
    assert Usage(prompt_tokens=2618, completion_tokens=44, total_tokens=2662) in events
    assert events[-2:] == [Suggestions(FOLLOW_UPS), Done()]


async def test_first_turn_request(fake: CozeFake, http: UpstreamHTTP) -> None:
    await collect(coze(http, fake), turn())

    request = chats(fake)[0]
    assert request.query == {}
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json() == {
        "bot_id": BOT_ID, "user_id": SESSION_ID, "stream": True, "auto_save_history": True,
        "additional_messages": [{"role": "user", "content": "你知道薛之谦吗?",
                                 "content_type": "text"}],
    }


async def test_second_turn_continues_by_query_parameter(fake: CozeFake, http: UpstreamHTTP) -> None:
    upstream = coze(http, fake)
    first = await collect(upstream, turn())
    ref = next(dict(e.ref) for e in first if isinstance(e, ConversationRef))
    second = await collect(upstream, turn("他的代表作有哪些?", conversation=ref))

    assert answer_text(second) == ANSWER
    assert not any(isinstance(e, ConversationRef) for e in second)  # nothing new to save
    later = chats(fake)[1]
    assert later.query == {"conversation_id": CONVERSATION_ID}
    assert "conversation_id" not in later.json()


async def test_reset_deletes_the_conversation(fake: CozeFake, http: UpstreamHTTP) -> None:
    upstream = coze(http, fake)
    await upstream.reset({}, SESSION_ID)
    await upstream.reset({"conversation_id": CONVERSATION_ID}, SESSION_ID)

    assert fake.deleted == [CONVERSATION_ID]


async def test_bad_token_is_an_auth_error(fake: CozeFake, http: UpstreamHTTP) -> None:
    with pytest.raises(UpstreamAuthError):
        await collect(coze(http, fake, BRIDGE_COZE_TOKEN="pat_wrong"), turn())

    assert len(chats(fake)) == 1  # never retried


@pytest.mark.parametrize(("code", "error"), [
    (4100, UpstreamAuthError), (4013, UpstreamRateLimited), (4000, UpstreamRejected),
])
async def test_json_error_instead_of_a_stream(fake: CozeFake, http: UpstreamHTTP,
                                              code: int, error: type[Exception]) -> None:
    fake.script.then(*[json_reply({"code": code, "msg": "something is wrong"})] * 3)
    with pytest.raises(error, match=f"coze error {code}"):
        await collect(coze(http, fake), turn())

    # A rate limit is retried as a 429 is (the fixture's two retries); the others are not.
    assert len(chats(fake)) == (3 if error is UpstreamRateLimited else 1)


@pytest.mark.parametrize(("frames", "text", "detail", "kind"), [
    (error_frames(), "当然知道，", "Request parameter error", ErrorKind.REJECTED),
    (failed_frames(), "当然", "model is overloaded", ErrorKind.RATE_LIMITED),
])
async def test_error_events_end_the_turn(fake: CozeFake, http: UpstreamHTTP, frames: list[str],
                                         text: str, detail: str, kind: ErrorKind) -> None:
    fake.stream = "".join(frames).encode()
    events = await collect(coze(http, fake), turn())

    assert answer_text(events) == text
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is kind
    assert detail in events[-1].message
    assert Done() not in events


STALE = "7366503630755300000"
FRESH = "7366503630755399999"


def gone_reply(fake: CozeFake, how: str) -> Reply:
    """Coze refusing the stored conversation: in place of the stream, or as its failed chat."""
    if how == "json":
        return json_reply(missing(f"conversation_id={STALE}"))
    return fake.sse("".join(gone_frames(STALE)).encode())


@pytest.mark.parametrize("how", ["json", "chat-failed"])
async def test_a_conversation_coze_no_longer_has_is_started_afresh(
    fake: CozeFake, http: UpstreamHTTP, how: str
) -> None:
    # Deleted (a `/reset` elsewhere, the console) or not this bot's: the question is asked
    # again without it, and the conversation Coze starts is the one kept from now on.
    fake.script.then(gone_reply(fake, how), fake.sse("".join(chat_frames(FRESH)).encode()))

    events = await collect(coze(http, fake), turn(conversation={"conversation_id": STALE}))

    assert [request.query.get("conversation_id") for request in chats(fake)] == [STALE, None]
    assert answer_text(events) == ANSWER
    assert refs(events) == [{"conversation_id": FRESH}]
    assert not any(isinstance(e, UpstreamError) for e in events)
    assert events[-1] == Done()


@pytest.mark.parametrize(("conversation", "body"), [
    (None, missing(f"conversation_id={STALE}")),  # a first turn: nothing stale to drop
    ({"conversation_id": STALE}, missing(f"bot_id={BOT_ID}")),  # the bot is gone, not the chat
])
async def test_other_missing_resources_are_reported_and_not_asked_again(
    fake: CozeFake, http: UpstreamHTTP, conversation: dict[str, str] | None,
    body: dict[str, Any],
) -> None:
    fake.script.then(json_reply(body))

    with pytest.raises(UpstreamRejected, match="coze error 4200"):
        await collect(coze(http, fake), turn(conversation=conversation))
    assert len(chats(fake)) == 1


async def test_a_refusal_after_the_answer_began_is_not_asked_again(
    fake: CozeFake, http: UpstreamHTTP
) -> None:
    last_error = missing(f"conversation_id={STALE}")
    fake.stream = "".join([
        *chat_frames(STALE)[:4],
        frame("conversation.chat.failed", chat("failed", STALE, last_error=last_error)),
    ]).encode()

    events = await collect(coze(http, fake), turn(conversation={"conversation_id": STALE}))

    assert answer_text(events) == "当然"
    assert isinstance(events[-1], UpstreamError)
    assert len(chats(fake)) == 1


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

