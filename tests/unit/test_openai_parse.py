"""The OpenAI-compatible chunk parser (adapters/upstream/openai.py)."""

from __future__ import annotations

import json

import pytest

from adapters.upstream._common import is_done, json_object
from adapters.upstream.openai import OpenAIParser, chunk_object
from bridge.events import Done, ReasoningDelta, TextDelta, Usage
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
