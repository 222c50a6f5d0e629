"""The stream readers under property tests: the SSE decoder on arbitrary bytes in arbitrary
reads, and every upstream's parser (through `relay`, as the adapters run them) on its recorded
or scripted answer with any part of any message replaced by any JSON, or by text that is not.

What a reader may do with input it cannot read is documented: the decoder raises
`SSELineTooLong` (a line over its limit) and nothing else; a parser raises
`UpstreamProtocolError`, and `relay` makes JSON of a shape the parser does not read one too
(its `_UNEXPECTED_SHAPE`); so a turn sees typed events, then an end event or an
`UpstreamFailure`: never another exception, which would fail the entry with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.upstream._common import (
    StreamParser,
    as_id,
    as_int,
    body_failure,
    relay,
    reported_error,
    usage_from,
)
from adapters.upstream.aimaster import AimasterParser
from adapters.upstream.chatgpt_web import ChatGPTParser, _hub_answer, frame_payloads
from adapters.upstream.coze import CozeParser
from adapters.upstream.dify import DifyParser
from adapters.upstream.hiagent import HiAgentParser
from adapters.upstream.openai import OpenAIParser
from adapters.upstream.yach_agent import YachAgentParser
from adapters.upstream.yach_agent import _not_a_stream as yach_agent_not_a_stream
from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    TextReplace,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamFailure, UpstreamProtocolError, http_status
from bridge.sse import SSEDecoder, SSEEvent, SSELineTooLong
from tests.fakes import aimaster, chatgpt_web, coze, dify, hiagent, yach_agent
from tests.fakes import openai as fake_openai
from tests.fakes.base import chunked
from tests.fakes.scripted import sse_payloads
from tests.unit.test_sse import decode, reference_events

PROPERTY = settings(max_examples=300, deadline=1000)
cut_points = st.lists(st.integers(min_value=0), max_size=12)

# -- the SSE decoder: arbitrary bytes ------------------------------------------------------

# Bytes made of what the decoder looks for (field names, colons, every line end, a BOM, UTF-8
# whole and cut, bytes that are no UTF-8), and bytes of any kind at all.
_SSE_ATOMS = st.one_of(
    st.sampled_from(
        [
            b"data:",
            b"data: ",
            b"event:",
            b"event: t",
            b"id:",
            b"id: 1",
            b"retry:",
            b"retry: 5",
            b":",
            b"\n",
            b"\n",
            b"\r",
            b"\r\n",
            b"\n\n",
            b" ",
            b"\xef\xbb\xbf",
            b"\xe4\xb8\xad",
            b"\xe4",
            b"\xb8\xad",
            b"\xff",
            b"\0",
            b"x",
            b"[DONE]",
            b'data: {"a": 1}\n\n',
        ]
    ),
    st.binary(max_size=4),
)
sse_bytes = st.one_of(st.lists(_SSE_ATOMS, max_size=40).map(b"".join), st.binary(max_size=60))


@PROPERTY
@given(stream=sse_bytes, cuts=cut_points)
def test_any_bytes_in_any_reads_give_the_standard_events(stream: bytes, cuts: list[int]) -> None:
    expected = reference_events(stream)
    assert decode([stream]) == expected
    assert decode(chunked(stream, cuts)) == expected


@PROPERTY
@given(stream=sse_bytes, cuts=cut_points, limit=st.integers(1, 16))
def test_a_line_limit_refuses_and_never_garbles(stream: bytes, cuts: list[int], limit: int) -> None:
    """Past its limit the decoder refuses the stream (when depends on the reads: a limit on
    what it holds); every event it gave before is the standard's."""
    decoder = SSEDecoder(max_line_bytes=limit)
    events: list[SSEEvent] = []
    try:
        for chunk in chunked(stream, cuts):
            events += decoder.feed(chunk)
        events += decoder.close()
    except SSELineTooLong:
        assert events == reference_events(stream)[: len(events)]
    else:
        assert events == reference_events(stream)


