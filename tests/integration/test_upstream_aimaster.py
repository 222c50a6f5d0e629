"""The aimaster adapter against a fake AI Master on loopback serving the recorded fixture."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from adapters.upstream import aimaster
from bridge.config import ConfigError, load_settings
from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    ErrorKind,
    Event,
    ReasoningDelta,
    TextDelta,
    UpstreamError,
    Usage,
)
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn
from tests.fakes.aimaster import FIXTURE, PATH, FakeAimaster
from tests.fakes.scripted import free_port, sse_payloads, status

TOKEN = "aimaster-test-token"
SCENARIO = "e6e822e47fa24ca380f8d2d09eb114a7"


class DictKV:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str) -> None:
        self.values[name] = value


def expected_from_fixture() -> tuple[str, str, list[str], Usage]:
    """Answer, reasoning, agents in order and summed usage, read straight off the fixture."""
    text, reasoning, agents = [], [], []
    last_usage: dict[str, dict[str, int]] = {}
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if not agents or agents[-1] != chunk["agent_name"]:
            agents.append(chunk["agent_name"])
        delta = chunk["choices"][0]["delta"]
        text.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        if chunk["usage"]:
            last_usage[chunk["agent_id"]] = chunk["usage"]
    usage = Usage(
        *(sum(u[k] for u in last_usage.values())
          for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    )
    return "".join(text), "".join(reasoning), agents, usage


def turn(text: str = "企业迁址需要什么材料?", conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("u1", "Ann", "012345"), chat_session_id="yach:g:1",
                conversation=conversation)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def fake() -> AsyncIterator[FakeAimaster]:
    server = await FakeAimaster(seed=7).start()
    yield server
    await server.close()


@pytest.fixture(params=[11, 22, 33])
async def seeded_fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeAimaster]:
    """The same fixture under several random re-chunkings."""
    server = await FakeAimaster(seed=request.param).start()
    yield server
    await server.close()


def make(session: aiohttp.ClientSession, base_url: str,
         idle_timeout_s: float = 5.0) -> aimaster.AimasterUpstream:
    settings = load_settings({
        "BRIDGE_UPSTREAM": "aimaster",
        "BRIDGE_AIMASTER_BASE_URL": base_url,
        "BRIDGE_AIMASTER_TOKEN": TOKEN,
        "BRIDGE_AIMASTER_SCENARIO_ID": SCENARIO,
        "BRIDGE_AIMASTER_PARAMS": '{"userId": "u-42"}',
    }, command="demo")
    http = UpstreamHTTP(session, retries=2, backoff_s=0.01, idle_timeout_s=idle_timeout_s)
    return aimaster.create(settings, http, DictKV())


async def collect(upstream: aimaster.AimasterUpstream, the_turn: Turn,
                  into: list[Event] | None = None) -> list[Event]:
    events = [] if into is None else into
    async for event in upstream.stream(the_turn):
        events.append(event)
    return events


def answer(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_fixture_answer_reasoning_agents_and_usage_exact(
    seeded_fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    text, reasoning, agents, usage = expected_from_fixture()
    events = await collect(make(session, seeded_fake.base_url), turn())

    assert isinstance(events[0], ConversationRef)
    assert answer(events) == text
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    assert [e.agent for e in events if isinstance(e, AgentSwitch)] == agents
    assert agents == ["企业办事指南", "企业变更助手"]
    assert events[-2:] == [usage, Done()]
    assert [e for e in events if isinstance(e, Usage)] == [usage]
    # the hand-off comes between the first agent's answer and the second's reasoning
    switch_at = events.index(AgentSwitch("企业变更助手"))
    assert not any(isinstance(e, ReasoningDelta) for e in events[:switch_at])
    assert answer(events[switch_at:]) == ""


async def test_request_carries_chat_id_scenario_question_params_and_token(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    events = await collect(make(session, fake.base_url), turn("分析f(x)=2x^2的单调性"))
    ref = events[0]
    assert isinstance(ref, ConversationRef)
    (request,) = fake.server.on(PATH)
    assert request.method == "POST"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json() == {
        "chatId": ref.ref["chat_id"],
        "scenarioInfoId": SCENARIO,
        "latestMessageContent": "分析f(x)=2x^2的单调性",
        "params": {"userId": "u-42"},
    }
    assert len(ref.ref["chat_id"]) == 32


async def test_chat_id_is_kept_for_the_session(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    upstream = make(session, fake.base_url)
    first = await collect(upstream, turn("一"))
    ref = first[0]
    assert isinstance(ref, ConversationRef)
    second = await collect(upstream, turn("二", conversation=dict(ref.ref)))
    assert not any(isinstance(e, ConversationRef) for e in second)
    assert second[-1] == Done()
    one, two = fake.server.on(PATH)
    assert one.json()["chatId"] == two.json()["chatId"] == ref.ref["chat_id"]
    assert two.json()["latestMessageContent"] == "二"
    other = await collect(upstream, turn("三"))
    assert isinstance(other[0], ConversationRef) and other[0].ref != ref.ref


@pytest.mark.parametrize("code", [401, 403])
async def test_auth_failure_is_reported_not_retried(
    code: int, fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(code, {"msg": "no"}))
    with pytest.raises(UpstreamAuthError):
        await collect(make(session, fake.base_url), turn())
    assert len(fake.server.on(PATH)) == 1


async def test_ruoyi_style_auth_error_in_a_json_body(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(200, {"code": 401, "msg": "认证失败,无法访问系统资源"}))
    with pytest.raises(UpstreamAuthError):
        await collect(make(session, fake.base_url), turn())


async def test_429_retry_after_is_honoured(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(429, "slow down", {"Retry-After": "0.3"}))
    started = time.monotonic()
    events = await collect(make(session, fake.base_url), turn())
    assert time.monotonic() - started >= 0.3
    assert events[-1] == Done()
    assert answer(events) == expected_from_fixture()[0]
    assert len(fake.server.on(PATH)) == 2


async def test_5xx_is_retried_then_reported(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(502), status(503), status(500))
    with pytest.raises(UpstreamUnavailable):
        await collect(make(session, fake.base_url), turn())
    assert len(fake.server.on(PATH)) == 3  # first try + retries=2


async def test_5xx_then_success_is_invisible(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(status(503))
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == expected_from_fixture()[0]


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(make(session, f"http://127.0.0.1:{free_port()}/dev-api"), turn())


async def test_stream_cut_midway_is_broken_after_what_arrived(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    fake.script.then(fake.fixture(cut_after=40))
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(make(session, fake.base_url), turn(), into=events)
    assert Done() not in events
    assert expected_from_fixture()[0].startswith(answer(events))


async def test_clean_eof_without_done_is_broken(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    data = FIXTURE.read_bytes().replace(b"data: [DONE]", b": bye")
    fake.script.then(fake.stream(data))
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(make(session, fake.base_url), turn(), into=events)
    assert answer(events) == expected_from_fixture()[0]


async def test_error_object_in_the_stream_ends_the_turn(
    fake: FakeAimaster, session: aiohttp.ClientSession
) -> None:
    first_chunk = FIXTURE.read_text(encoding="utf-8").split("\n\n")[2].removeprefix("data: ")
    data = sse_payloads([first_chunk, {"code": 500, "msg": "模型调用失败"}, "[DONE]"])
    fake.script.then(fake.stream(data))
    events = await collect(make(session, fake.base_url), turn())
    assert answer(events) == "@"
    assert events[-1] == UpstreamError(ErrorKind.REJECTED, "code 500: 模型调用失败")


async def test_idle_timeout(fake: FakeAimaster, session: aiohttp.ClientSession) -> None:
    fake.script.then(fake.fixture(stall_after=5))
    with pytest.raises(UpstreamTimeout):
        await collect(make(session, fake.base_url, idle_timeout_s=0.3), turn())


async def test_missing_credentials_are_a_configuration_error(
    session: aiohttp.ClientSession,
) -> None:
    settings = load_settings({"BRIDGE_AIMASTER_BASE_URL": "https://a.example/dev-api"},
                             command="demo")
    with pytest.raises(ConfigError, match="BRIDGE_AIMASTER_TOKEN"):
        aimaster.create(settings, UpstreamHTTP(session), DictKV())
