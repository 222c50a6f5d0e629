"""The failure matrix: every upstream adapter × every failure it can meet, end to end.

A bridge runs in process (real Redis) against each adapter's fake on loopback, and each failure
is provoked for real: refused connections, statuses before the first byte (retried or not),
no headers, a stream cut (connection reset, truncated HTTP chunk, end without the end marker,
silence), the upstream's own error inside a 200 stream, a data line that is not JSON, a line
over 1 MiB, an empty answer, a 200 that is not a stream. Each test states the whole outcome:

- what the chat shows: the answer, or what arrived and then one short message of
  bridge/messages.py (SPEC §6, §8) — exactly once;
- `upstream_errors_total{upstream,kind}` (SPEC §9), read from `/metrics`;
- the log, as `chatbridge run` writes it: no traceback, error level only for refused
  credentials (SPEC §8), and no credential — not even one the upstream echoes in its error;
- the entry acknowledged (an upstream failure is not a failed attempt, SPEC §6);
- how often the question was asked: again only before the first byte.

What one adapter does with a failure besides (a fresh CSRF cookie, a fresh token) is tested
with the adapter alone in test_upstream_failures.py and test_upstream_<name>.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from bridge.cli import setup_logging
from bridge.config import load_settings
from bridge.messages import MESSAGES
from tests.fakes import aimaster, chatgpt_web, coze, dify, hiagent, openai, yach_agent
from tests.fakes import yach as fake_yach
from tests.fakes.scripted import (
    MIDWAY,
    Breaks,
    Reply,
    Script,
    ScriptedFake,
    refused_url,
    sse_payloads,
    sse_reply,
    status,
    unanswered_url,
)
from tests.fakes.yach import FakeYach
from tests.harness import RunningBridge, bridge_env, group_message, running_bridge

ZH = MESSAGES["zh"]
LONG_LINE = b"data: " + b"x" * ((1 << 20) + 16) + b"\n\n"  # over the 1 MiB a line may hold


def _insert(stream: bytes, block: bytes) -> bytes:
    """`block` (one SSE message) after two thirds of the stream's messages (answer text has
    come by then)."""
    blocks = stream.split(b"\n\n")
    at = max(len(blocks) * 2 // 3, 1)
    return b"\n\n".join([*blocks[:at], block.removesuffix(b"\n\n"), *blocks[at:]])


def _openai_chunk(content: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": content}}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def _aimaster_chunk(content: str) -> dict[str, Any]:
    return {**_openai_chunk(content), "agent_id": "a-1", "agent_name": "企业办事指南",
            "agent_step": "Agent Start", "usage": None}


def _chatgpt_message(text: str, *, final: bool = False) -> dict[str, Any]:
    message = chatgpt_web.assistant_message("a-1", text, final=final)
    return {"message": message, "conversation_id": chatgpt_web.CONVERSATION_ID, "error": None}


_DATA_BAD_JSON = b'data: {"answer": "cut off in the mid\n\n'


@dataclass(frozen=True)
class Case:
    """One adapter as the matrix drives it."""

    fake: Callable[[], ScriptedFake]
    path: str  # where the request a turn starts with goes (POST) …
    start: Callable[[Any], Script]  # … and its script: statuses go there
    # Its own ways of failing inside a 200 stream: name → (stream, the text shown before it,
    # the kind of failure it reports).
    failing: dict[str, tuple[bytes, str, str]]
    empty: bytes  # a stream that ends well without answer text
    bad_json: bytes = _DATA_BAD_JSON  # one message of its framing whose JSON is torn
    auth_tries: int = 1  # 2 where refused credentials are fetched again once
    # Its settings with the upstream at `url` (where nothing answers).
    unreachable: Callable[[Any, str], dict[str, str]] = lambda fake, url: fake.env(url=url)
    read_with: str = "POST"  # how the stream is read (from `path`, answered by `fake.script`)

    def asked(self, fake: Any) -> int:
        """How often the question was sent."""
        return sum(r.method == "POST" for r in fake.server.on(self.path))

    def streams(self, fake: Any) -> int:
        """How often the stream was requested."""
        return sum(r.method == self.read_with for r in fake.server.on(self.path))

    def reply(self, fake: Any, edit: Callable[[bytes], bytes] | None = None,
              **breaks: Any) -> Reply:
        """The usual answer (changed by `edit`), whole or stopping short as `breaks` say."""
        if isinstance(fake, chatgpt_web.FakeChatGPT):
            return fake.answer(edit=edit, **breaks)
        return fake.sse(lambda request: edit(fake.stream) if edit else fake.stream, **breaks)

    def serve(self, fake: Any, data: bytes, **options: Any) -> Reply:
        """`data` as the stream, whatever the request."""
        return sse_reply(data, fake.rng, release=fake.release, **options)


CASES = {
    "openai": Case(
        openai.ScriptedOpenAI, "/v1/chat/completions", lambda fake: fake.script,
        failing={
            "error-object": (sse_payloads([
                _openai_chunk("Partial answer."),
                {"error": {"message": "The server had an error", "type": "server_error"}},
                "[DONE]",
            ]), "Partial answer.", "unavailable"),
            "rate-limit": (sse_payloads([
                {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests",
                           "code": "rate_limit_exceeded"}},
                "[DONE]",
            ]), "", "rate_limited"),
            "invalid": (sse_payloads([
                _openai_chunk("Partial answer."),
                {"error": {"message": "Invalid prompt", "type": "invalid_request_error"}},
            ]), "Partial answer.", "rejected"),
        },
        empty=openai.chunks_for(""),
    ),
    "hiagent": Case(
        hiagent.HiAgentFake, hiagent.CHAT_QUERY, lambda fake: fake.script,
        failing={
            "error": (hiagent.nested_stream([
                hiagent.message("Open"), hiagent.message("Stack"),
                {"event": "error", "code": 500, "message": "model overloaded",
                 "conversation_id": hiagent.FIXTURE_CONVERSATION_ID},
            ]), "OpenStack", "rate_limited"),
            "message_failed": (hiagent.nested_stream([
                hiagent.message("Open"),
                {"event": "message_failed", "task_id": "t1", "id": "t1", "error": "LLM timeout",
                 "conversation_id": hiagent.FIXTURE_CONVERSATION_ID},
            ]), "Open", "timeout"),
            "message_failed-plain": (hiagent.nested_stream([
                hiagent.message("Open"),
                {"event": "message_failed", "task_id": "t1", "id": "t1",
                 "error": "content violates the policy",
                 "conversation_id": hiagent.FIXTURE_CONVERSATION_ID},
            ]), "Open", "rejected"),
        },
        empty=hiagent.nested_stream([{"event": "message_end",
                                      "conversation_id": hiagent.FIXTURE_CONVERSATION_ID}]),
        bad_json=b'event:text\ndata:data: {"event": "message", "answer": "cut\ndata:\ndata:\n\n',
        auth_tries=2,
    ),
    "coze": Case(
        coze.CozeFake, "/v3/chat", lambda fake: fake.script,
        failing={
            "error": ("".join(coze.error_frames()).encode(), "当然知道，", "rejected"),
            "chat.failed": ("".join(coze.failed_frames()).encode(), "当然", "rate_limited"),
        },
        empty="".join([*coze.chat_frames()[:2], *coze.chat_frames()[-2:]]).encode(),
        bad_json=b'event:conversation.message.delta\ndata:{"type": "answer", "content": "cut\n\n',
    ),
    "dify": Case(
        dify.DifyFake, dify.PATH, lambda fake: fake.script,
        failing={
            "error": (dify.render(dify.failing()), dify.PARTS[0], "unavailable"),
            "error-rate-limit": (dify.render([dify.event(
                "error", status=400, code="completion_request_error",
                message="[openai] Rate Limit Error, Error code: 429")]), "", "rate_limited"),
        },
        empty=dify.render([dify.PING, dify.end()]),
    ),
    "aimaster": Case(
        aimaster.FakeAimaster, aimaster.PATH, lambda fake: fake.script,
        failing={"code": (sse_payloads([
            _aimaster_chunk("部分回答。"), {"code": 500, "msg": "模型调用失败"}, "[DONE]",
        ]), "部分回答。", "rejected")},
        empty=b"data: [DONE]\n\n",
    ),
    "yach-agent": Case(
        yach_agent.FakeYachAgent, yach_agent.CHAT, lambda fake: fake.chat,
        failing={"error-frame": (sse_payloads([
            *yach_agent.answer_frames()[:7],
            yach_agent.frame("error", "智能体调用失败", finished=True, reason="error"),
        ]), "我是知音楼数字伙伴", "rejected")},
        empty=sse_payloads([yach_agent.frame("markdown", "", finished=True, reason="stop")]),
        auth_tries=2,  # the token is fetched again once
        read_with="GET",
        # Its base is the Yach platform the replies go to as well: the stream read fails.
        unreachable=lambda fake, url: fake.env(
            BRIDGE_YACH_AGENT_STREAM_URL=url + "/s?stream_id={stream_id}"),
    ),
    "chatgpt-web": Case(
        chatgpt_web.FakeChatGPT, chatgpt_web.CONVERSATION, lambda fake: fake.script,
        failing={"error": (sse_payloads([
            _chatgpt_message("当然可以"),
            {"message": None, "conversation_id": chatgpt_web.CONVERSATION_ID,
             "error": "Something went wrong while generating the response."},
        ]), "当然可以", "rejected")},
        empty=sse_payloads([_chatgpt_message("", final=True), "[DONE]"]),
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture
async def fake(case: Case) -> AsyncIterator[Any]:
    async with case.fake() as server:
        yield server



@dataclass
class Chat:
    """A running bridge, what its chat shows, and what it logged."""

    bridge: RunningBridge
    shown: Callable[[], list[str]]
    log: io.StringIO

    async def ask(self, text: str = "你好") -> list[str]:
        """Ask; what the question showed, once its entry is acknowledged."""
        before = len(self.shown())
        status_code, _ = await self.bridge.post(group_message(text))
        assert status_code == 200
        state = self.bridge.bridge
        assert state.redis is not None
        async with asyncio.timeout(15):
            while len(self.shown()) == before or await state.redis.xlen(state.keys.inbox):
                await asyncio.sleep(0.02)
        assert not await state.redis.xlen(state.keys.dead)
        return self.shown()[before:]

    async def upstream_errors(self) -> dict[tuple[str, str], float]:
        async with self.bridge.session.get(f"{self.bridge.url}/metrics") as response:
            text = await response.text()
        pattern = r'chatbridge_upstream_errors_total\{kind="(\w+)",upstream="([\w-]+)"\} (\S+)'
        return {(upstream, kind): float(value)
                for kind, upstream, value in re.findall(pattern, text)}

    def lines(self) -> list[dict[str, Any]]:
        """The log's lines but the fakes' access log."""
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [line for line in lines if line.get("logger") != "aiohttp.access"]


@asynccontextmanager
async def chat(
    fake: Any, yach: FakeYach, redis_url: str, bot_id: str, log: io.StringIO,
    upstream_env: dict[str, str] | None = None, **extra: str,
) -> AsyncIterator[Chat]:
    env = bridge_env(redis_url, bot_id, yach, **{**(upstream_env or fake.env()), **{
        "BRIDGE_UPSTREAM_RETRIES": "3", "BRIDGE_LOG_LEVEL": "info", "BRIDGE_LOG_FORMAT": "json",
        **extra,
    }})
    if not isinstance(fake, yach_agent.FakeYachAgent):  # (it takes the replies itself)
        env.update(BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                   BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET)
    setup_logging(load_settings(env, command="run"), log)
    shown = fake.texts if isinstance(fake, yach_agent.FakeYachAgent) else yach.texts
    async with running_bridge(env) as bridge:
        yield Chat(bridge, shown, log)


def credentials(fake: Any) -> list[str]:
    """What the adapter authenticates with: its secret settings, and the tokens issued to it."""
    secret = re.compile(r"BRIDGE_\w*(KEY|TOKEN|SECRET)$")
    values = [value for name, value in fake.env().items() if secret.match(name)]
    if isinstance(fake, yach_agent.FakeYachAgent):
        values += sorted(fake.valid_tokens)
    return values


def assert_logged_well(
    chat: Chat, fake: Any, kind: str | None, *, echoed: Sequence[str] = ()
) -> None:
    """One `upstream_failed` of `kind` (none without); no traceback anywhere; error level only
    for refused credentials; no credential, whether the bridge sent or the upstream echoed it."""
    lines = chat.lines()
    failed = [(line["level"], line["kind"]) for line in lines if line["event"] == "upstream_failed"]
    expected_level = "error" if kind in ("auth", "not_found") else "warning"
    assert failed == ([(expected_level, kind)] if kind else [])
    errors = [line for line in lines if line["level"] in ("error", "critical")]
    assert all(line["event"] == "upstream_failed" for line in errors), errors
    for line in lines:
        assert "exception" not in line and "Traceback" not in json.dumps(line), line
    log = chat.log.getvalue()
    for value in [*credentials(fake), *echoed]:
        assert value not in log, f"{value!r} in the log"


async def assert_told(chat: Chat, case_name: str, kind: str | None) -> None:
    expected = {(case_name, kind): 1.0} if kind else {}
    assert await chat.upstream_errors() == expected


def answer_and_notice(shown: list[str], notice: str) -> str:
    """The text shown before the one notice that ends `shown`."""
    assert shown[-1] == ZH[notice]
    assert all(text not in MESSAGES["zh"].values() for text in shown[:-1]), shown
    return "".join(shown[:-1])


def no_headers(fake: Any) -> Reply:
    """The request is taken in and never answered (until the fake closes)."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await fake.release.wait()
        return web.Response(status=503)

    return reply