# -- every upstream's answer --------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One upstream's stream format: its parser, a whole answer as it sends it, and how it
    sends an error report and a message of given JSON text."""

    parser: Callable[[], StreamParser]
    stream: bytes
    error: Callable[[dict[str, Any]], SSEEvent]
    message: Callable[[str], SSEEvent] = SSEEvent

    def messages(self) -> list[SSEEvent]:
        return decode([self.stream])


def _json_event(payload: object, event: str = "message") -> SSEEvent:
    return SSEEvent(json.dumps(payload, ensure_ascii=False), event)


def _hiagent_message(data: str) -> SSEEvent:
    return SSEEvent(f"data: {data}\n\n", "text")


_USER_MESSAGE = {
    "id": "user-1",
    "author": {"role": "user"},
    "content": {"content_type": "text", "parts": ["q"]},
}
WIRES = {
    "openai": Wire(
        OpenAIParser,
        fake_openai.chunks_for("An answer of some words"),
        lambda fields: _json_event({"error": fields}),
    ),
    "dify": Wire(
        DifyParser,
        dify.render(dify.chatflow()),
        lambda fields: _json_event({**fields, "event": "error"}),
    ),
    "coze": Wire(
        CozeParser,
        "".join(coze.chat_frames()).encode(),
        lambda fields: _json_event(fields, "error"),
        lambda data: SSEEvent(data, "conversation.message.delta"),
    ),
    "hiagent": Wire(
        HiAgentParser,
        hiagent.FIXTURE.read_bytes(),
        lambda fields: _hiagent_message(json.dumps({**fields, "event": "error"})),
        _hiagent_message,
    ),
    "aimaster": Wire(
        AimasterParser,
        aimaster.FIXTURE.read_bytes(),
        lambda fields: _json_event({"error": fields}),
    ),
    "yach-agent": Wire(
        YachAgentParser,
        sse_payloads(yach_agent.answer_frames()),
        lambda fields: _json_event({**fields, "type": "error"}),
    ),
    "chatgpt-web": Wire(
        lambda: ChatGPTParser("user-1"),
        sse_payloads(chatgpt_web.answer_payloads("conversation-1", _USER_MESSAGE, "assistant-1")),
        lambda fields: _json_event({"error": fields}),
    ),
}
wire_names = pytest.mark.parametrize("name", sorted(WIRES))


async def _relay(parser: StreamParser, messages: Sequence[SSEEvent], events: list[Event]) -> None:
    async def received() -> AsyncIterator[SSEEvent]:
        for message in messages:
            yield message

    async for event in relay(received(), parser, upstream="fuzzed"):
        events.append(event)


def relayed(wire: Wire, messages: Sequence[SSEEvent]) -> tuple[list[Event], UpstreamFailure | None]:
    """The events a turn gets from these messages, and the failure that ended it, if one did.
    Any other exception escapes: that is the defect these tests look for."""
    events: list[Event] = []
    try:
        asyncio.run(_relay(wire.parser(), messages, events))
    except UpstreamFailure as failure:
        return events, failure
    return events, None


_TYPED: dict[type, Callable[[Any], bool]] = {
    TextDelta: lambda e: type(e.text) is str,
    TextReplace: lambda e: type(e.text) is str,
    ReasoningDelta: lambda e: type(e.text) is str,
    AgentSwitch: lambda e: type(e.agent) is str,
    Suggestions: lambda e: type(e.items) is tuple and all(type(i) is str for i in e.items),
    Usage: lambda e: (
        all(
            n is None or type(n) is int
            for n in (e.prompt_tokens, e.completion_tokens, e.total_tokens)
        )
        and (e.latency_s is None or type(e.latency_s) is float)
    ),
    ConversationRef: lambda e: all(type(k) is str and type(v) is str for k, v in e.ref.items()),
    UpstreamError: lambda e: isinstance(e.kind, ErrorKind) and type(e.message) is str,
    Done: lambda e: True,
}


def assert_well_typed(events: list[Event]) -> None:
    """Every event holds what its type says (the JSON's own types do not leak through), and
    only the last may end the turn."""
    for event in events:
        assert _TYPED[type(event)](event), event
    assert not any(isinstance(event, Done | UpstreamError) for event in events[:-1]), events


# Any JSON value, its keys often the ones the parsers read, its values often ones they test
# for, and numbers of every kind (NaN, beyond 64 bits) and strings of digits of every kind.
_KEYS = st.sampled_from(
    [
        "choices",
        "delta",
        "content",
        "reasoning_content",
        "reasoning",
        "usage",
        "error",
        "code",
        "msg",
        "message",
        "event",
        "answer",
        "conversation_id",
        "task_id",
        "metadata",
        "type",
        "id",
        "agent_id",
        "agent_name",
        "is_finished",
        "finish_reason",
        "status",
        "last_error",
        "suggested_questions",
        "author",
        "role",
        "recipient",
        "parts",
        "content_type",
        "end_turn",
        "detail",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "latency",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        [
            "message",
            "message_end",
            "error",
            "message_replace",
            "agent_message",
            "assistant",
            "all",
            "answer",
            "follow_up",
            "think",
            "text",
            "finished_successfully",
            "[DONE]",
            "",
            "429",
            "500",
            " 12 ",
            "²",
            "١٢",
            "٤٢٩",
            "１２",
            "-1",
            "1e3",
            "NaN",
        ]
    ),
)
json_values = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(_KEYS, st.text(max_size=4)), inner, max_size=5),
    ),
    max_leaves=20,
)


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value inside `value`, itself included."""
    places = [path]
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            places += _places(item, (*path, key))
    return places


def _put(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    inner = value
    for key in path[:-1]:
        inner = inner[key]
    if new is _DELETE:
        del inner[path[-1]]
    else:
        inner[path[-1]] = new
    return value


_DELETE = object()
_EVENT_NAMES = st.sampled_from(
    [
        "message",
        "text",
        "error",
        "done",
        "ping",
        "conversation.message.delta",
        "conversation.message.completed",
        "conversation.chat.completed",
        "conversation.chat.failed",
        "conversation.chat.requires_action",
    ]
)


@st.composite
def _mutated_message(draw: st.DrawFn, message: SSEEvent) -> SSEEvent:
    """The message with one value of its JSON replaced or deleted (hiagent's JSON is inside
    `data: ` lines), or its data cut short or replaced, perhaps under another event name."""
    lines = message.data.split("\n")
    nested = lines[0].startswith("data: ")
    text = lines[0].removeprefix("data: ") if nested else message.data
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if value is None or draw(st.integers(0, 4)) == 0:
        text = draw(
            st.one_of(
                st.text(max_size=20),
                json_values.map(json.dumps),
                st.integers(0, len(text)).map(lambda end: text[:end]),
            )
        )
    else:
        path = draw(st.sampled_from(_places(value)))
        new = _DELETE if path and draw(st.booleans()) else draw(json_values)
        text = json.dumps(_put(value, path, new), ensure_ascii=draw(st.booleans()))
    data = "\n".join([f"data: {text}", *lines[1:]]) if nested else text
    return SSEEvent(data, draw(st.one_of(st.just(message.event), _EVENT_NAMES)))


@st.composite
def mutated_streams(draw: st.DrawFn, wire: Wire) -> list[SSEEvent]:
    messages = wire.messages()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(messages) - 1))
        messages[index] = draw(_mutated_message(messages[index]))
    return messages


