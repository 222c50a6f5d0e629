"""The aimaster adapter against a fake AI Master on loopback serving the recorded fixture.

The failures every adapter meets are in test_upstream_failures.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamAuthError, UpstreamBroken, UpstreamHTTP, UpstreamRejected
from bridge.interfaces import Sender, Turn
from tests.fakes.aimaster import FIXTURE, PARAMS, PATH, SCENARIO, TOKEN, FakeAimaster, recorded
from tests.fakes.scripted import answer_text, collect, connect, sse_payloads, status

RECORDED = recorded()


def turn(text: str = "企业迁址需要什么材料?", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("u1", "Ann", "012345"), chat_session_id="yach:g:1",
                conversation=conversation)


@pytest.fixture(params=[7])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeAimaster]:
    async with FakeAimaster(seed=request.param) as server:
        yield server


@pytest.mark.parametrize("fake", [11, 22, 33], indirect=True)  # several random re-chunkings
async def test_fixture_answer_reasoning_agents_and_usage_exact(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    events = await collect(connect(http, fake.env()), turn())

    assert isinstance(events[0], ConversationRef)
    assert answer_text(events) == RECORDED.text
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == RECORDED.reasoning
    assert [e.agent for e in events if isinstance(e, AgentSwitch)] == RECORDED.agents
    assert RECORDED.agents == ["企业办事指南", "企业变更助手"]
    assert events[-2:] == [RECORDED.usage, Done()]
    assert [e for e in events if isinstance(e, Usage)] == [RECORDED.usage]
    # the hand-off comes between the first agent's answer and the second's reasoning
    switch_at = events.index(AgentSwitch("企业变更助手"))
    assert not any(isinstance(e, ReasoningDelta) for e in events[:switch_at])
    assert answer_text(events[switch_at:]) == ""


async def test_request_carries_chat_id_scenario_question_params_and_token(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    events = await collect(connect(http, fake.env()), turn("分析f(x)=2x^2的单调性"))
    ref = events[0]
    assert isinstance(ref, ConversationRef)
    (request,) = fake.server.on(PATH)
    assert request.method == "POST"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json() == {
        "chatId": ref.ref["chatId"],
        "scenarioInfoId": SCENARIO,
        "latestMessageContent": "分析f(x)=2x^2的单调性",
        "params": PARAMS,
    }
    assert len(ref.ref["chatId"]) == 32


async def test_chat_id_is_kept_for_the_session(fake: FakeAimaster, http: UpstreamHTTP) -> None:
    upstream = connect(http, fake.env())
    first = await collect(upstream, turn("一"))
    ref = first[0]
    assert isinstance(ref, ConversationRef)
    second = await collect(upstream, turn("二", conversation=dict(ref.ref)))
    assert not any(isinstance(e, ConversationRef) for e in second)
    assert second[-1] == Done()
    one, two = fake.server.on(PATH)
    assert one.json()["chatId"] == two.json()["chatId"] == ref.ref["chatId"]
    assert two.json()["latestMessageContent"] == "二"
    other = await collect(upstream, turn("三"))
    assert isinstance(other[0], ConversationRef) and other[0].ref != ref.ref


async def test_ruoyi_style_auth_error_in_a_json_body(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    fake.script.then(status(200, {"code": 401, "msg": "认证失败,无法访问系统资源"}))
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())


async def test_ruoyi_error_code_500_is_permanent_not_retried(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    """RuoYi answers every exception of the app (a wrong scenario id, a failed check) as
    `code: 500`: asking again gets the same answer, after the whole retry schedule."""
    fake.script.then(*[status(200, {"code": 500, "msg": "场景不存在"})] * 3)
    with pytest.raises(UpstreamRejected, match="场景不存在"):
        await collect(connect(http, fake.env()), turn())
    assert len(fake.server.on(PATH)) == 1


async def test_ruoyi_error_code_500_saying_busy_is_retried(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    fake.script.then(status(200, {"code": 500, "msg": "系统繁忙,请稍后再试"}))
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == RECORDED.text
    assert len(fake.server.on(PATH)) == 2


async def test_clean_eof_without_done_is_broken(fake: FakeAimaster, http: UpstreamHTTP) -> None:
    fake.stream = FIXTURE.read_bytes().replace(b"data: [DONE]", b": bye")
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert answer_text(events) == RECORDED.text


async def test_error_object_in_the_stream_ends_the_turn(
    fake: FakeAimaster, http: UpstreamHTTP
) -> None:
    first_chunk = FIXTURE.read_text(encoding="utf-8").split("\n\n")[2].removeprefix("data: ")
    fake.stream = sse_payloads([first_chunk, {"code": 500, "msg": "模型调用失败"}, "[DONE]"])
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == "@"
    assert events[-1] == UpstreamError(ErrorKind.REJECTED, "aimaster error 500: 模型调用失败")