def echoing(code: int, echoed: list[str]) -> Reply:
    """An error answer that quotes the credentials of the request, as servers do
    ("Incorrect API key provided: sk-…"); `echoed` gets them."""

    async def reply(request: web.Request) -> web.StreamResponse:
        sent: list[str] = []
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            sent.append(authorization.removeprefix("Bearer "))
        try:
            body = json.loads(await request.text() or "{}")
        except json.JSONDecodeError:
            body = {}
        for name in ("access_token", "AppKey"):
            if isinstance(body, dict) and body.get(name):
                sent.append(str(body[name]))
        sent += [request.headers[name] for name in ("x-csrf-token", "app-visitor-key")
                 if name in request.headers]
        echoed.extend(sent)
        text = json.dumps({"error": {"message": f"Incorrect credential provided: {' '.join(sent)}",
                                     "code": code}})
        return web.Response(status=code, text=text, content_type="application/json")

    return reply


def case_name(case: Case) -> str:
    return next(name for name, known in CASES.items() if known is case)


# -- retried before the first byte: only the answer shows ------------------------------------

PAST = "Wed, 21 Oct 2015 07:28:00 GMT"  # (a date already past: retried at once)


@pytest.mark.parametrize("replies", [
    pytest.param([(500, {"Retry-After": "0"}), (502, {"Retry-After": "0"}),
                  (503, {"Retry-After": "0"})], id="500-502-503"),
    pytest.param([(429, {"Retry-After": "0"})], id="429-seconds"),
    pytest.param([(429, {"Retry-After": PAST})], id="429-http-date"),
    pytest.param([(429, {})], id="429-bare"),
])
async def test_retried_before_the_first_byte_only_the_answer_shows(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, replies: list[tuple[int, dict[str, str]]],
) -> None:
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        clean = await bridge.ask()
        asked = case.asked(fake)
        case.start(fake).then(*(status(code, {"msg": "not now"}, headers)
                                for code, headers in replies))
        again = await bridge.ask()
        await assert_told(bridge, case_name(case), None)
    assert again == clean and clean and not set(clean) & set(ZH.values())
    assert case.asked(fake) - asked == len(replies) + 1  # asked again before the first byte
    assert_logged_well(bridge, fake, None)


