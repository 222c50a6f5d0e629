"""Dify's streaming events, without the network."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.upstream._common import ConversationIds
from adapters.upstream.dify import DifyParser
from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    TextDelta,
    TextReplace,
    UpstreamError,
    Usage,
)
from bridge.sse import SSEEvent

CONVERSATION = "a9de725e-f3c3-4bc6-9803-362ef76d3c49"


def sse(event: str, *, ascii_only: bool = False, **fields: Any) -> SSEEvent:
    payload = {"event": event, "conversation_id": CONVERSATION, **fields}
    return SSEEvent(data=json.dumps(payload, ensure_ascii=ascii_only))


def parser() -> DifyParser:
    return DifyParser(ConversationIds({"conversation_id": CONVERSATION}))


def test_conversation_id_is_announced_once() -> None:
    p = DifyParser()

    assert p.feed(sse("message", answer="Hi")) == [
        ConversationRef({"conversation_id": CONVERSATION}), TextDelta("Hi")
    ]
    assert p.feed(sse("message", answer=" there")) == [TextDelta(" there")]


@pytest.mark.parametrize("event", ["message", "agent_message"])
def test_answer_text(event: str) -> None:
    assert parser().feed(sse(event, answer="数字")) == [TextDelta("数字")]
    assert parser().feed(sse(event, answer="")) == []


def test_escaped_json_of_older_servers() -> None:
    message = sse("message", answer="数字有特别的含义吗？", ascii_only=True)

    assert "\\u6570" in message.data
    assert parser().feed(message) == [TextDelta("数字有特别的含义吗？")]


@pytest.mark.parametrize(("event", "fields"), [
    ("ping", {}),
    ("agent_thought", {"thought": "the answer", "answer": "the answer"}),
    ("message_file", {"type": "image", "url": "https://example.invalid/x.png"}),
    ("tts_message", {"audio": "UklGRg=="}),
    ("tts_message_end", {"audio": ""}),
    ("workflow_started", {"data": {"id": "w"}}),
    ("node_finished", {"data": {"outputs": {"answer": "the answer"}}}),
    ("workflow_finished", {"data": {"outputs": {"answer": "the answer"}}}),
    ("text_chunk", {"data": {"text": "the answer"}}),
])
def test_other_events_are_not_answer_text(event: str, fields: dict[str, Any]) -> None:
    assert parser().feed(sse(event, **fields)) == []


def test_ping_without_data() -> None:
    assert parser().feed(SSEEvent(data="", event="ping")) == []


def test_event_name_from_the_sse_field_when_the_payload_has_none() -> None:
    message = SSEEvent(data=json.dumps({"answer": "x"}), event="message")

    assert parser().feed(message) == [TextDelta("x")]


def test_message_replace() -> None:
    assert parser().feed(sse("message_replace", answer="replaced")) == [TextReplace("replaced")]


def test_message_end_carries_usage() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 44, "total_tokens": 45, "latency": 2.95}

    assert parser().feed(sse("message_end", metadata={"usage": usage})) == [
        Usage(prompt_tokens=1, completion_tokens=44, total_tokens=45, latency_s=2.95), Done()
    ]
    assert parser().feed(sse("message_end")) == [Done()]


def test_error_event() -> None:
    [error] = parser().feed(sse("error", status=400, code="invalid_param", message="bad"))

    assert error == UpstreamError(ErrorKind.REJECTED, "dify error invalid_param: bad")


def test_the_generation_to_stop_is_the_first_task_named_until_the_answer_ends() -> None:
    """An answer left unfinished is stopped by its `task_id`: the first one the stream names,
    and only until `message_end` or `error` has ended it (then nothing runs to stop)."""
    p = parser()
    assert (p.task_id, p.finished) == ("", False)

    p.feed(sse("ping"))
    p.feed(sse("message", answer="Hi", task_id="task-1"))
    p.feed(sse("message", answer="!", task_id="task-2"))
    assert (p.task_id, p.finished) == ("task-1", False)

    p.feed(sse("message_end", task_id="task-1"))
    p.feed(sse("tts_message_end", task_id="task-1"))
    assert (p.task_id, p.finished) == ("task-1", True)

    failed = parser()
    failed.feed(sse("error", task_id="task-3", status=500, message="boom"))
    assert (failed.task_id, failed.finished) == ("task-3", True)
