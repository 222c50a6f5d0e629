"""Coze's `/v3/chat` stream events, without the network."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.upstream._common import ConversationIds
from adapters.upstream.coze import CozeParser, api_error
from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    UpstreamError,
    Usage,
)
from bridge.http import (
    UpstreamAuthError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from bridge.sse import SSEEvent

CONVERSATION = "7366503630755315712"


def sse(event: str, data: dict[str, Any]) -> SSEEvent:
    return SSEEvent(data=json.dumps(data, ensure_ascii=False), event=event)


def delta(content: str, message_id: str = "m1", kind: str = "answer", **extra: Any) -> SSEEvent:
    return sse("conversation.message.delta", {"id": message_id, "conversation_id": CONVERSATION,
                                              "type": kind, "content": content,
                                              "content_type": "text", **extra})


def completed(content: str, kind: str, message_id: str = "m1") -> SSEEvent:
    return sse("conversation.message.completed", {"id": message_id, "type": kind,
                                                  "content": content, "content_type": "text",
                                                  "conversation_id": CONVERSATION})


DONE = SSEEvent(data='"[DONE]"', event="done")


def parser() -> CozeParser:
    return CozeParser(ConversationIds({"conversation_id": CONVERSATION}))


def test_conversation_id_from_chat_created() -> None:
    created = sse("conversation.chat.created", {"id": "chat", "conversation_id": CONVERSATION})

    assert CozeParser().feed(created) == [ConversationRef({"conversation_id": CONVERSATION})]
    assert parser().feed(created) == []  # already known


def test_answer_messages_are_joined_with_a_blank_line() -> None:
    p = parser()
    events = [e for m in (delta("A"), delta("a"), delta("B", "m2"), delta("C", "m3"))
              for e in p.feed(m)]

    assert events == [TextDelta("A"), TextDelta("a"), TextDelta("\n\n"), TextDelta("B"),
                      TextDelta("\n\n"), TextDelta("C")]


@pytest.mark.parametrize("kind", ["verbose", "function_call", "tool_response", "tool_output",
                                  "follow_up", "question"])
def test_only_answer_deltas_are_text(kind: str) -> None:
    assert parser().feed(delta("not text", kind=kind)) == []


def test_non_text_answer_content_is_skipped() -> None:
    card = delta('{"card": 1}', content_type="card")

    assert parser().feed(card) == []


def test_completed_answer_repeats_and_adds_nothing() -> None:
    p = parser()
    p.feed(delta("full answer"))

    assert p.feed(completed("full answer", "answer")) == []
    assert p.feed(completed('{"msg_type":"generate_answer_finish"}', "verbose")) == []


def test_reasoning_content() -> None:
    assert parser().feed(delta("", reasoning_content="thinking")) == [ReasoningDelta("thinking")]


def test_follow_ups_become_suggestions_before_done() -> None:
    p = parser()
    p.feed(completed("What next?", "follow_up", "f1"))
    p.feed(completed("  And then?  ", "follow_up", "f2"))

    assert p.feed(DONE) == [Suggestions(("What next?", "And then?")), Done()]
    assert parser().feed(DONE) == [Done()]


def test_usage_from_chat_completed() -> None:
    chat = {"id": "chat", "conversation_id": CONVERSATION, "status": "completed",
            "usage": {"token_count": 633, "output_count": 19, "input_count": 614}}

    assert parser().feed(sse("conversation.chat.completed", chat)) == [
        Usage(prompt_tokens=614, completion_tokens=19, total_tokens=633)
    ]


@pytest.mark.parametrize(("event", "data", "detail"), [
    ("conversation.chat.failed",
     {"conversation_id": CONVERSATION, "last_error": {"code": 4011, "msg": "quota"}},
     "coze error 4011: quota"),
    ("error", {"code": 4000, "msg": "Request parameter error"},
     "coze error 4000: Request parameter error"),
    ("conversation.chat.requires_action", {"conversation_id": CONVERSATION}, "requires_action"),
])
def test_errors(event: str, data: dict[str, Any], detail: str) -> None:
    [error] = parser().feed(sse(event, data))

    assert isinstance(error, UpstreamError)
    assert error.kind is ErrorKind.REJECTED
    assert detail in error.message


def test_unknown_events_are_not_parsed() -> None:
    assert parser().feed(SSEEvent(data="raw pcm?", event="conversation.audio.delta")) == []


@pytest.mark.parametrize(("code", "error"), [
    (4100, UpstreamAuthError), (4101, UpstreamAuthError), (4013, UpstreamRateLimited),
    (4200, UpstreamRejected), (0, UpstreamProtocolError),
])
def test_api_error(code: int, error: type[Exception]) -> None:
    assert type(api_error({"code": code, "msg": "m"})) is error


def test_empty_reasoning_beside_the_answer_is_no_reasoning() -> None:
    assert parser().feed(delta("Hi", reasoning_content="")) == [TextDelta("Hi")]


def test_only_follow_ups_become_suggestions() -> None:
    """A completed answer (or verbose) message repeats the answer: it is no suggestion, and
    a blank follow-up is none either."""
    p = parser()
    for message in (delta("full answer"), completed("full answer", "answer"),
                    completed('{"msg_type":"generate_answer_finish"}', "verbose"),
                    completed("  ", "follow_up", "f1"), completed("Next?", "follow_up", "f2")):
        p.feed(message)

    assert p.feed(DONE) == [Suggestions(("Next?",)), Done()]


def test_chat_completed_without_usage_is_nothing() -> None:
    chat = {"id": "chat", "conversation_id": CONVERSATION, "status": "completed"}

    assert parser().feed(sse("conversation.chat.completed", chat)) == []


@pytest.mark.parametrize(("msg", "kind"), [
    ("model is overloaded", ErrorKind.RATE_LIMITED), ("oops", ErrorKind.UNAVAILABLE),
])
def test_an_error_is_of_the_kind_its_words_say_before_its_code(msg: str, kind: ErrorKind) -> None:
    """Coze's 5000 is an internal error, but one saying the model is overloaded is an
    overload (a rate limit, SPEC §8); a 5000 that says nothing more is unavailable."""
    [error] = parser().feed(sse("error", {"code": 5000, "msg": msg}))

    assert isinstance(error, UpstreamError)
    assert error.kind is kind


def test_an_answer_delta_without_a_content_type_is_text() -> None:
    message = {"id": "m1", "conversation_id": CONVERSATION, "type": "answer", "content": "Hi"}

    assert parser().feed(sse("conversation.message.delta", message)) == [TextDelta("Hi")]