# -- failing before the first byte: one notice -------------------------------------------------


@pytest.mark.parametrize(("provoke", "notice", "kind", "extra"), [
    pytest.param(lambda case, fake: [status(502, "bad gateway", {"Retry-After": "0"}),
                                     status(503, "down", {"Retry-After": "0"})],
                 "upstream_unavailable", "unavailable", {"BRIDGE_UPSTREAM_RETRIES": "1"},
                 id="5xx-past-retries"),
    pytest.param(lambda case, fake: [status(429, {"msg": "quota"}, {"Retry-After": "0"})] * 2,
                 "upstream_rate_limited", "rate_limited", {"BRIDGE_UPSTREAM_RETRIES": "1"},
                 id="429-past-retries"),
    pytest.param(lambda case, fake: [status(401, {"code": 401, "msg": "unauthorized"})]
                 * case.auth_tries, "upstream_auth", "auth", {}, id="401"),
    pytest.param(lambda case, fake: [status(403, {"code": 403, "msg": "forbidden"})]
                 * case.auth_tries, "upstream_auth", "auth", {}, id="403"),
    pytest.param(lambda case, fake: [no_headers(fake)], "upstream_timeout", "timeout",
                 {"BRIDGE_UPSTREAM_IDLE_TIMEOUT_S": "0.3"}, id="no-headers"),
])
async def test_failing_before_the_first_byte_shows_one_notice(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
    provoke: Callable[[Case, Any], list[Reply]], notice: str, kind: str, extra: dict[str, str],
) -> None:
    replies = provoke(case, fake)
    case.start(fake).then(*replies)
    async with chat(fake, yach, redis_url, bot_id, log_output, **extra) as bridge:
        assert await bridge.ask() == [ZH[notice]]
        await assert_told(bridge, case_name(case), kind)
    assert case.asked(fake) == len(replies)  # asked again only where it may be
    assert_logged_well(bridge, fake, kind)


