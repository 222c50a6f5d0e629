"""The pure ChatGPT web parser: cumulative parts to deltas, replacements, refs, frames."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from adapters.upstream.chatgpt_web import ChatGPTParser, frame_payloads
from bridge.events import (
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    TextDelta,
    TextReplace,
    UpstreamError,
)
from bridge.http import UpstreamProtocolError
from bridge.sse import SSEDecoder, SSEEvent

CID = "4744527e-da3d-4ae8-ba71-c16904fb36fe"


def message(message_id: str, text: str, *, role: str = "assistant", status: str = "in_progress",
            end_turn: bool | None = None, recipient: str = "all",
            content_type: str = "text") -> str:
    return json.dumps({
        "message": {
            "id": message_id, "author": {"role": role},
            "content": {"content_type": content_type, "parts": [text]},
            "status": status, "end_turn": end_turn, "recipient": recipient,
        },
        "conversation_id": CID, "error": None,
    }, ensure_ascii=False)


def feed(parser: ChatGPTParser, payload: str) -> list[Event]:
    return parser.feed(SSEEvent(payload))


def feed_all(parser: ChatGPTParser, payloads: list[str]) -> list[Event]:
    return [event for payload in payloads for event in feed(parser, payload)]


def text_events(events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, TextDelta | TextReplace)]


def test_cumulative_parts_become_suffix_deltas() -> None:
    parser = ChatGPTParser("user-1")
    events = feed_all(parser, [
        message("user-1", "问题", role="user", status="finished_successfully"),
        message("a1", ""),
        message("a1", "你好"),
        message("a1", "你好"),
        message("a1", "你好,世界"),
        message("a1", "你好,世界!", status="finished_successfully", end_turn=True),
    ])
    assert text_events(events) == [TextDelta("你好"), TextDelta(",世界"), TextDelta("!")]
    assert events[-1] == Done()
    assert parser.finished and parser.answer == "你好,世界!"


def test_refs_follow_the_assistant_message() -> None:
    parser = ChatGPTParser("user-1")
    events = feed_all(parser, [message("user-1", "q", role="user"), message("a1", "x")])
    refs = [e.ref for e in events if isinstance(e, ConversationRef)]
    assert refs == [
        {"conversation_id": CID, "parent_message_id": "user-1"},
        {"conversation_id": CID, "parent_message_id": "a1"},
    ]
    assert not [e for e in feed(parser, message("a1", "xy")) if isinstance(e, ConversationRef)]


def test_known_conversation_is_announced_with_the_first_message() -> None:
    parser = ChatGPTParser("user-2", CID)
    assert feed(parser, json.dumps({"type": "title_generation", "title": "t"})) == [
        ConversationRef({"conversation_id": CID, "parent_message_id": "user-2"})
    ]


def test_text_that_does_not_extend_becomes_a_replacement() -> None:
    parser = ChatGPTParser("u")
    events = feed_all(parser, [message("a1", "Hello wor"), message("a1", "Hello, world")])
    assert text_events(events) == [TextDelta("Hello wor"), TextReplace("Hello, world")]


def test_several_assistant_messages_are_joined_with_a_blank_line() -> None:
    parser = ChatGPTParser("u")
    events = feed_all(parser, [
        message("a1", "先查一下", status="finished_successfully", end_turn=False),
        message("tool-1", "search(...)", recipient="browser", content_type="code"),
        message("t1", "结果", role="tool"),
        message("a2", ""),
        message("a2", "答案"),
        message("a2", "答案是42", status="finished_successfully", end_turn=True),
    ])
    assert text_events(events) == [TextDelta("先查一下"), TextDelta("\n\n答案"), TextDelta("是42")]
    assert parser.answer == "先查一下\n\n答案是42"


def test_done_marker_and_non_object_payloads() -> None:
    parser = ChatGPTParser("u")
    assert feed(parser, '"v1"') == []
    assert feed(parser, "[DONE]") == [Done()]
    assert parser.finished


def test_error_payload() -> None:
    parser = ChatGPTParser("u")
    events = feed(parser, json.dumps({"message": None, "conversation_id": CID,
                                     "error": {"message": "Too many requests", "code": 429}}))
    assert events[-1] == UpstreamError(ErrorKind.RATE_LIMITED,
                                       "chatgpt-web error 429: Too many requests")
    assert parser.finished


def test_bad_json() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(ChatGPTParser("u"), "{nope")


def hub(payload: str, request_id: str = "r1") -> str:
    body = base64.b64encode(f"data: {payload}\n\n".encode()).decode()
    envelope: dict[str, Any] = {"type": "http.response.body", "body": body,
                                "websocket_request_id": request_id}
    return json.dumps(envelope)


def test_frames_plain_and_in_the_hub_envelope() -> None:
    decoder = SSEDecoder()
    assert frame_payloads("[DONE]", decoder, "r1") == ["[DONE]"]
    assert frame_payloads('{"a": 1}', decoder, "r1") == ['{"a": 1}']
    assert frame_payloads(hub('{"a": 2}'), decoder, "r1") == ['{"a": 2}']
    assert frame_payloads(hub('{"a": 3}', "someone-else"), decoder, "r1") == []


def test_hub_envelope_split_inside_an_event() -> None:
    decoder = SSEDecoder()
    raw = 'data: {"x": "分"}\n\n'.encode()
    first, second = (
        json.dumps({"type": "http.response.body", "body": base64.b64encode(part).decode()})
        for part in (raw[:12], raw[12:])
    )
    assert frame_payloads(first, decoder, "r1") == []
    assert frame_payloads(second, decoder, "r1") == ['{"x": "分"}']


def raw_message(message_id: str, content: object, **fields: Any) -> str:
    return json.dumps({"message": {"id": message_id, "author": {"role": "assistant"},
                                   "content": content, "status": "in_progress", **fields},
                       "conversation_id": CID, "error": None}, ensure_ascii=False)


def test_the_turn_ends_at_a_finished_message_that_ends_the_turn_only() -> None:
    parser = ChatGPTParser("u")
    events = feed_all(parser, [
        message("a1", "先查", status="finished_successfully", end_turn=False),
        message("a2", "答", end_turn=True),
    ])
    assert Done() not in events
    assert not parser.finished
    assert feed(parser, message("a2", "答案", status="finished_successfully", end_turn=True))[-1] \
        == Done()
    assert parser.finished


def test_messages_to_a_tool_and_content_that_is_not_text_are_no_answer() -> None:
    parser = ChatGPTParser("u", CID)
    events = feed_all(parser, [
        message("a1", "search('x')", recipient="browser"),
        message("a2", "print(1)", content_type="code"),
        raw_message("a3", "plain string content"),
        raw_message("a4", {"content_type": "reasoning_recap", "content": "Thought for 2s"}),
    ])
    assert text_events(events) == []


def test_text_parts_are_joined_and_other_parts_skipped() -> None:
    parser = ChatGPTParser("u", CID)
    parts = ["Hello", {"content_type": "image_asset_pointer"}, " world"]
    events = feed_all(parser, [
        raw_message("a1", {"content_type": "multimodal_text", "parts": parts}),
        raw_message("a1", {"parts": ["Hello world!"]}),  # (no content type: text)
        raw_message("a1", {"content_type": "text"}),  # (no parts yet)
    ])
    assert text_events(events) == [TextDelta("Hello world"), TextDelta("!")]


@pytest.mark.parametrize("parts", ["Hello", {"Hello": 1}, 7, True])
def test_parts_that_are_no_list_are_a_protocol_error(parts: object) -> None:
    # iterated as they came: a string's letters, or a dict's keys, became the answer
    payload = raw_message("a1", {"content_type": "text", "parts": parts})
    with pytest.raises(UpstreamProtocolError, match="not a list"):
        feed(ChatGPTParser("u", CID), payload)


@pytest.mark.parametrize("parts", [None, "", {}, 0, []])
def test_empty_parts_of_any_type_are_no_text_yet(parts: object) -> None:
    payload = raw_message("a1", {"content_type": "text", "parts": parts})
    assert text_events(feed(ChatGPTParser("u", CID), payload)) == []


def test_an_empty_conversation_id_keeps_the_known_one() -> None:
    parser = ChatGPTParser("u")
    assert feed(parser, json.dumps({"type": "title_generation"})) == []  # nothing known yet
    feed(parser, message("a1", "x"))
    feed(parser, json.dumps({"message": None, "conversation_id": "", "error": None}))
    assert parser.conversation_id == CID


def test_a_frame_that_is_no_envelope_is_the_payload() -> None:
    assert frame_payloads('"v1"', SSEDecoder(), "r1") == ['"v1"']
    assert frame_payloads('{"type": "other"}', SSEDecoder(), "r1") == ['{"type": "other"}']


def test_a_hub_envelope_without_a_body_holds_nothing() -> None:
    decoder = SSEDecoder()
    assert frame_payloads(json.dumps({"type": "http.response.body"}), decoder, "r1") == []
    assert frame_payloads(hub('{"a": 1}'), decoder, "r1") == ['{"a": 1}']


def test_a_hub_body_that_is_not_base64_is_a_protocol_error() -> None:
    envelope = json.dumps({"type": "http.response.body", "body": "ZGF0YTog!!!"})
    with pytest.raises(UpstreamProtocolError):
        frame_payloads(envelope, SSEDecoder(), "r1")
