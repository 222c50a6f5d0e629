"""The OpenAI-compatible chunk parser (adapters/upstream/openai.py)."""

from __future__ import annotations

import json

import pytest

from adapters.upstream._common import is_done, json_object
from adapters.upstream.openai import OpenAIParser, chunk_object
from bridge.events import Done, ErrorKind, ReasoningDelta, TextDelta, UpstreamError, Usage
from bridge.http import UpstreamProtocolError
from bridge.sse import SSEEvent


@pytest.mark.parametrize("data", [
    '{"choices": [{"delta": {"content": "caf\\u00e9 \\ud83d\\ude00"}}]}',
    '{"a": 1, "a": 2, "f": [1.5, -0.0, 0.1, 1e-07, 5e-324, null, true]}',
    '{"n": NaN, "i": Infinity}',  # json reads these, orjson does not
    '{"t": "\\ud800"}',  # a lone surrogate: the same
    '{"f": 1e400}',
    '  {"z": 1}\n',
])
def test_chunk_object_reads_what_json_reads(data: str) -> None:
    assert repr(chunk_object(data)) == repr(json.loads(data))


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"text"', '{"a": 1'])
def test_chunk_object_refuses_what_json_object_refuses(data: str) -> None:
    with pytest.raises(UpstreamProtocolError) as expected:
        json_object(data, upstream="openai")
    with pytest.raises(UpstreamProtocolError, match=r"openai: not (a )?JSON") as refused:
        chunk_object(data)
    assert str(refused.value) == str(expected.value)


@pytest.mark.parametrize(("data", "done"), [
    ("[DONE]", True), (" [DONE]\n", True), ("[DONE] x", False), ('{"c": "[DONE]"}', False),
])
def test_end_marker(data: str, done: bool) -> None:
    assert is_done(data) is done


def test_parser_events() -> None:
    parser = OpenAIParser()
    chunk = {"choices": [{"delta": {"reasoning_content": "hm", "content": "Hi"}}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    assert parser.feed(SSEEvent(json.dumps(chunk))) == [
        ReasoningDelta("hm"), TextDelta("Hi"), Usage(3, 1, 4),
    ]
    assert parser.feed(SSEEvent('{"choices": []}')) == []
    assert parser.feed(SSEEvent("[DONE]")) == [Done()]


def test_what_real_servers_add_is_no_text() -> None:
    """A role-only first chunk, empty `choices`, `null` or empty content and reasoning
    (SPEC §7): nothing to show."""
    parser = OpenAIParser()
    role_only = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    empty = {"choices": [{"delta": {"content": None, "reasoning_content": "", "reasoning": ""}}]}

    assert parser.feed(SSEEvent(json.dumps(role_only))) == []
    assert parser.feed(SSEEvent(json.dumps(empty))) == []
    assert parser.feed(SSEEvent('{"choices": null}')) == []


def test_text_beside_empty_reasoning_is_text_only() -> None:
    chunk = {"choices": [{"delta": {"content": "Hi", "reasoning_content": ""}}]}

    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [TextDelta("Hi")]


def test_reasoning_under_its_other_name() -> None:
    """vLLM and OpenRouter name the reasoning delta `reasoning`."""
    chunk = {"choices": [{"delta": {"reasoning": "hm"}}]}

    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [ReasoningDelta("hm")]


def test_usage_inside_the_choice() -> None:
    chunk = {"choices": [{"delta": {}, "finish_reason": "stop",
                          "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                    "total_tokens": 7}}]}

    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [Usage(5, 2, 7)]


def test_the_answer_is_the_first_choice() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "A"}},
                         {"index": 1, "delta": {"content": "B"}}]}

    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [TextDelta("A")]


def test_an_error_in_place_of_a_chunk_ends_the_answer_as_an_error() -> None:
    """vLLM and LiteLLM report a failure inside the 200 stream as `{"error": {...}}`."""
    data = '{"error": {"message": "The model is overloaded", "type": "server_error"}}'

    [error] = OpenAIParser().feed(SSEEvent(data))

    assert isinstance(error, UpstreamError)
    assert error.kind is ErrorKind.RATE_LIMITED
    assert "The model is overloaded" in error.message


def test_a_null_error_beside_a_chunk_is_no_error() -> None:
    chunk = {"error": None, "choices": [{"delta": {"content": "Hi"}}]}

    assert OpenAIParser().feed(SSEEvent(json.dumps(chunk))) == [TextDelta("Hi")]