@pytest.mark.parametrize("how", ["refused", "connect-timeout"])
async def test_an_upstream_not_reached_shows_one_notice(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, how: str,
) -> None:
    """Nothing listens (the connection is refused at once), or the host drops the packets:
    the connect times out (BRIDGE_UPSTREAM_CONNECT_TIMEOUT_S), is retried, and ends as
    unreachable, not as a hang until the turn's total timeout."""
    with contextlib.ExitStack() as stack:
        url = refused_url() if how == "refused" else stack.enter_context(unanswered_url())
        async with chat(fake, yach, redis_url, bot_id, log_output, case.unreachable(fake, url),
                        BRIDGE_UPSTREAM_RETRIES="1",
                        BRIDGE_UPSTREAM_CONNECT_TIMEOUT_S="0.3") as bridge:  # fmt: skip
            assert await bridge.ask() == [ZH["upstream_unavailable"]]
            await assert_told(bridge, case_name(case), "unavailable")
    assert_logged_well(bridge, fake, "unavailable")


@pytest.mark.parametrize(("code", "notice", "kind"), [
    (400, "upstream_rejected", "rejected"),
    (422, "upstream_rejected", "rejected"),
    # What the settings name (the address, the agent, the model) is not there: rephrasing
    # cannot help, and the operator is told (at error level), as for refused credentials.
    (404, "upstream_not_found", "not_found"),
    (410, "upstream_not_found", "not_found"),
])
async def test_a_refused_question_shows_one_notice_and_logs_no_echoed_credential(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, code: int, notice: str, kind: str,
) -> None:
    echoed: list[str] = []
    case.start(fake).then(echoing(code, echoed))
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH[notice]]
        await assert_told(bridge, case_name(case), kind)
    assert echoed  # the credential went by, and came back in the error
    assert_logged_well(bridge, fake, kind, echoed=echoed)