@wire_names
def test_the_answers_read_as_they_are(name: str) -> None:
    events, failure = relayed(WIRES[name], WIRES[name].messages())
    assert failure is None
    assert_well_typed(events)
    assert isinstance(events[-1], Done)
    assert any(isinstance(event, TextDelta) for event in events)


@wire_names
@settings(max_examples=100, deadline=1000)
@given(data=st.data())
def test_any_json_anywhere_gives_typed_events_or_a_failure(name: str, data: st.DataObject) -> None:
    wire = WIRES[name]
    events, _ = relayed(wire, data.draw(mutated_streams(wire)))
    assert_well_typed(events)


def test_odd_openai_usage_counts_are_no_counts() -> None:
    # they were passed on as they came (a list, a string), and logged so
    chunk = {
        "choices": [],
        "usage": {"prompt_tokens": [], "completion_tokens": "3", "total_tokens": 4.0},
    }
    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [Usage(None, 3, 4)]


_COUNTS = st.dictionaries(
    st.sampled_from(
        [
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "latency",
            "input_tokens",
            "output_tokens",
            "input_count",
            "output_count",
            "token_count",
        ]
    ),
    json_values,
    max_size=4,
)


@wire_names
@settings(max_examples=40, deadline=1000)
@given(usage=st.one_of(_COUNTS, json_values), counts=_COUNTS)
def test_usage_of_any_shape_is_no_failure_of_the_answer(
    name: str, usage: Any, counts: dict[str, Any]
) -> None:
    """Every `usage` of the answer replaced (HiAgent's `message_cost` has its counts at its
    top): usage is only logged, so the answer and its end are the same."""
    wire = WIRES[name]

    def with_usage(message: SSEEvent) -> SSEEvent:
        nested = message.data.startswith("data: ")
        text = message.data.split("\n")[0].removeprefix("data: ") if nested else message.data
        try:
            value = json.loads(text)
        except ValueError:
            return message
        if isinstance(value, dict) and value.get("event") == "message_cost":
            value.update(counts)
        elif isinstance(value, dict) and "usage" in value:
            value["usage"] = usage
        elif isinstance(value, dict) and isinstance(value.get("metadata"), dict):
            value["metadata"]["usage"] = usage
        else:
            return message
        return (
            wire.message(json.dumps(value))
            if nested
            else SSEEvent(json.dumps(value), message.event)
        )

    def without_usage(events: list[Event]) -> list[Event]:
        return [event for event in events if not isinstance(event, Usage)]

    expected, _ = relayed(wire, wire.messages())
    events, failure = relayed(wire, [with_usage(message) for message in wire.messages()])
    assert failure is None
    assert_well_typed(events)
    assert without_usage(events) == without_usage(expected)


