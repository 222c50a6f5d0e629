"""The pure AI Master parser: agent hand-off, reasoning, summed usage, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.upstream.aimaster import AimasterParser, error_of
from bridge.events import (
    AgentSwitch,
    Done,
    ErrorKind,
    ReasoningDelta,
    TextDelta,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamProtocolError
from bridge.sse import SSEEvent


def chunk(agent_id: str, agent_name: str, *, content: str | None = None,
          reasoning: str | None = None, usage: dict[str, int] | None = None,
          agent_step: str = "Agent Starting") -> SSEEvent:
    delta: dict[str, Any] = {"content": content, "role": None, "tool_calls": None}
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    payload = {
        "id": "chatcmpl-x", "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": None, "index": 0}],
        "usage": usage, "step": "AI Starting", "agent_step": agent_step,
        "agent_id": agent_id, "agent_name": agent_name, "function": None,
    }
    return SSEEvent(json.dumps(payload, ensure_ascii=False))


def usage(prompt: int, completion: int) -> dict[str, int]:
    """An agent's running token count, as each of its chunks reports it."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def test_agents_text_reasoning_and_usage_summed_over_agents() -> None:
    parser = AimasterParser()
    events = []
    for message in [
        chunk("a1", "路由", agent_step="Agent Start"),
        chunk("a1", "路由", content="转交"),
        chunk("a1", "路由", usage=usage(10, 1)),
        chunk("a1", "路由", usage=usage(10, 2)),
        chunk("a2", "推理", reasoning="想", usage=usage(5, 1)),
        chunk("a2", "推理", content="答", usage=usage(5, 3)),
        SSEEvent("[DONE]"),
    ]:
        events.extend(parser.feed(message))
    assert events == [
        AgentSwitch("路由"),
        TextDelta("转交"),
        AgentSwitch("推理"),
        ReasoningDelta("想"),
        TextDelta("答"),
        Usage(prompt_tokens=15, completion_tokens=5, total_tokens=20),
        Done(),
    ]
    assert parser.finished


def test_usage_counts_that_are_no_ints_are_no_counts() -> None:
    # `true` is an int to Python: it was summed as one token
    parser = AimasterParser()
    odd = {"prompt_tokens": True, "completion_tokens": 2, "total_tokens": False}
    parser.feed(chunk("a1", "路由", usage=odd))
    parser.feed(chunk("a2", "推理", usage=usage(5, 3)))

    assert parser.feed(SSEEvent("[DONE]"))[0] == Usage(
        prompt_tokens=5, completion_tokens=5, total_tokens=8
    )


def test_same_agent_name_with_another_id_is_a_switch() -> None:
    parser = AimasterParser()
    events = [*parser.feed(chunk("a1", "助手")), *parser.feed(chunk("a2", "助手"))]
    assert events == [AgentSwitch("助手"), AgentSwitch("助手")]


def test_done_without_usage() -> None:
    assert AimasterParser().feed(SSEEvent("[DONE]")) == [Done()]


def test_error_object_in_the_stream() -> None:
    parser = AimasterParser()
    events = parser.feed(SSEEvent('{"code": 500, "msg": "模型调用失败"}'))
    assert events == [UpstreamError(ErrorKind.REJECTED, "aimaster error 500: 模型调用失败")]
    assert parser.finished


@pytest.mark.parametrize(("payload", "expected"), [
    ({"error": {"message": "quota"}}, UpstreamError(ErrorKind.REJECTED, "aimaster error: quota")),
    ({"error": "boom"}, UpstreamError(ErrorKind.REJECTED, "aimaster error: boom")),
    ({"code": 503, "msg": "服务不可用"},
     UpstreamError(ErrorKind.UNAVAILABLE, "aimaster error 503: 服务不可用")),
    ({"code": 500, "msg": "系统繁忙"},
     UpstreamError(ErrorKind.RATE_LIMITED, "aimaster error 500: 系统繁忙")),
    ({"code": 200, "msg": "ok"}, None),
    ({"code": 0}, None),
    ({"choices": [], "code": 1}, None),
    ({"choices": [], "error": {"message": "quota"}},
     UpstreamError(ErrorKind.REJECTED, "aimaster error: quota")),
])
def test_error_of(payload: dict[str, Any], expected: UpstreamError | None) -> None:
    assert error_of(payload) == expected


@pytest.mark.parametrize("data", ["{not json", "[1, 2]"])
def test_unreadable_chunk(data: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        AimasterParser().feed(SSEEvent(data))


def test_an_agent_is_known_by_its_id_else_its_name_and_shown_by_its_name_else_its_id() -> None:
    parser = AimasterParser()
    events = [event for payload in [
        {"agent_name": "路由", "choices": []},
        {"agent_name": "路由", "agent_id": "", "choices": []},
        {"agent_id": "a2", "choices": []},
        {"agent_id": "a2", "agent_name": "推理", "choices": []},
        {"agent_id": "", "agent_name": "", "choices": []},
    ] for event in parser.feed(SSEEvent(json.dumps(payload, ensure_ascii=False)))]

    assert events == [AgentSwitch("路由"), AgentSwitch("a2")]
    assert not parser.finished


def test_an_agent_name_that_is_no_text_shows_the_agents_id() -> None:
    # its repr was shown: "{'zh': '路由'}"
    payload = {"agent_id": "a1", "agent_name": {"zh": "路由"}, "choices": []}
    assert AimasterParser().feed(SSEEvent(json.dumps(payload))) == [AgentSwitch("a1")]