@pytest.mark.parametrize("body", ["page", "endless"])
async def test_a_200_that_is_not_a_stream_shows_one_notice(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, body: str,
) -> None:
    """A maintenance page, or a body that never ends (a download, another kind of stream):
    unreadable, and read no further than it takes to say so (no memory blow-up)."""
    sent = [0]

    async def maintenance(request: web.Request) -> web.StreamResponse:
        if body == "page":
            return web.Response(text="<html><body>Down for maintenance</body></html>",
                                content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # until the bridge hangs up
            while True:
                await response.write(b"<p>" + b"x" * 65529 + b"</p>")
                sent[0] += 65536
        return response

    fake.script.then(maintenance)
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH["upstream_rejected"]]
        await assert_told(bridge, case_name(case), "protocol")
    assert sent[0] < 32 << 20  # (1 MiB read at most, and what the sockets buffer)
    assert_logged_well(bridge, fake, "protocol")


# -- after the first byte: what arrived, then one notice; never asked again ---------------------


@pytest.mark.parametrize(("breaks", "notice", "kind", "extra"), [
    pytest.param({"cut_after": MIDWAY}, "cut_off", "broken", {}, id="connection-reset"),
    pytest.param({"truncate_after": MIDWAY}, "cut_off", "broken", {}, id="truncated-chunk"),
    pytest.param({"end_after": MIDWAY}, "cut_off", "broken", {}, id="eof-without-end"),
    pytest.param({"stall_after": MIDWAY}, "upstream_timeout", "timeout",
                 {"BRIDGE_UPSTREAM_IDLE_TIMEOUT_S": "0.3"}, id="idle-timeout"),
])
async def test_a_stream_stopping_midway_shows_what_arrived_then_one_notice(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
    breaks: Breaks, notice: str, kind: str, extra: dict[str, str],
) -> None:
    async with chat(fake, yach, redis_url, bot_id, log_output, **extra) as bridge:
        (clean,) = await bridge.ask()
        asked, streams = case.asked(fake), case.streams(fake)
        fake.script.then(case.reply(fake, **breaks))
        shown = await bridge.ask()
        await assert_told(bridge, case_name(case), kind)
    assert (case.asked(fake), case.streams(fake)) == (asked + 1, streams + 1)  # not again
    arrived = answer_and_notice(shown, notice)
    assert arrived.strip() and clean.startswith(arrived.rstrip())
    assert_logged_well(bridge, fake, kind)


