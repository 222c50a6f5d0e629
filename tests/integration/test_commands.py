"""/help /reset /stop /status and their Chinese aliases (SPEC §5), answered at once; /stop
really closes the upstream stream and nothing more of that answer is sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge.messages import MESSAGES
from tests.fakes import yach as fake_yach
from tests.fakes.base import FakeServer, stream_bytes
from tests.fakes.dify import CONVERSATION_ID, DifyFake
from tests.fakes.openai import ChatCompletionsFake, FakeOpenAI, chunks_for, echo_answer
from tests.fakes.yach import FakeYach
from tests.harness import (
    RunningBridge,
    bridge_env,
    group_message,
    openai_env,
    running_bridge,
    wait_until,
)

ZH = MESSAGES["zh"]
WORDS = 400


class SlowOpenAI(ChatCompletionsFake):
    """An OpenAI-compatible stream of `WORDS` words, one every `delay_s`, that records
    whether the client went away before the end."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.server = FakeServer(web.Application())
        self.started = asyncio.Event()
        self.closed_early = asyncio.Event()
        self.finished = asyncio.Event()


    @staticmethod
    def _chunk(content: str) -> bytes:
        payload = {"object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": content}}]}
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.started.set()
        try:
            for i in range(WORDS):
                await response.write(self._chunk(f"word{i}. " if i % 5 == 4 else f"word{i} "))
                await asyncio.sleep(self.delay_s)
            await response.write(b"data: [DONE]\n\n")
            self.finished.set()
        except (ConnectionError, asyncio.CancelledError):
            self.closed_early.set()
            raise
        return response



@pytest.fixture
async def slow() -> AsyncIterator[SlowOpenAI]:
    fake = await SlowOpenAI().start()
    yield fake
    await fake.close()


@pytest.fixture
async def echo() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.close()


def env(redis_url: str, bot_id: str, yach: FakeYach, base_url: str, **extra: str) -> dict[str, str]:
    return bridge_env(redis_url, bot_id, yach, **openai_env(base_url),
                      BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                      BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
                      BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="40", **extra)


async def say(bridge: RunningBridge, text: str, **fields: Any) -> None:
    status, _ = await bridge.post(group_message(text, **fields))
    assert status == 200


@pytest.mark.parametrize(("lang", "text"), [("zh", "/help"), ("zh", "帮助"), ("en", "/help")])
async def test_help_in_the_configured_language(redis_url: str, bot_id: str, yach: FakeYach,
                                               echo: FakeOpenAI, redis_client: object,
                                               lang: str, text: str) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, echo.base_url,
                                  BRIDGE_LANG=lang)) as bridge:
        await say(bridge, text)
        await wait_until(lambda: len(yach.shown) == 1)
    assert yach.texts() == [MESSAGES[lang]["help"]]
    assert echo.bodies == []  # a command never reaches the upstream


# `@bot /stop　@小助手`: the bot's mention picked after the command too, past a fullwidth space
@pytest.mark.parametrize("command", ["/stop", "停止", "/stop\u3000@小助手"])
async def test_stop_closes_the_upstream_stream_and_sends_nothing_more(
    redis_url: str, bot_id: str, yach: FakeYach, slow: SlowOpenAI, redis_client: object,
    command: str
) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, slow.base_url)) as bridge:
        await say(bridge, "tell me a long story")
        await wait_until(lambda: len(yach.shown) >= 2)  # the answer is flowing
        await say(bridge, command)
        await wait_until(lambda: ZH["stopped"] in yach.texts())
        await asyncio.wait_for(slow.closed_early.wait(), timeout=5)
        settled = len(yach.shown)
        await asyncio.sleep(0.5)
        assert len(yach.shown) == settled
        assert not slow.finished.is_set()
        stopped_answer = "".join(t for t in yach.texts() if t != ZH["stopped"])
        # the stopped entry is done with: the session takes the next question
        await say(bridge, "next question")
        await wait_until(lambda: len(slow.server.requests) == 2)
        await say(bridge, "/stop")
        await wait_until(lambda: yach.texts().count(ZH["stopped"]) == 2)
    assert stopped_answer.startswith("word0 word1 ")
    assert "word399" not in stopped_answer


async def test_stop_reaches_the_turn_while_the_process_has_no_room_for_more_turns(
    redis_url: str, bot_id: str, yach: FakeYach, slow: SlowOpenAI, echo: FakeOpenAI,
    redis_client: object
) -> None:
    """BRIDGE_WORKERS=1: the one turn slot runs a long answer and seven other sessions'
    questions wait for it, more than the process reads ahead. `/stop` is not a turn: it is
    read and carried out at once, not after the answer it was sent to stop."""
    extra = {"BRIDGE_WORKERS": "1", "BRIDGE_SESSION_QUEUE_MAX": "5", "BRIDGE_DRAIN_TIMEOUT_S": "1"}
    async with running_bridge(env(redis_url, bot_id, yach, slow.base_url, **extra)) as bridge:
        await say(bridge, "tell me a long story")
        await wait_until(lambda: len(yach.shown) >= 1)  # the answer is flowing
        for n in range(7):
            await say(bridge, f"question {n}", sender=f"other{n}")
        await asyncio.sleep(0.3)
        await say(bridge, "/stop")
        await wait_until(lambda: ZH["stopped"] in yach.texts(), timeout=3)
        await asyncio.wait_for(slow.closed_early.wait(), timeout=3)
        assert ZH["nothing_to_stop"] not in yach.texts()


