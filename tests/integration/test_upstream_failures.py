"""The failures every upstream adapter meets, each against its own fake on loopback.

Refused credentials, rate limits and server errors before the first byte; no server at all;
a missing setting; a stream that is cut, ends early or stalls midway. What only one adapter
does with them is tested in its own file.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from bridge.config import ConfigError
from bridge.events import Done, Event, ReasoningDelta
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn
from tests.fakes import aimaster, chatgpt_web, coze, dify, hiagent, openai, yach_agent
from tests.fakes.base import Recorded
from tests.fakes.scripted import (
    MIDWAY,
    Script,
    ScriptedFake,
    answer_text,
    collect,
    connect,
    refs,
    refused_url,
    status,
)


@dataclass(frozen=True)
class Case:
    """One adapter as this suite drives it."""

    fake: Callable[[int], ScriptedFake]  # its fake, for a seed
    path: str  # where the request that starts a turn goes (POST)
    answer: str  # the whole answer of the fake's usual stream
    kept: Callable[[Any], dict[str, str]]  # what a broken first turn's last reference holds
    required: str  # a setting it cannot do without
    # Its own report, in a 200 JSON body in place of the answer, of refused credentials …
    refused_body: dict[str, Any]
    # … and of an overload (to retry, as a 429 or a 5xx is)
    busy_body: dict[str, Any]
    reasoning: str = ""  # and its whole reasoning
    auth_tries: int = 1  # 2 where a refused credential is fetched again once
    route: Callable[[Any], Script] = lambda fake: fake.script  # answers `path`

    def sent(self, fake: ScriptedFake) -> list[Recorded]:
        return [r for r in fake.server.on(self.path) if r.method == "POST"]


AIMASTER = aimaster.recorded()
CASES = {
    "openai": Case(
        openai.ScriptedOpenAI, "/v1/chat/completions", openai.SCRIPTED_ANSWER,
        kept=lambda fake: {},  # no conversation upstream: the history is kept in Redis
        required="BRIDGE_OPENAI_API_KEY",
        refused_body={"error": {"message": "Incorrect API key provided: sk-****",
                                "type": "invalid_request_error", "code": "invalid_api_key"}},
        busy_body={"error": {"message": "The engine is currently overloaded, please try again "
                                        "later.", "type": "server_error", "code": None}},
    ),
    "aimaster": Case(
        aimaster.FakeAimaster, aimaster.PATH, AIMASTER.text,
        kept=lambda fake: {"chatId": fake.server.on(aimaster.PATH)[0].json()["chatId"]},
        required="BRIDGE_AIMASTER_TOKEN",
        refused_body={"code": 401, "msg": "认证失败,无法访问系统资源"},
        busy_body={"code": 429, "msg": "请求过于频繁"},
        reasoning=AIMASTER.reasoning,
    ),
    "chatgpt-web": Case(
        chatgpt_web.FakeChatGPT, chatgpt_web.CONVERSATION, chatgpt_web.ANSWER,
        kept=lambda fake: {"conversation_id": chatgpt_web.CONVERSATION_ID},
        required="BRIDGE_CHATGPT_ACCESS_TOKEN",
        refused_body={"detail": {"message": "Your authentication token has expired. Please try "
                                            "signing in again.", "type": "invalid_request_error",
                                 "param": None, "code": "token_expired"}},
        busy_body={"detail": "Too many requests in 1 hour. Try again later."},
    ),
    "yach-agent": Case(
        yach_agent.FakeYachAgent, yach_agent.CHAT, yach_agent.ANSWER,
        kept=lambda fake: {"chat_session_id": "cs-1"},
        required="BRIDGE_YACH_APP_SECRET",
        refused_body={"code": 401, "msg": "unauthorized", "obj": None},
        busy_body={"code": 429, "msg": "请稍后再试", "obj": None},
        reasoning="".join(yach_agent.THINK),
        auth_tries=2,  # the token is fetched again once
        route=lambda fake: fake.chat,  # the answer is then read with a GET from `script`
    ),
    "coze": Case(
        coze.CozeFake, "/v3/chat", coze.ANSWER,
        kept=lambda fake: {"conversation_id": coze.CONVERSATION_ID},
        required="BRIDGE_COZE_TOKEN",
        refused_body={"code": 4100, "msg": "authentication is invalid"},
        busy_body={"code": 4013, "msg": "Request rate exceeded"},
    ),
    "dify": Case(
        dify.DifyFake, dify.PATH, dify.ANSWER,
        kept=lambda fake: {"conversation_id": dify.CONVERSATION_ID},
        required="BRIDGE_DIFY_API_KEY",
        refused_body={"code": "unauthorized", "message": "Access token is invalid", "status": 401},
        busy_body={"code": "too_many_requests", "message": "Too many requests. Please try again "
                                                          "later.", "status": 429},
    ),
    "hiagent": Case(
        hiagent.HiAgentFake, hiagent.CHAT_QUERY, hiagent.recorded_answer(),
        kept=lambda fake: {"AppConversationID": hiagent.APP_CONVERSATION_ID,
                           "conversation_id": hiagent.FIXTURE_CONVERSATION_ID},
        required="BRIDGE_HIAGENT_APP_KEY",
        refused_body={"code": 401, "message": "unauthorized"},
        busy_body={"code": 503, "message": "model overloaded, try again later"},
        auth_tries=2,  # the CSRF cookies are fetched again once
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture
def seed() -> int:
    return 0


@pytest.fixture
async def fake(case: Case, seed: int) -> AsyncIterator[Any]:
    async with case.fake(seed) as server:
        yield server


def turn() -> Turn:
    return Turn(text="你好", sender=Sender("u1", "Ann", "012345"), chat_session_id="yach:g:1")


@pytest.mark.parametrize("code", [401, 403])
async def test_refused_credentials_are_an_auth_error_not_retried(
    case: Case, fake: Any, http: UpstreamHTTP, code: int
) -> None:
    case.route(fake).then(*[status(code, {"code": code, "msg": "unauthorized"})] * 2)
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())

    assert len(case.sent(fake)) == case.auth_tries


@pytest.mark.parametrize(("code", "headers", "wait_s"), [
    (429, {"Retry-After": "0.3"}, 0.3),
    (503, {}, 0.0),
])
async def test_retried_before_the_first_byte(
    case: Case, fake: Any, http: UpstreamHTTP, code: int, headers: dict[str, str], wait_s: float
) -> None:
    case.route(fake).then(status(code, {"msg": "not now"}, headers))
    started = time.monotonic()
    events = await collect(connect(http, fake.env()), turn())

    assert time.monotonic() - started >= wait_s
    assert answer_text(events) == case.answer
    assert events[-1] == Done()
    assert len(case.sent(fake)) == 2


async def test_refused_credentials_reported_in_a_200_json_body_are_an_auth_error(
    case: Case, fake: Any, http: UpstreamHTTP
) -> None:
    """Not a rejection of the question ("rephrase"): the operator must fix the credentials."""
    case.route(fake).then(*[status(200, case.refused_body)] * 2)
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())

    assert len(case.sent(fake)) == case.auth_tries


async def test_an_overload_reported_in_a_200_json_body_is_retried_before_the_first_byte(
    case: Case, fake: Any, http: UpstreamHTTP
) -> None:
    case.route(fake).then(status(200, case.busy_body))
    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == case.answer
    assert events[-1] == Done()
    assert len(case.sent(fake)) == 2


async def test_server_errors_outlasting_the_retries_are_unavailable(
    case: Case, fake: Any, http: UpstreamHTTP
) -> None:
    case.route(fake).then(status(502), status(503), status(500))
    with pytest.raises(UpstreamUnavailable):
        await collect(connect(http, fake.env()), turn())

    assert len(case.sent(fake)) == 3  # the first try and retries=2


async def test_connection_refused_is_unavailable(
    case: Case, fake: Any, http: UpstreamHTTP
) -> None:
    with pytest.raises(UpstreamUnavailable):
        await collect(connect(http, fake.env(url=refused_url())), turn())


async def test_missing_setting_is_a_configuration_error(
    case: Case, fake: Any, http: UpstreamHTTP
) -> None:
    env = fake.env()
    del env[case.required]
    with pytest.raises(ConfigError, match=case.required):
        connect(http, env)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(("how", "error", "idle_timeout_s"), [
    pytest.param("cut_after", UpstreamBroken, 5.0, id="cut"),
    pytest.param("end_after", UpstreamBroken, 5.0, id="ended"),
    pytest.param("stall_after", UpstreamTimeout, 0.3, id="stalled"),
])
async def test_stream_stopping_midway_keeps_what_arrived(
    case: Case, fake: Any, http: UpstreamHTTP, how: str, error: type[Exception],
    idle_timeout_s: float,
) -> None:
    fake.script.then(fake.answer(**{how: MIDWAY}))
    upstream = connect(replace(http, idle_timeout_s=idle_timeout_s), fake.env())
    events: list[Event] = []
    with pytest.raises(error):
        await collect(upstream, turn(), into=events)

    text = answer_text(events)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert case.answer.startswith(text)
    assert case.reasoning.startswith(reasoning)
    assert 0 < len(text + reasoning) < len(case.answer + case.reasoning)
    assert Done() not in events
    assert (refs(events) or [{}])[-1].items() >= case.kept(fake).items()  # kept though it failed