@pytest.mark.parametrize(("case", "shape"), [
    (name, shape) for name, known in CASES.items() for shape in known.failing
], indirect=["case"])
async def test_the_upstreams_own_error_inside_a_200_stream(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, shape: str,
) -> None:
    """Of the kind it reports: "rephrase" only for a rejection of the question, "busy" or
    "unavailable, try later" for an overload or an outage. Never asked again (SPEC §6)."""
    data, before, kind = case.failing[shape]
    fake.script.then(case.serve(fake, data))
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        shown = await bridge.ask()
        await assert_told(bridge, case_name(case), kind)
    assert case.asked(fake) == 1
    # With text shown, the notice also says it is incomplete.
    notice = (IN_STREAM_MIDWAY if before.strip() else IN_STREAM_NOTICE)[kind]
    assert answer_and_notice(shown, notice).strip() == before.strip()
    assert_logged_well(bridge, fake, kind)


IN_STREAM_NOTICE = {"rejected": "upstream_rejected", "rate_limited": "upstream_rate_limited",
                    "unavailable": "upstream_unavailable", "timeout": "upstream_timeout"}
IN_STREAM_MIDWAY = {"rejected": "rejected_midway", "rate_limited": "rate_limited_midway",
                    "unavailable": "unavailable_midway", "timeout": "upstream_timeout"}


@pytest.mark.parametrize("what", ["bad-json", "long-line"])
async def test_an_unreadable_stream_shows_what_arrived_then_one_notice(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, what: str,
) -> None:
    block = case.bad_json if what == "bad-json" else LONG_LINE
    fake.max_size = 1 << 16  # (the long line in a few writes, not thousands)
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        (clean,) = await bridge.ask()
        fake.script.then(case.reply(fake, edit=lambda data: _insert(data, block)))
        shown = await bridge.ask()
        await assert_told(bridge, case_name(case), "protocol")
    arrived = answer_and_notice(shown, "rejected_midway")
    assert arrived.strip() and clean.startswith(arrived.rstrip())
    assert_logged_well(bridge, fake, "protocol")


async def test_an_event_that_never_ends_is_refused_not_taken_in(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
) -> None:
    """Data lines of 1 KB with never a blank line to end their event: no line is over 1 MiB,
    but the event grows for as long as they come. Refused once over the limit a line has
    (SPEC §7: "not a memory blow-up"), not held until the total timeout."""
    sent = [0]
    lines = (b"data: " + b"x" * 1017 + b"\n") * 64

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # until the bridge hangs up …
            while sent[0] < 64 << 20:  # (… or, refused never, 64 MiB: then silence)
                await response.write(lines)
                sent[0] += len(lines)
            await fake.release.wait()
        return response

    fake.script.then(endless)
    async with chat(fake, yach, redis_url, bot_id, log_output,
                    BRIDGE_UPSTREAM_IDLE_TIMEOUT_S="1") as bridge:  # fmt: skip
        assert await bridge.ask() == [ZH["upstream_rejected"]]
        await assert_told(bridge, case_name(case), "protocol")
    assert sent[0] < 16 << 20  # (1 MiB read, and what the sockets buffer)
    assert_logged_well(bridge, fake, "protocol")


async def test_an_empty_answer_says_so_once(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
) -> None:
    fake.script.then(case.serve(fake, case.empty))
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH["empty_answer"]]
        await assert_told(bridge, case_name(case), None)
    assert_logged_well(bridge, fake, None)


# -- the WebSocket answers of chatgpt-web ------------------------------------------------------


def _around_third(frames: list[str], *added: str, keep_rest: bool = True) -> list[str]:
    """`added` after the first answer pieces (the echoed question, the title, two pieces)."""
    return [*frames[:4], *added, *(frames[4:] if keep_rest else [])]


