"""The pure Yach agent frame parser and the `image_text` query format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.upstream.yach_agent import YachAgentParser, image_text_query
from bridge.events import Done, ErrorKind, ReasoningDelta, TextDelta, UpstreamError
from bridge.http import UpstreamProtocolError
from bridge.sse import SSEEvent

MSG_ID = "78b59994d2085412f3d0bcfc39e7014c_5dbf893073f363f979fb31fd9d246f40_mfswsDTLzz"


def frame(kind: str, content: Any, *, finished: bool = False, reason: str = "",
          outer_type: str | None = None) -> SSEEvent:
    return SSEEvent(json.dumps({"msg_id": MSG_ID, "is_finished": finished, "finish_reason": reason,
                       "type": outer_type or kind,
                       "content": {"type": kind, "content": content}}, ensure_ascii=False))


def test_think_then_answer_then_finished() -> None:
    parser = YachAgentParser()
    events = [
        *parser.feed(frame("think", " ")),
        *parser.feed(frame("think", "\n")),
        *parser.feed(frame("think", "Th")),
        *parser.feed(frame("text", "你好")),
        *parser.feed(frame("markdown", "**世界**", finished=True, reason="stop")),
    ]
    assert events == [ReasoningDelta(" "), ReasoningDelta("\n"), ReasoningDelta("Th"),
                      TextDelta("你好"), TextDelta("**世界**"), Done()]
    assert parser.finished


def test_content_type_wins_over_the_outer_type() -> None:
    parser = YachAgentParser()
    assert parser.feed(frame("think", "嗯", outer_type="text")) == [ReasoningDelta("嗯")]
    outer_only = SSEEvent(json.dumps({"type": "think", "content": {"content": "想"}}))
    assert parser.feed(outer_only) == [ReasoningDelta("想")]


def test_media_frames_and_empty_content_are_not_text() -> None:
    parser = YachAgentParser()
    assert parser.feed(frame("image", "https://x/y.png")) == []
    assert parser.feed(frame("card", {"title": "t"})) == []
    assert parser.feed(frame("text", "")) == []
    assert not parser.finished


@pytest.mark.parametrize(("data", "message", "kind"), [
    (frame("error", "智能体调用失败", finished=True), "智能体调用失败", ErrorKind.REJECTED),
    (frame("text", "", finished=True, reason="error"), "finish_reason error: ",
     ErrorKind.REJECTED),
    (SSEEvent(json.dumps({"code": 40014, "msg": "access_token无效"})),
     "code 40014: access_token无效", ErrorKind.REJECTED),
    # an overload or an outage is no rejection of the question
    (frame("error", "模型服务繁忙", finished=True), "模型服务繁忙", ErrorKind.RATE_LIMITED),
    (SSEEvent(json.dumps({"code": 429, "msg": ""})), "code 429: ", ErrorKind.RATE_LIMITED),
    (SSEEvent(json.dumps({"code": 502, "msg": ""})), "code 502: ", ErrorKind.UNAVAILABLE),
    (SSEEvent(json.dumps({"code": 40014, "message": "bad token"})), "code 40014: bad token",
     ErrorKind.REJECTED),
    (frame("error", "", finished=True), "error frame", ErrorKind.REJECTED),
])
def test_errors_end_the_turn(data: SSEEvent, message: str, kind: ErrorKind) -> None:
    parser = YachAgentParser()
    assert parser.feed(data) == [UpstreamError(kind, message)]
    assert parser.finished


@pytest.mark.parametrize("data", ["{broken", "[]"])
def test_unreadable_frame(data: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        YachAgentParser().feed(SSEEvent(data))


def test_image_text_query() -> None:
    urls = ["https://a/1.png", "https://a/2.png"]
    assert image_text_query("看图", urls) == "看图 image::https://a/1.png:: image::https://a/2.png::"
    assert image_text_query("", urls[:1]) == "image::https://a/1.png::"


def test_frames_that_end_or_say_success_are_no_error() -> None:
    parser = YachAgentParser()
    assert parser.feed(frame("think", "")) == []
    assert parser.feed(SSEEvent(json.dumps({"code": 200, "msg": "success"}))) == []
    assert parser.feed(SSEEvent(json.dumps({"code": 0, "msg": ""}))) == []
    assert not parser.finished
    assert parser.feed(SSEEvent(json.dumps({"msg_id": MSG_ID, "is_finished": True}))) == [Done()]
    assert parser.finished


def test_the_end_marker_ends_the_turn() -> None:
    parser = YachAgentParser()
    assert parser.feed(SSEEvent("[DONE]")) == [Done()]
    assert parser.finished


def test_content_as_plain_text_is_typed_by_the_frame() -> None:
    parser = YachAgentParser()
    assert parser.feed(SSEEvent(json.dumps({"type": "think", "content": "嗯"}))) == [
        ReasoningDelta("嗯")
    ]
    assert parser.feed(SSEEvent(json.dumps({"type": "text", "content": "好"}))) == [TextDelta("好")]
