"""Webhooks as a real Yach, or a careless operator, sends them (SPEC §4, §8): numbers where
strings are usual, extra and null fields, names in any script, a mention alone or in the
middle, a picture, a markdown message, a voice message, a direct chat, text at the input
limit. Each is acknowledged `200 {"code":200,"msg":"ok"}` and ends in exactly one message:
the answer, or one short notice of the bot's own. And an answer longer than one Yach
message reaches the group in pieces within SPEC's 5000 code points, joined the answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.messages import Catalogue
from tests.fakes import yach as fake_yach
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import (
    RunningBridge,
    bridge_env,
    group_message,
    openai_env,
    running_bridge,
    wait_until,
)

ZH = Catalogue("zh")
APP = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}


def answer(question: str) -> str:
    return f"You said: {question}. (history: 0 messages)"


def without(message: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key not in names}


def direct(text: str, **extra: Any) -> dict[str, Any]:
    return {"msgId": uuid.uuid4().hex, "msgtype": "text", "text": {"content": text},
            "senderId": "u-direct", "senderNick": "Dana", "senderStaffId": "W-D",
            "conversationType": "1", **extra}


@dataclass(frozen=True)
class Case:
    payload: Callable[[FakeYach], dict[str, Any]]
    shows: str  # the one message the chat shows
    route: str = "robot"
    mention: bool = True  # whether it mentions the asker (W001, or `work_code`)
    work_code: str = "W001"
    env: dict[str, str] = field(default_factory=dict)
    pieces: int = 1  # an answer over 5000 code points comes in more


CASES = {
    "numbers-not-strings": Case(
        lambda _: {"msgId": 912345678901, "msgtype": "text", "text": {"content": "@bot 数字"},
                   "senderId": 42, "senderStaffId": 7, "conversationId": 99,
                   "conversationType": 2, "createAt": 1764400000000},
        answer("数字"), work_code="7"),
    "extra-and-null-fields": Case(
        lambda _: {**group_message("extra"), "atUsers": [{"staffId": "W001"}],
                   "isInAtList": True, "chatbotUserId": "bot-1", "robotCode": None,
                   "sessionWebhook": None, "createAt": None, "senderNick": None},
        answer("extra")),
    "unicode-names-and-ids": Case(
        lambda _: group_message("名字", sender="用户🙂", group="群·一", work_code="工号１",
                                senderNick="张三 \u202eevil\u202c 🙂"),
        answer("名字"), work_code="工号１"),
    "mention-in-the-middle": Case(  # only the leading mention is the bot's (SPEC §4)
        lambda _: {**group_message("x"), "text": {"content": "请问 @bot 1加1"}},
        answer("请问 @bot 1加1")),
    "only-the-mention": Case(
        lambda _: {**group_message("x"), "text": {"content": "@bot"}},
        ZH("unsupported_type")),
    "only-the-mention-and-a-wide-space": Case(
        lambda _: {**group_message("x"), "text": {"content": "@机器人\u2005 \n"}},
        ZH("unsupported_type")),
    "text-as-a-plain-string": Case(
        lambda _: {**group_message("x"), "text": "@bot plain"}, answer("plain")),
    "no-msgtype": Case(lambda _: without(group_message("untyped"), "msgtype"),
                       answer("untyped")),
    "markdown-message": Case(
        lambda _: {**without(group_message("x"), "text"), "msgtype": "markdown",
                   "markdown": {"title": "问", "text": "@bot **粗体**"}},
        answer("**粗体**")),
    "picture-refused": Case(
        lambda _: {**group_message(""), "msgtype": "image",
                   "image": {"url": "https://img.example/a.png"}},
        ZH("image_refused"), env={"BRIDGE_IMAGE_PIPELINE": "none"}),
    "voice": Case(lambda _: {**without(group_message("x"), "text"), "msgtype": "voice",
                             "voice": {"duration": 3}},
                  ZH("unsupported_type")),
    "file-with-a-text-field": Case(
        lambda _: {**group_message("report.pdf"), "msgtype": "file"}, ZH("unsupported_type")),
    "exactly-the-input-limit": Case(
        lambda _: group_message("一句话。" * 2000), answer("一句话。" * 2000), pieces=2),
    "one-over-the-input-limit": Case(
        lambda _: group_message("长" * 8001),
        ZH("input_too_long", length=8001, limit=8000)),
    "direct-chat-app-api": Case(
        lambda _: direct("你好"), answer("你好"), route="single", mention=False, env=APP),
    "direct-chat-with-a-mention-and-a-conversation-id": Case(
        lambda _: direct("@bot 你好", conversationId="cid-direct"), answer("你好"),
        route="single", mention=False, env=APP),
    "direct-chat-session-webhook": Case(
        lambda yach: direct("hi", sessionWebhook=yach.session_webhook("s-d")), answer("hi"),
        route="session", mention=False),
    "group-without-a-work-code": Case(
        lambda _: without(group_message("anon"), "senderStaffId"), answer("anon"),
        mention=False),
}


async def settled(bridge: RunningBridge, yach: FakeYach) -> None:
    """Something showed and every stored entry was answered and acknowledged (deleted)."""
    redis = bridge.bridge.redis
    assert redis is not None
    await wait_until(lambda: len(yach.shown) >= 1)
    for _ in range(500):
        if await redis.xlen(bridge.bridge.keys.inbox) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the inbox was not drained")


@pytest.mark.parametrize("name", list(CASES))
async def test_each_payload_ends_in_one_message(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    name: str,
) -> None:
    case = CASES[name]
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), **case.env)
    async with running_bridge(env) as bridge:
        status, body = await bridge.post(case.payload(yach))
        assert (status, body) == (200, {"code": 200, "msg": "ok"})
        await settled(bridge, yach)
    assert len(yach.shown) == case.pieces
    assert "".join(yach.texts()) == case.shows
    assert all(len(text) <= 5000 for text in yach.texts())
    assert {shown.route for shown in yach.shown} == {case.route}
    first = yach.shown[0].message
    if case.mention:
        assert first["at"] == {"atWorkCodes": [case.work_code]}
    else:
        assert "at" not in first
    assert all("at" not in shown.message for shown in yach.shown[1:])


LONG_ANSWER = "\n\n".join(
    f"第{n}段：这是一个很长的回答。🙂 It has English sentences too, with words that must "
    f"never be cut in half. {'句子继续写下去，' * 12}到这里结束。" for n in range(80)
)


@pytest.mark.parametrize(("mode", "msg_format"), [
    ({"BRIDGE_REPLY_MODE": "final"}, "markdown"),
    ({"BRIDGE_REPLY_MODE": "final"}, "text"),
    ({"BRIDGE_REPLY_MODE": "stream", "BRIDGE_FLUSH_MIN_CHARS": "6000",
      "BRIDGE_FLUSH_MAX_WAIT_S": "600"}, "markdown"),
], ids=["final-markdown", "final-text", "stream-buffering-past-the-limit"])
async def test_an_answer_longer_than_a_message_comes_in_pieces_within_the_limit(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object,
    mode: dict[str, str], msg_format: str,
) -> None:
    """SPEC §4: at most 5000 Unicode code points of the text field per message (an emoji is
    one, though two UTF-16 units), split at paragraph then sentence boundaries; the first
    piece alone mentions the asker; joined, the pieces are the answer."""
    assert len(LONG_ANSWER) > 3 * 5000 and len(LONG_ANSWER.encode("utf-16-le")) // 2 > len(
        LONG_ANSWER)
    upstream = await FakeOpenAI(answer=lambda body: LONG_ANSWER, delay_s=0).start()
    try:
        env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), **APP,
                         BRIDGE_YACH_MSG_FORMAT=msg_format, **mode)
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("long")))[0] == 200
            await wait_until(lambda: "".join(yach.texts()) == LONG_ANSWER)
    finally:
        await upstream.close()
    texts = yach.texts()
    assert len(texts) >= 4
    assert all(len(text) <= 5000 for text in texts)
    assert all(text.endswith("到这里结束。") or text.endswith("到这里结束。\n\n")
               for text in texts[:-1])  # cut at paragraph ends
    assert {shown.message["msgtype"] for shown in yach.shown} == {msg_format}
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W001"]}
    assert all("at" not in shown.message for shown in yach.shown[1:])
    assert len({shown.message_id for shown in yach.shown}) == len(texts)