async def test_stop_with_nothing_running(redis_url: str, bot_id: str, yach: FakeYach,
                                         echo: FakeOpenAI, redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, echo.base_url)) as bridge:
        await say(bridge, "/stop")
        await wait_until(lambda: len(yach.shown) == 1)
    assert yach.texts() == [ZH["nothing_to_stop"]]


async def test_status_is_answered_while_a_turn_runs(redis_url: str, bot_id: str,
                                                    yach: FakeYach, slow: SlowOpenAI,
                                                    redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, slow.base_url)) as bridge:
        await say(bridge, "a long one")
        await asyncio.wait_for(slow.started.wait(), timeout=5)
        await say(bridge, "状态")
        await wait_until(lambda: any(t.startswith("上游：openai") for t in yach.texts()))
        assert not slow.finished.is_set()  # not queued behind the running turn
        await say(bridge, "/stop")
        await wait_until(lambda: ZH["stopped"] in yach.texts())
    status = next(t for t in yach.texts() if t.startswith("上游"))
    assert "排队消息：" in status


async def test_status_after_turns(redis_url: str, bot_id: str, yach: FakeYach,
                                  echo: FakeOpenAI, redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, echo.base_url,
                                  BRIDGE_LANG="en")) as bridge:
        await say(bridge, "one")
        await wait_until(lambda: len(yach.shown) == 1)
        await say(bridge, "two")
        await wait_until(lambda: len(yach.shown) == 2)
        await say(bridge, "/status")
        await wait_until(lambda: len(yach.shown) == 3)
    assert yach.texts()[2] == "Upstream: openai\nSession age: 0 min\nTurns: 2\nQueued: 0"


@pytest.mark.parametrize("command", ["/reset", "/new", "重置", "新对话"])
async def test_reset_forgets_the_conversation(redis_url: str, bot_id: str, yach: FakeYach,
                                              echo: FakeOpenAI, redis_client: object,
                                              command: str) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, echo.base_url)) as bridge:
        for count, text in enumerate(["first", "second", command, "third"], start=1):
            await say(bridge, text)
            await wait_until(lambda count=count: len(yach.shown) == count)  # type: ignore[misc]
    assert yach.texts() == [
        "You said: first. (history: 0 messages)",
        "You said: second. (history: 2 messages)",
        ZH["reset_done"],
        "You said: third. (history: 0 messages)",
    ]


async def test_reset_deletes_the_upstream_conversation(redis_url: str, bot_id: str,
                                                      yach: FakeYach,
                                                      redis_client: object) -> None:
    async with DifyFake() as dify, running_bridge(
        bridge_env(redis_url, bot_id, yach, **dify.env())
    ) as bridge:
        await say(bridge, "first")
        await wait_until(lambda: len(yach.shown) == 1)
        await say(bridge, "/reset")
        await wait_until(lambda: len(yach.shown) == 2)
        assert dify.deleted == [(CONVERSATION_ID, "yach:g:g1:u:u1")]
        await say(bridge, "again")
        await wait_until(lambda: len(yach.shown) == 3)
        assert [r.json()["conversation_id"] for r in dify.server.on("/v1/chat-messages")] == [
            "", ""  # the second question starts a fresh conversation
        ]
    assert yach.texts()[1] == ZH["reset_done"]


class EchoUnlessSlow(ChatCompletionsFake):
    """`echo_answer` at once; a question starting with "slow" streams one word, then holds
    until the client goes away."""

    def __init__(self) -> None:
        self.server = FakeServer(web.Application())
        self.holding = asyncio.Event()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body["messages"][-1]["content"].startswith("slow"):
            return await stream_bytes(request, [chunks_for(echo_answer(body))], delay_s=0)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SlowOpenAI._chunk("word "))
        self.holding.set()
        await asyncio.Event().wait()  # until cancelled: the bridge closed the stream
        return response


async def test_reset_a_message_queued_before_it_starts_afresh(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    """A question queued behind the running turn when `/reset` comes: it starts once the
    reset is done, in the new conversation, and the old one is not written back."""
    fake = await EchoUnlessSlow().start()
    try:
        async with running_bridge(env(redis_url, bot_id, yach, fake.base_url)) as bridge:
            await say(bridge, "first")
            await wait_until(lambda: len(yach.shown) == 1)
            await say(bridge, "slow one")
            await asyncio.wait_for(fake.holding.wait(), timeout=5)
            await say(bridge, "queued")
            await say(bridge, "/reset")
            await wait_until(lambda: len(yach.shown) == 3)
            await say(bridge, "after")
            await wait_until(lambda: len(yach.shown) == 4)
    finally:
        await fake.close()
    assert sorted(yach.texts()[1:3]) == sorted(
        [ZH["reset_done"], "You said: queued. (history: 0 messages)"]
    )
    assert yach.texts()[3] == "You said: after. (history: 2 messages)"


async def test_reset_stops_the_running_turn_first(redis_url: str, bot_id: str, yach: FakeYach,
                                                  slow: SlowOpenAI, redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, slow.base_url)) as bridge:
        await say(bridge, "a long one")
        await wait_until(lambda: len(yach.shown) >= 1)
        await say(bridge, "/new")
        await wait_until(lambda: ZH["reset_done"] in yach.texts())
        assert slow.closed_early.is_set()  # confirmed once the turn has stopped
        settled = len(yach.shown)
        await asyncio.sleep(0.3)
        assert len(yach.shown) == settled