_REPORT_FIELDS = st.fixed_dictionaries(
    {"code": json_values},
    optional={
        "status": json_values,
        "message": json_values,
        "msg": json_values,
        "type": json_values,
    },
)


@wire_names
@settings(max_examples=60, deadline=1000)
@given(fields=_REPORT_FIELDS)
def test_an_error_report_of_any_shape_is_the_upstreams_error(
    name: str, fields: dict[str, Any]
) -> None:
    events, failure = relayed(WIRES[name], [WIRES[name].error(fields)])
    assert failure is None
    assert_well_typed(events)
    assert isinstance(events[-1], UpstreamError)


@wire_names
@pytest.mark.parametrize("fields", [{"code": "²"}, {"code": 1, "status": "⑦"}])
def test_an_error_report_with_digits_int_cannot_read(name: str, fields: dict[str, Any]) -> None:
    # `"²".isdigit()`, but `int("²")` fails: the ValueError made the upstream's own error
    # report a protocol error, and the user was told of an answer that could not be read
    events, failure = relayed(WIRES[name], [WIRES[name].error(fields)])
    assert failure is None
    assert isinstance(events[-1], UpstreamError)


_MEGABYTE = "c" * (1 << 20)


@wire_names
def test_an_error_reports_code_and_message_of_a_megabyte_are_clipped(name: str) -> None:
    # the code went into the error's message, and so into its log line, whole
    fields = {"code": _MEGABYTE, "message": _MEGABYTE, "msg": _MEGABYTE}
    events, failure = relayed(WIRES[name], [WIRES[name].error(fields)])
    assert failure is None
    assert isinstance(events[-1], UpstreamError)
    assert len(events[-1].message) < 500


@pytest.mark.parametrize(
    "frame",
    [
        {"code": _MEGABYTE, "msg": _MEGABYTE},
        {"type": "error", "content": _MEGABYTE},
        {"finish_reason": "error", "content": _MEGABYTE},
    ],
)
def test_a_yach_agent_error_frame_of_a_megabyte_is_clipped(frame: dict[str, Any]) -> None:
    events, failure = relayed(WIRES["yach-agent"], [_json_event(frame)])
    assert failure is None
    assert isinstance(events[-1], UpstreamError)
    assert len(events[-1].message) < 500


@pytest.mark.parametrize(
    "value",
    [
        "²",
        "⑦",
        "١٢",
        "１２",
        " 7 ",
        "12",
        12,
        12.0,
        True,
        None,
        [],
        {},
        float("nan"),
        2**70,
        "9" * 5000,  # (`int` refuses over 4300 digits: a ValueError escaped)
    ],
)
def test_the_readers_of_counts_ids_and_statuses_read_anything(value: object) -> None:
    assert as_int(value) is None or type(as_int(value)) is int
    assert type(as_id(value)) is str
    assert http_status(value) is None or 400 <= (http_status(value) or 0) <= 599
    usage = usage_from({"a": value}, prompt="a", completion="a", total="a", latency="a")
    assert_well_typed([usage])
    assert_well_typed([reported_error("x", {"code": value, "status": value, "message": value})])


# -- JSON nested deeper than Python's stack, or with an integer `int` does not convert ------