@pytest.mark.parametrize(("mode", "notice", "kind", "extra"), [
    pytest.param({"ws_mode": "drop"}, "cut_off", "broken", {}, id="dropped"),
    pytest.param({"ws_mode": "stall"}, "upstream_timeout", "timeout",
                 {"BRIDGE_UPSTREAM_IDLE_TIMEOUT_S": "0.3"}, id="idle-timeout"),
    pytest.param({"edit_frames": lambda frames: _around_third(frames, "{not json")},
                 "rejected_midway", "protocol", {}, id="bad-json"),
    pytest.param({"ws_mode": "hub", "edit_frames": lambda frames: _around_third(frames, (
        chatgpt_web.hub_frame(json.loads(frames[0])["websocket_request_id"], LONG_LINE)))},
                 "rejected_midway", "protocol", {}, id="hub-long-line"),
    pytest.param({"edit_frames": lambda frames: _around_third(frames, json.dumps(
        {"message": None, "conversation_id": chatgpt_web.CONVERSATION_ID,
         "error": "Something went wrong"}), keep_rest=False)},
                 "rejected_midway", "rejected", {}, id="error-message"),
])
@pytest.mark.parametrize("case", ["chatgpt-web"], indirect=True)
async def test_a_chatgpt_socket_failing_midway_shows_what_arrived_then_one_notice(
    case: Case, fake: chatgpt_web.FakeChatGPT, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
    mode: dict[str, Any], notice: str, kind: str, extra: dict[str, str],
) -> None:
    fake.answer_mode = "ws"
    async with chat(fake, yach, redis_url, bot_id, log_output, **extra) as bridge:
        (clean,) = await bridge.ask()
        for name, value in mode.items():
            setattr(fake, name, value)
        shown = await bridge.ask()
        await assert_told(bridge, "chatgpt-web", kind)
    assert case.asked(fake) == 2 and len(fake.server.on(chatgpt_web.WS)) == 2  # not again
    arrived = answer_and_notice(shown, notice)
    assert arrived.strip() and clean.startswith(arrived.rstrip())
    assert_logged_well(bridge, fake, kind)


@pytest.mark.parametrize(("target", "notice", "kind", "edit"), [
    pytest.param("all_dead", "upstream_unavailable", "unavailable", None, id="unreachable"),
    pytest.param("all_inside", "upstream_unavailable", "unavailable", None, id="refused"),
    pytest.param("ok", "empty_answer", None,
                 lambda frames: [json.dumps(_chatgpt_message("", final=True)), "[DONE]"],
                 id="empty"),
])
@pytest.mark.parametrize("case", ["chatgpt-web"], indirect=True)
async def test_a_chatgpt_socket_without_an_answer_shows_one_notice(
    case: Case, fake: chatgpt_web.FakeChatGPT, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
    target: str, notice: str, kind: str | None, edit: Callable[[list[str]], list[str]] | None,
) -> None:
    fake.answer_mode, fake.wss_target, fake.edit_frames = "ws", target, edit
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH[notice]]
        await assert_told(bridge, "chatgpt-web", kind)
    assert_logged_well(bridge, fake, kind)


# -- valid JSON the adapter cannot read --------------------------------------------------------

WRONG_SHAPE = {
    "openai": b'data: {"choices": "not a list"}\n\n',
    "aimaster": b'data: {"choices": {"0": {"delta": {}}}, "agent_id": "a-1"}\n\n',
    "hiagent": b'event:text\ndata:data: {"event": ["message"], "answer": "x"}\ndata:\ndata:\n\n',
}


@pytest.mark.parametrize("case", list(WRONG_SHAPE), indirect=True)
async def test_a_message_of_an_unexpected_shape_is_unreadable_not_a_crash(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
) -> None:
    """JSON, but not what the adapter reads there (a list where an object goes, …): the
    stream cannot be read any further, as with JSON that does not parse — not an exception
    that leaves the entry to be asked again."""
    name = case_name(case)
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        (clean,) = await bridge.ask()
        fake.script.then(case.reply(fake, edit=lambda data: _insert(data, WRONG_SHAPE[name])))
        shown = await bridge.ask()
        await assert_told(bridge, name, "protocol")
    assert case.asked(fake) == 2  # not asked again
    arrived = answer_and_notice(shown, "rejected_midway")
    assert arrived.strip() and clean.startswith(arrived.rstrip())
    assert_logged_well(bridge, fake, "protocol")


# -- an error of the retried kinds reported in a 200 JSON body, before the first byte ---------

