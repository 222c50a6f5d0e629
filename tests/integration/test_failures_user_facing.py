"""Every failure of SPEC §8 ends in exactly one short message in the chat, in BRIDGE_LANG:
never a traceback, never silence, never a secret."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from bridge.messages import MESSAGES
from tests.fakes import yach as fake_yach
from tests.fakes.base import FakeServer
from tests.fakes.images import FakeImages, png
from tests.fakes.openai import chunks_for
from tests.fakes.scripted import Reply, Script, free_port, sse_reply, status
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

ZH, EN = MESSAGES["zh"], MESSAGES["en"]
ANSWER = "First sentence of the answer. Second sentence of it. " * 20
KEY = "sk-test-placeholder"


class ScriptedOpenAI:
    """`/v1/chat/completions` answering from a Script: statuses, whole, cut or stalled streams."""

    def __init__(self) -> None:
        self.rng = random.Random(3)
        self.release = asyncio.Event()
        self.script = Script(self.stream())
        self.server = FakeServer(web.Application())
        self.server.app.router.add_post("/v1/chat/completions", self.script.handle)

    def stream(self, **options: Any) -> Any:
        return sse_reply(chunks_for(ANSWER), self.rng, release=self.release, **options)

    async def start(self) -> ScriptedOpenAI:
        await self.server.start()
        return self

    async def close(self) -> None:
        self.release.set()
        await self.server.close()

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def calls(self) -> int:
        return len(self.server.requests)



@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedOpenAI]:
    fake = await ScriptedOpenAI().start()
    yield fake
    await fake.close()


def env(redis_url: str, bot_id: str, yach: FakeYach, base_url: str, **extra: str) -> dict[str, str]:
    return bridge_env(
        redis_url,
        bot_id,
        yach,
        **openai_env(base_url),
        BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
        BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
        **{
            "BRIDGE_UPSTREAM_RETRIES": "1",
            "BRIDGE_REPLY_MODE": "stream",
            "BRIDGE_FLUSH_MIN_CHARS": "100",
            **extra,
        },
    )


async def ask_until(
    env: dict[str, str], yach: FakeYach, notice: str, payload: dict[str, Any] | None = None
) -> list[str]:
    """Ask once; the texts shown once `notice` has been, after a moment for anything more.
    The entry must be acknowledged by then: a failure told to the user is not retried."""
    async with running_bridge(env) as bridge:
        status_code, _ = await bridge.post(payload or group_message("question"))
        assert status_code == 200
        await wait_until(lambda: notice in yach.texts())
        await asyncio.sleep(0.3)
        assert bridge.bridge.redis is not None
        assert await bridge.bridge.redis.xlen(bridge.bridge.keys.inbox) == 0
    return yach.texts()


def assert_clean(texts: list[str]) -> None:
    for text in texts:
        assert "Traceback" not in text and KEY not in text and "HTTP" not in text


async def test_upstream_unreachable(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    texts = await ask_until(
        env(redis_url, bot_id, yach, base_url), yach, ZH["upstream_unavailable"]
    )
    assert texts == [ZH["upstream_unavailable"]]
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W001"]}


@pytest.mark.parametrize(("replies", "notice"), [
    ((status(502, {"error": "bad gateway"}), status(503, "down")), "upstream_unavailable"),
    ((status(429, {"error": {"message": "quota"}}, {"Retry-After": "0"}),) * 2,
     "upstream_rate_limited"),
], ids=["5xx", "429"])  # fmt: skip
async def test_an_upstream_failing_past_its_retries_is_told_once(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    replies: tuple[Reply, ...], notice: str,
) -> None:
    upstream.script.then(*replies)
    texts = await ask_until(env(redis_url, bot_id, yach, upstream.base_url), yach, ZH[notice])
    assert texts == [ZH[notice]]
    assert upstream.calls() == 2


async def test_retry_after_is_honoured_and_invisible(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(status(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}))
    async with running_bridge(env(redis_url, bot_id, yach, upstream.base_url)) as bridge:
        await bridge.post(group_message("question"))
        await upstream.server.wait_for_requests(1)
        asked = asyncio.get_running_loop().time()
        await upstream.server.wait_for_requests(2, timeout=5)
        waited = asyncio.get_running_loop().time() - asked
        await wait_until(lambda: "".join(yach.texts()) == ANSWER)
    assert waited >= 0.95  # the advised second, not the backoff of a few milliseconds


async def test_retries_before_the_first_byte_are_invisible(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(status(500, "oops", {"Retry-After": "0"}))
    async with running_bridge(env(redis_url, bot_id, yach, upstream.base_url)) as bridge:
        await bridge.post(group_message("question"))
        await wait_until(lambda: "".join(yach.texts()) == ANSWER)
    assert upstream.calls() == 2


@pytest.mark.parametrize("code", [401, 403])
async def test_upstream_auth_is_told_and_logged_at_error(
    redis_url: str,
    bot_id: str,
    yach: FakeYach,
    upstream: ScriptedOpenAI,
    redis_client: object,
    code: int,
) -> None:
    upstream.script.then(status(code, {"error": {"message": "invalid api key"}}))
    with capture_logs() as logs:
        texts = await ask_until(
            env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_LANG="en"),
            yach,
            EN["upstream_auth"],
        )
    assert texts == [EN["upstream_auth"]]
    assert upstream.calls() == 1  # never retried
    failed = [e for e in logs if e["event"] == "upstream_failed"]
    assert [(e["log_level"], e["kind"]) for e in failed] == [("error", "auth")]


async def test_upstream_rejects_the_request(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(status(400, {"error": {"message": "context too long"}}))
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url), yach, ZH["upstream_rejected"]
    )
    assert texts == [ZH["upstream_rejected"]]


@pytest.mark.parametrize("mode", ["stream", "final"])
async def test_a_stream_broken_midway_sends_what_arrived_and_one_notice(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    mode: str,
) -> None:
    upstream.script.then(upstream.stream(cut_after=60, max_size=100))
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_REPLY_MODE=mode),
        yach,
        ZH["cut_off"],
    )
    assert texts[-1] == ZH["cut_off"]  # its own message, after the answer's last piece
    assert texts.count(ZH["cut_off"]) == 1
    arrived = "".join(texts[:-1])
    assert arrived and ANSWER.startswith(arrived.rstrip())
    assert upstream.calls() == 1  # not silently restarted


@pytest.mark.parametrize("mode", ["stream", "final"])
async def test_a_stream_broken_before_any_text_says_so_alone(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    mode: str,
) -> None:
    upstream.script.then(upstream.stream(cut_after=0))  # headers, then the connection drops
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_REPLY_MODE=mode),
        yach,
        ZH["broken_before_answer"],
    )
    assert texts == [ZH["broken_before_answer"]]  # no "the text above" with nothing above
    assert upstream.calls() == 1  # the request went out: not asked again


async def test_an_idle_upstream_times_out(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(upstream.stream(stall_after=40, max_size=100))
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_UPSTREAM_IDLE_TIMEOUT_S="0.3"),
        yach,
        ZH["upstream_timeout"],
    )
    assert texts.count(ZH["upstream_timeout"]) == 1 and texts[-1] == ZH["upstream_timeout"]
    assert ANSWER.startswith("".join(texts[:-1]).rstrip())


async def test_an_upstream_silent_from_the_start_times_out(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(upstream.stream(stall_after=0))
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_UPSTREAM_IDLE_TIMEOUT_S="0.3"),
        yach,
        ZH["upstream_timeout"],
    )
    assert texts == [ZH["upstream_timeout"]]


async def test_an_upstream_that_never_answers_times_out_without_asking_again(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    """No response headers within the idle timeout: the question reached the upstream, so
    it is not asked again (only connect errors, 429 and 5xx are retried, SPEC §2) — an
    upstream that keeps conversations would see it twice."""

    async def no_answer(request: web.Request) -> web.StreamResponse:
        await upstream.release.wait()
        return web.Response(status=503)

    upstream.script.then(no_answer, no_answer)
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_UPSTREAM_IDLE_TIMEOUT_S="0.3"),
        yach,
        ZH["upstream_timeout"],
    )
    assert texts == [ZH["upstream_timeout"]]
    assert upstream.calls() == 1


async def test_an_empty_answer(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(sse_reply(chunks_for(""), upstream.rng))
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url), yach, ZH["empty_answer"]
    )
    assert texts == [ZH["empty_answer"]]


@pytest.mark.parametrize(
    ("payload", "extra", "expected"),
    [
        (
            group_message("x" * 21),
            {"BRIDGE_MAX_INPUT_CHARS": "20"},
            "消息太长了（21 字，上限 20 字），请精简后再发。",
        ),
        (group_message("", msgtype="voice"), {}, ZH["unsupported_type"]),
        (group_message("", msgtype="file", content="report.pdf"), {}, ZH["unsupported_type"]),
    ],
    ids=["too-long", "voice", "file"],
)
async def test_input_refusals(
    redis_url: str,
    bot_id: str,
    yach: FakeYach,
    upstream: ScriptedOpenAI,
    redis_client: object,
    payload: dict[str, Any],
    extra: dict[str, str],
    expected: str,
) -> None:
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url, **extra), yach, expected, payload
    )
    assert texts == [expected]
    assert upstream.calls() == 0


async def test_rate_limited_once_per_message(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.default = sse_reply(chunks_for("ok."), upstream.rng)
    async with running_bridge(
        env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_USER_RATE="1/60")
    ) as bridge:
        await bridge.post(group_message("one"))
        await wait_until(lambda: yach.texts() == ["ok."])
        await bridge.post(group_message("two"))
        await wait_until(lambda: len(yach.shown) == 2)
        await asyncio.sleep(0.2)
    assert yach.texts() == ["ok.", ZH["rate_limited"]]


async def test_image_too_large(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    images = await FakeImages().start()
    try:
        url = images.add("big", png("big", size=3 * 1024 * 1024))
        payload = group_message("", msgtype="image", picUrl=url)
        texts = await ask_until(
            env(
                redis_url,
                bot_id,
                yach,
                upstream.base_url,
                BRIDGE_IMAGE_PIPELINE="vision",
                BRIDGE_FETCH_ALLOW_HOSTS="127.0.0.1",
                BRIDGE_MAX_IMAGE_BYTES=str(2 * 1024 * 1024),
            ),
            yach,
            "图片太大了（上限 2 MB），请压缩后再发。",
            payload,
        )
    finally:
        await images.close()
    assert texts == ["图片太大了（上限 2 MB），请压缩后再发。"]
    assert upstream.calls() == 0


async def test_no_failure_shows_a_traceback_or_a_secret(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(
        status(500, f"Traceback (most recent call last): key={KEY}"), status(500, "again")
    )
    texts = await ask_until(
        env(redis_url, bot_id, yach, upstream.base_url), yach, ZH["upstream_unavailable"]
    )
    assert_clean(texts)


async def test_an_answer_past_its_bound_is_cut_there_with_a_notice(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    """A model caught in a loop writes until its own limit: past BRIDGE_MAX_ANSWER_CHARS the
    upstream is left and the answer ends with a notice, not dozens of messages later."""
    bounded = env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_MAX_ANSWER_CHARS="300")
    with capture_logs() as logs:
        texts = await ask_until(bounded, yach, ZH["answer_too_long"])
    *answer, notice = texts
    assert notice == ZH["answer_too_long"]
    shown = "".join(answer)
    assert ANSWER.startswith(shown) and 100 <= len(shown) <= 300
    assert [e["kind"] for e in logs if e["event"] == "upstream_failed"] == ["too_long"]


async def test_hidden_reasoning_does_not_count_toward_the_answers_bound(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    """Reasoning that is not shown (BRIDGE_SHOW_REASONING=off) is no part of the answer's
    length: counted, a model that thought past the bound was cut before its answer, and the
    group got its thoughts (shown when no answer came) and the notice instead."""
    answer = "The short answer. Done."
    thinking = "<think>" + "thinking hard. " * 40 + "</think>\n\n"
    upstream.script.then(sse_reply(chunks_for(thinking + answer), upstream.rng))
    bounded = env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_MAX_ANSWER_CHARS="300")
    async with running_bridge(bounded) as bridge:
        assert (await bridge.post(group_message("question")))[0] == 200
        await wait_until(lambda: "".join(yach.texts()) == answer)
        await asyncio.sleep(0.3)
    assert yach.texts() == [answer]