_DEEP = "[" * 100_000  # json.loads raised RecursionError: no JSONDecodeError, no shape error
_HUGE_INT = '{"code": ' + "1" * 5000 + "}"  # a ValueError: `int` converts 4300 digits at most
unreadable_json = pytest.mark.parametrize("body", [_DEEP, _HUGE_INT], ids=["deep", "huge-int"])


@wire_names
@unreadable_json
def test_json_that_cannot_be_read_is_a_failure_of_the_stream(name: str, body: str) -> None:
    wire = WIRES[name]
    for messages in ([wire.message(body)], [wire.message(body), *wire.messages()]):
        events, failure = relayed(wire, messages)
        assert isinstance(failure, UpstreamFailure)
        assert events == []


def test_an_error_nested_as_deep_as_orjson_reads_is_the_upstreams_error() -> None:
    # orjson reads 1024 levels, more than `str` of the message can recurse through: the
    # RecursionError made the report a protocol error, unlike a report of any other shape
    deep = "[" * 1020 + "]" * 1020
    events, failure = relayed(WIRES["openai"], [SSEEvent(f'{{"error":{{"message":{deep}}}}}')])
    assert failure is None
    assert events == [UpstreamError(ErrorKind.REJECTED, "openai error: <list nested too deep>")]


@unreadable_json
def test_a_body_json_cannot_read_in_place_of_the_stream_is_a_protocol_error(body: str) -> None:
    # read before any stream, where `relay` is not: the error escaped `http.open`
    assert isinstance(body_failure("dify", 200, body), UpstreamProtocolError)


@unreadable_json
def test_a_yach_agent_read_answered_with_json_it_cannot_read_is_a_protocol_error(
    body: str,
) -> None:
    assert isinstance(yach_agent_not_a_stream(200, body), UpstreamProtocolError)


@unreadable_json
def test_chatgpt_frames_and_answers_json_cannot_read_are_protocol_errors(body: str) -> None:
    assert frame_payloads(body, SSEDecoder(), "request-1") == [body]  # read by the parser
    with pytest.raises(UpstreamProtocolError):
        ChatGPTParser("user-1").feed(SSEEvent(body))
    with pytest.raises(UpstreamProtocolError):
        _hub_answer(body)


# -- recorded streams in any reads; ChatGPT's hub frames ---------------------------------


@PROPERTY
@given(
    name=st.sampled_from(sorted(WIRES)),
    end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_a_recorded_stream_in_any_reads_gives_the_same_events(
    name: str, end: bytes, cuts: list[int]
) -> None:
    # reads cut inside CRLFs and inside UTF-8 characters (the recordings hold Chinese text)
    stream = WIRES[name].stream
    assert decode(chunked(stream.replace(b"\n", end), cuts)) == WIRES[name].messages()


def _hub_frame(body: bytes, request_id: str = "request-1") -> str:
    return chatgpt_web.hub_frame(request_id, body)


@PROPERTY
@given(name=st.sampled_from(sorted(WIRES)), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_hub_frames_cut_anywhere_give_the_streams_messages(name: str, cuts: list[int]) -> None:
    decoder = SSEDecoder()
    payloads = [
        payload
        for body in chunked(WIRES[name].stream, cuts)
        for payload in frame_payloads(_hub_frame(body), decoder, "request-1")
    ]
    assert payloads == [message.data for message in WIRES[name].messages()]


_ENVELOPES = st.fixed_dictionaries(
    {"type": st.sampled_from(["http.response.body", "other"])},
    optional={
        "websocket_request_id": st.one_of(st.sampled_from(["request-1", "request-2"]), json_values),
        "body": st.one_of(sse_bytes.map(lambda b: base64.b64encode(b).decode()), json_values),
        "more_body": json_values,
    },
)


@settings(max_examples=200, deadline=1000)
@given(
    frames=st.lists(
        st.one_of(st.text(max_size=30), json_values.map(json.dumps), _ENVELOPES.map(json.dumps)),
        max_size=5,
    )
)
def test_any_frame_gives_payloads_or_a_protocol_error(frames: list[str]) -> None:
    decoder = SSEDecoder()
    for frame in frames:
        try:
            payloads = frame_payloads(frame, decoder, "request-1")
        except UpstreamProtocolError:
            continue
        assert all(type(payload) is str for payload in payloads)