# Answers that are no stream but a JSON body the adapter reads as an overload or an outage:
# AI Master's RuoYi-style codes (read like HTTP statuses, but 500: by its words), Coze's
# rate-limit code, the Yach agent's codes, the error objects of the others.
BODY_LEVEL_RETRYABLE = [
    pytest.param("aimaster", {"code": 500, "msg": "系统繁忙"}, "upstream_rate_limited",
                 "rate_limited", id="aimaster-500-busy"),
    pytest.param("aimaster", {"code": 503, "msg": "服务不可用"}, "upstream_unavailable",
                 "unavailable", id="aimaster-503"),
    pytest.param("aimaster", {"code": 429, "msg": "请求过于频繁"}, "upstream_rate_limited",
                 "rate_limited", id="aimaster-429"),
    pytest.param("coze", {"code": 4013, "msg": "Request rate exceeded"}, "upstream_rate_limited",
                 "rate_limited", id="coze-4013"),
    pytest.param("yach-agent", {"code": 429, "msg": "", "obj": None}, "upstream_rate_limited",
                 "rate_limited", id="yach-agent-429"),
    pytest.param("yach-agent", {"code": 503, "msg": "", "obj": None}, "upstream_unavailable",
                 "unavailable", id="yach-agent-503"),
    pytest.param("openai", {"error": {"message": "The server had an error",
                                      "type": "server_error"}},
                 "upstream_unavailable", "unavailable", id="openai-server-error"),
    pytest.param("dify", {"code": "too_many_requests", "message": "Too many requests",
                          "status": 429}, "upstream_rate_limited", "rate_limited", id="dify-429"),
    pytest.param("hiagent", {"code": 502, "message": "bad gateway"}, "upstream_unavailable",
                 "unavailable", id="hiagent-502"),
    pytest.param("chatgpt-web", {"detail": "Too many requests in 1 hour. Try again later."},
                 "upstream_rate_limited", "rate_limited", id="chatgpt-web-too-many"),
]


@pytest.mark.parametrize(("case", "body", "notice", "kind"), BODY_LEVEL_RETRYABLE,
                         indirect=["case"])
async def test_a_retryable_error_in_a_json_body_is_retried_like_its_status(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object, body: dict[str, Any], notice: str, kind: str,
) -> None:
    """SPEC §2: 429 and 5xx are retried before the first byte. An adapter that reads a 200
    JSON body as one of them (and tells the user so) retries it the same way: invisible
    when a retry succeeds, the notice only once the retries are spent."""
    async with chat(fake, yach, redis_url, bot_id, log_output,
                    BRIDGE_UPSTREAM_RETRIES="2") as bridge:  # fmt: skip
        clean = await bridge.ask()
        case.start(fake).then(status(200, body))
        again = await bridge.ask()
        await assert_told(bridge, case_name(case), None)
        asked = case.asked(fake)
        case.start(fake).then(*[status(200, body)] * 3)
        assert await bridge.ask() == [ZH[notice]]
        await assert_told(bridge, case_name(case), kind)
    assert again == clean and clean and not set(clean) & set(ZH.values())
    assert asked == 3 and case.asked(fake) == asked + 3  # the retry, then every retry spent
    assert_logged_well(bridge, fake, kind)


# -- refused credentials and permanent errors reported in a 200 JSON body -----------------------

REFUSED_IN_BODY = {
    "openai": {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                         "code": "invalid_api_key"}},
    "hiagent": {"code": 401, "message": "unauthorized"},
    "coze": {"code": 4100, "msg": "authentication is invalid"},
    "dify": {"code": "unauthorized", "message": "Access token is invalid", "status": 401},
    "aimaster": {"code": 401, "msg": "认证失败,无法访问系统资源"},
    "yach-agent": {"code": 403, "msg": "forbidden", "obj": None},
    "chatgpt-web": {"detail": {"message": "Your authentication token has expired.",
                               "code": "token_expired"}},
}


async def test_refused_credentials_in_a_json_body_tell_the_operator_not_to_rephrase(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
) -> None:
    """SPEC §8: upstream 401/403 — said in the body of a 200 as well — is the operator's to
    fix: the auth notice, logged at error level; never retried but for a fresh credential."""
    body = REFUSED_IN_BODY[case_name(case)]
    case.start(fake).then(*[status(200, body)] * case.auth_tries)
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH["upstream_auth"]]
        await assert_told(bridge, case_name(case), "auth")
    assert case.asked(fake) == case.auth_tries
    assert_logged_well(bridge, fake, "auth")


@pytest.mark.parametrize("case", ["aimaster"], indirect=True)
async def test_a_permanent_ruoyi_error_is_told_at_once_not_retried(
    case: Case, fake: Any, yach: FakeYach, redis_url: str, bot_id: str,
    log_output: io.StringIO, redis_client: object,
) -> None:
    """RuoYi's `code: 500` is every exception of the app (here: a scenario that is not
    there): asking again gets the same, so the notice comes at once, not after the whole
    retry schedule."""
    case.start(fake).then(*[status(200, {"code": 500, "msg": "场景不存在"})] * 4)
    async with chat(fake, yach, redis_url, bot_id, log_output) as bridge:
        assert await bridge.ask() == [ZH["upstream_rejected"]]
        await assert_told(bridge, "aimaster", "rejected")
    assert case.asked(fake) == 1
    assert_logged_well(bridge, fake, "rejected")
