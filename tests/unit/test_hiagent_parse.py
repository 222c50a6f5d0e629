"""HiAgent's nested `data:data: {json}` framing and inner events, without the network."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from adapters.upstream._common import ConversationIds
from adapters.upstream.hiagent import HiAgentParser, _check_base_resp, inner_payloads
from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamProtocolError, UpstreamRejected
from bridge.sse import SSEDecoder, SSEEvent
from tests.fakes.base import rechunk
from tests.fakes.hiagent import FIXTURE, recorded_answer


def outer(inner: dict[str, Any], *, trailing_blank_lines: bool = True) -> SSEEvent:
    data = "data: " + json.dumps(inner, ensure_ascii=False)
    return SSEEvent(data=data + ("\n\n" if trailing_blank_lines else ""), event="text")


@pytest.mark.parametrize(("data", "payloads"), [
    ('data: {"a": 1}\n\n', ['{"a": 1}']),  # the usual: inner line plus two empty data lines
    ('data: {"a": 1}', ['{"a": 1}']),  # message_cost in the recording has no empty lines
    ('data:{"a": 1}\n', ['{"a": 1}']),
    ('{"a": 1}', ['{"a": 1}']),  # not double-wrapped
    ('data: {"a": 1}\n\ndata: {"b": 2}\n\n', ['{"a": 1}', '{"b": 2}']),
    ("\n\n", []),
])
def test_inner_payloads(data: str, payloads: list[str]) -> None:
    assert inner_payloads(data) == payloads


def test_events_of_one_answer() -> None:
    parser = HiAgentParser(ConversationIds({"AppConversationID": "app-1"}))
    base = {"task_id": "t", "id": "t", "conversation_id": "c-1"}

    assert parser.feed(outer({"event": "message_start", **base})) == [
        ConversationRef({"AppConversationID": "app-1", "conversation_id": "c-1"})
    ]
    assert parser.feed(outer({"event": "message_output_start", **base})) == []
    assert parser.feed(outer({"event": "message", "answer": "Open", **base})) == [TextDelta("Open")]
    assert parser.feed(outer({"event": "message", "answer": "", **base})) == []
    assert parser.feed(outer({"event": "agent_thought", "answer": "no", **base})) == []
    cost = {"event": "message_cost", "input_tokens": 686, "output_tokens": 126, "latency": 8.636}
    assert parser.feed(outer({**cost, **base}, trailing_blank_lines=False)) == [
        Usage(prompt_tokens=686, completion_tokens=126, total_tokens=812, latency_s=8.636)
    ]
    assert parser.feed(outer({"event": "message_end", **base})) == [Done()]


def test_reasoning_and_suggestions() -> None:
    # HiAgent's `think_message` (a reasoning model's thinking, its own start/end events around
    # it) and `suggestion` (the app's follow-up questions, with their own cost event).
    parser = HiAgentParser()
    base = {"task_id": "t", "id": "t", "conversation_id": "c-1"}
    parser.feed(outer({"event": "message_start", **base}))

    assert parser.feed(outer({"event": "think_message_output_start", **base})) == []
    assert parser.feed(outer({"event": "think_message", "answer": "先想", **base})) == [
        ReasoningDelta("先想")
    ]
    assert parser.feed(outer({"event": "think_message", "answer": "", **base})) == []
    assert parser.feed(outer({"event": "think_message_output_end", **base})) == []
    questions = ["OVN 是什么？", " ", "OVS 怎么装？", 7]
    suggestion = {"event": "suggestion", "suggested_questions": questions, **base}
    assert parser.feed(outer(suggestion)) == [Suggestions(("OVN 是什么？", "OVS 怎么装？"))]
    assert parser.feed(outer({"event": "suggestion", "suggested_questions": [], **base})) == []
    cost = {"event": "suggestion_cost", "input_tokens": 50, "output_tokens": 20, "latency": 0.5}
    assert parser.feed(outer({**cost, **base})) == []


def test_error_event() -> None:
    [error] = HiAgentParser().feed(outer({"event": "error", "code": 1001, "message": "bad"}))

    assert error == UpstreamError(kind=ErrorKind.REJECTED, message="hiagent error 1001: bad")


def test_unreadable_inner_payload_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        HiAgentParser().feed(SSEEvent(data="data: {not json\n\n", event="text"))


@pytest.mark.parametrize("seed", range(20))
def test_recording_in_any_chunking_gives_the_whole_answer(seed: int) -> None:
    decoder, parser, events = SSEDecoder(), HiAgentParser(), list[Event]()
    for chunk in rechunk(FIXTURE.read_bytes(), random.Random(seed), max_size=97):
        for message in decoder.feed(chunk):
            events.extend(parser.feed(message))
    for message in decoder.close():
        events.extend(parser.feed(message))

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == recorded_answer()
    assert events[-1] == Done()
    assert events[0] == ConversationRef({"conversation_id": "01JN17DFETEKT0B0HJWR9V2GZ2"})


@pytest.mark.parametrize("questions", [None, "OVN 是什么？", {"q": "OVN"}])
def test_suggestions_that_are_not_a_list_are_none(questions: object) -> None:
    suggestion = {"event": "suggestion", "suggested_questions": questions, "conversation_id": "c"}

    assert HiAgentParser(ConversationIds({"conversation_id": "c"})).feed(outer(suggestion)) == []


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field", ["StatusCode", "StatusMessage"])
@pytest.mark.parametrize("value", ["x" * (1 << 20), _nested(100_000)], ids=["huge", "deep"])
def test_a_refusal_in_base_resp_is_told_in_a_few_words_whatever_it_holds(
    field: str, value: object
) -> None:
    # the code went into the message whole, and `str` of a list nested deeper than Python's
    # stack (orjson reads 1024 levels) raised RecursionError where no `relay` turns it into
    # a protocol error
    base_resp = {"StatusCode": 1, "StatusMessage": "denied", field: value}
    with pytest.raises(UpstreamRejected) as refused:
        _check_base_resp({"BaseResp": base_resp}, "create_conversation")
    assert len(refused.value.message) < 500
