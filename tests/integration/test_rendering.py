"""The answer as the group sees it, end to end on loopback against the fake Yach.

For each recorded fixture the pieces the group receives join to the full answer and none is
cut inside a fence or a word; the first piece mentions the asker; reasoning, hand-offs,
follow-ups and corrections render as SPEC §4 says; the thinking notice shows only when the
upstream is slow.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from tests.fakes import coze as fake_coze
from tests.fakes import dify as fake_dify
from tests.fakes import yach as fake_yach
from tests.fakes.aimaster import FakeAimaster
from tests.fakes.coze import CozeFake
from tests.fakes.dify import DifyFake
from tests.fakes.hiagent import APP_KEY as HIAGENT_APP_KEY
from tests.fakes.hiagent import HiAgentFake
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

HIAGENT_ANSWER = (
    "OpenStack 是一个开源的云计算管理平台项目，它提供了一系列的软件工具来构建和管理公有云和"
    "私有云环境。OpenStack 的核心组件包括计算（Nova）、网络（Neutron）、存储（Cinder 和 Swift）"
    "、身份认证（Keystone）、镜像服务（Glance）等。它被广泛用于企业级云基础设施的部署和管理。"
)
AIMASTER_ANSWER = (
    "@企业变更助手 企业迁址所需材料的清单。\n\n→ 转由「企业变更助手」回答\n\n"
    "> 好,我需要处理用户关于苏州工业园区公司迁址所需材料"
)
APP = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}
STREAM = {"BRIDGE_REPLY_MODE": "stream", "BRIDGE_FLUSH_MIN_CHARS": "20",
          "BRIDGE_FLUSH_MAX_WAIT_S": "30"}



def env_for(redis_url: str, bot_id: str, yach: FakeYach, upstream: dict[str, str],
            **extra: str) -> dict[str, str]:
    return bridge_env(redis_url, bot_id, yach, **APP, **upstream, **extra)


def joined(yach: FakeYach) -> str:
    return "".join(yach.texts())


def assert_well_cut(pieces: list[str]) -> None:
    for piece in pieces:
        assert len(re.findall(r"^ {0,3}```", piece, re.MULTILINE)) % 2 == 0, piece
    for piece, following in itertools.pairwise(pieces):
        assert not (piece[-1].isascii() and piece[-1].isalnum()
                    and following[0].isascii() and following[0].isalnum()), (piece, following)


async def ask(bridge: Any, yach: FakeYach, text: str = "你知道OVS吗？", count: int = 1,
              **fields: Any) -> None:
    status, _ = await bridge.post(group_message(text, **fields))
    assert status == 200
    await wait_until(lambda: len(yach.shown) >= count)


# Recorded fixtures


@pytest.mark.parametrize("mode", [STREAM, {"BRIDGE_REPLY_MODE": "final"}], ids=["stream", "final"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_hiagent_fixture_reaches_the_group_whole(redis_url: str, bot_id: str,
                                                       yach: FakeYach, redis_client: object,
                                                       mode: dict[str, str], seed: int) -> None:
    fake = await HiAgentFake.start(seed=seed)
    upstream = {"BRIDGE_UPSTREAM": "hiagent", "BRIDGE_HIAGENT_BASE_URL": fake.url,
                "BRIDGE_HIAGENT_APP_KEY": HIAGENT_APP_KEY}
    try:
        async with running_bridge(env_for(redis_url, bot_id, yach, upstream, **mode)) as bridge:
            await ask(bridge, yach)
            await wait_until(lambda: joined(yach) == HIAGENT_ANSWER)
    finally:
        await fake.close()
    pieces = yach.texts()
    assert_well_cut(pieces)
    if mode is STREAM:
        assert len(pieces) > 1
        assert all(piece.endswith("。") for piece in pieces)  # cut at CJK sentence ends
    else:
        assert pieces == [HIAGENT_ANSWER]
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W001"]}
    assert all("at" not in shown.message for shown in yach.shown[1:])


@pytest.mark.parametrize("mode", [STREAM, {"BRIDGE_REPLY_MODE": "final"}], ids=["stream", "final"])
async def test_aimaster_fixture_hand_off_and_reasoning_only_part(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object, mode: dict[str, str]
) -> None:
    fake = await FakeAimaster(seed=3).start()
    upstream = {"BRIDGE_UPSTREAM": "aimaster", "BRIDGE_AIMASTER_BASE_URL": fake.base_url,
                "BRIDGE_AIMASTER_TOKEN": "aimaster-token",
                "BRIDGE_AIMASTER_SCENARIO_ID": "e6e822e47fa24ca380f8d2d09eb114a7"}
    try:
        async with running_bridge(env_for(redis_url, bot_id, yach, upstream, **mode)) as bridge:
            await ask(bridge, yach, "企业迁址需要什么材料?")
            await wait_until(lambda: joined(yach).rstrip() == AIMASTER_ANSWER)
    finally:
        await fake.close()
    assert_well_cut(yach.texts())
    assert joined(yach).count("企业变更助手」回答") == 1  # one line, the first agent none


async def test_a_long_markdown_answer_is_cut_only_at_safe_places(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    answer = (
        "Here is an overview of the approach. " * 6 + "\n\n"
        "```python\ndef solve(x):\n    # step one. step two.\n\n    return x * 2\n```\n\n"
        + "| step | note |\n|---|---|\n| one | first. ok |\n| two | second |\n\n"
        + "- a list item. with two sentences\n- another item here\n\n"
        + "Finally, some closing words to end the answer properly. " * 4
    )
    upstream = await FakeOpenAI(answer=lambda body: answer).start()
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url), **STREAM)
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "explain")
            await wait_until(lambda: joined(yach) == answer)
    finally:
        await upstream.close()
    pieces = yach.texts()
    assert len(pieces) > 3
    assert_well_cut(pieces)
    table_pieces = [p for p in pieces if "|---|" in p]
    assert len(table_pieces) == 1 and "| two | second |" in table_pieces[0]


# Rendering


@pytest.mark.parametrize(("msg_format", "msgtype"), [("markdown", "markdown"), ("text", "text")])
async def test_message_format(redis_url: str, bot_id: str, yach: FakeYach, redis_client: object,
                              msg_format: str, msgtype: str) -> None:
    upstream = await FakeOpenAI().start()
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url),
                      BRIDGE_YACH_MSG_FORMAT=msg_format)
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "hi")
    finally:
        await upstream.close()
    shown = yach.shown[0]
    assert shown.route == "app" and shown.to == "g1"
    assert shown.message["msgtype"] == msgtype
    assert shown.text == "You said: hi. (history: 0 messages)"
    assert shown.message["at"] == {"atWorkCodes": ["W001"]}


@pytest.mark.parametrize(("show", "expected"), [
    ("quote", "> Weighing the options.\n> Done.\n\nThe answer is 42."),
    ("off", "The answer is 42."),
])
async def test_reasoning_is_quoted_only_with_quote(redis_url: str, bot_id: str, yach: FakeYach,
                                                   redis_client: object, show: str,
                                                   expected: str) -> None:
    answer = "<think>Weighing the options.\nDone.</think>The answer is 42."
    upstream = await FakeOpenAI(answer=lambda body: answer).start()
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url),
                      BRIDGE_SHOW_REASONING=show)
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "question")
    finally:
        await upstream.close()
    assert yach.texts() == [expected]


async def test_coze_follow_ups_are_a_short_list_after_the_answer(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    fake = await CozeFake.start(seed=4)
    upstream = {"BRIDGE_UPSTREAM": "coze", "BRIDGE_COZE_BASE_URL": fake.url,
                "BRIDGE_COZE_TOKEN": fake_coze.TOKEN, "BRIDGE_COZE_BOT_ID": fake_coze.BOT_ID}
    try:
        async with running_bridge(env_for(redis_url, bot_id, yach, upstream)) as bridge:
            await ask(bridge, yach, "薛之谦")
    finally:
        await fake.close()
    listed = "\n".join(f"- {item}" for item in fake_coze.FOLLOW_UPS)
    assert yach.texts() == [f"{fake_coze.ANSWER}\n\n你还可以问：\n{listed}"]


async def test_a_dify_replacement_after_sent_pieces_is_one_correction(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    fake = await DifyFake.start(seed=5)
    fake.stream = fake_dify.render(fake_dify.replaced("内容不合规，已被替换。"))
    upstream = {"BRIDGE_UPSTREAM": "dify", "BRIDGE_DIFY_BASE_URL": fake.base_url,
                "BRIDGE_DIFY_API_KEY": fake_dify.API_KEY}
    policy = {**STREAM, "BRIDGE_FLUSH_MIN_CHARS": "5"}
    try:
        async with running_bridge(env_for(redis_url, bot_id, yach, upstream, **policy)) as bridge:
            await ask(bridge, yach, "333", count=2)
            await wait_until(lambda: any("更正" in text for text in yach.texts()))
    finally:
        await fake.close()
    texts = yach.texts()
    assert texts[0] == 'It looks like you\'ve typed "333". '  # sent before the replacement
    assert texts[-1] == "更正：\n内容不合规，已被替换。"
    assert sum("更正" in text for text in texts) == 1



@pytest.mark.parametrize("mode", [STREAM, {"BRIDGE_REPLY_MODE": "final"}], ids=["stream", "final"])
async def test_a_dify_replacement_repeating_a_think_block_leaks_no_reasoning(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object, mode: dict[str, str]
) -> None:
    """A reasoning model behind Dify streams `<think>…</think>` then the answer; a
    `message_replace` that repeats the whole text unchanged is no contradiction, and its
    `<think>` block is reasoning there too: neither a correction nor raw tags are shown."""
    think, answer = "<think>Let me weigh it.</think>\n\n", "Yes. 333 is a number. It is odd. "
    fake = await DifyFake.start(seed=6)
    fake.stream = fake_dify.render([
        fake_dify.event("message", answer=think),
        fake_dify.event("message", answer="Yes. 333 is a number. "),
        fake_dify.event("message", answer="It is odd. "),
        fake_dify.event("message_replace", answer=think + answer),
        fake_dify.end(),
    ])
    upstream = {"BRIDGE_UPSTREAM": "dify", "BRIDGE_DIFY_BASE_URL": fake.base_url,
                "BRIDGE_DIFY_API_KEY": fake_dify.API_KEY}
    policy = {**mode, "BRIDGE_FLUSH_MIN_CHARS": "5"}
    try:
        async with running_bridge(env_for(redis_url, bot_id, yach, upstream, **policy)) as bridge:
            await ask(bridge, yach, "333")
            await ask(bridge, yach, "again")  # the session's next turn: the first has ended
            await wait_until(lambda: joined(yach).count("It is odd.") == 2)
    finally:
        await fake.close()
    assert joined(yach).replace(" ", "") == (answer * 2).replace(" ", "")
    assert not any("think" in text or "更正" in text for text in yach.texts())


async def test_the_thinking_notice_shows_only_when_the_upstream_is_slow(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    upstream = await FakeOpenAI(first_byte_delay_s=0.8).start()
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url),
                      BRIDGE_THINKING_NOTICE_S="0.3")
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "slow", count=2)
            upstream.first_byte_delay_s = 0.0
            await ask(bridge, yach, "fast", count=3)
            await bridge.post(group_message("fast again"))
            await wait_until(lambda: len(yach.shown) >= 4)
    finally:
        await upstream.close()
    texts = yach.texts()
    assert texts[0] == "正在思考，请稍候……"
    assert texts[1].startswith("You said: slow.")
    assert yach.shown[1].message["at"] == {"atWorkCodes": ["W001"]}  # the answer's own first
    assert texts[2].startswith("You said: fast.") and texts[3].startswith("You said: fast again")
    assert texts.count("正在思考，请稍候……") == 1


async def test_the_thinking_timer_counts_the_connect(redis_url: str, bot_id: str,
                                                     yach: FakeYach,
                                                     redis_client: object) -> None:
    """A slow connect (headers late) counts: the timer starts with the turn."""
    upstream = await FakeOpenAI(first_byte_delay_s=0.6).start()
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url),
                      BRIDGE_THINKING_NOTICE_S="0.2", BRIDGE_LANG="en")
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "hello", count=2)
    finally:
        await upstream.close()
    assert yach.texts()[0] == "Thinking…"


async def test_a_thinking_notice_on_its_way_shows_before_the_answer(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    """The notice went out just before the first token, and its send is retried (the
    platform failed it once): the answer's pieces wait for it rather than overtake it."""
    answer = "Hello there. " + "and so on " * 30 + "the end."
    upstream = await FakeOpenAI(answer=lambda body: answer, first_byte_delay_s=0.3,
                                delay_s=0.005).start()
    yach.fail_next(500)  # the notice's first try; its retry comes 0.5 s later
    try:
        env = env_for(redis_url, bot_id, yach, openai_env(upstream.base_url),
                      **{**STREAM, "BRIDGE_FLUSH_MIN_CHARS": "5"}, BRIDGE_THINKING_NOTICE_S="0.2",
                      BRIDGE_LANG="en")
        async with running_bridge(env) as bridge:
            await ask(bridge, yach, "hello")
            await wait_until(lambda: joined(yach).endswith("the end."))
    finally:
        await upstream.close()
    texts = yach.texts()
    assert texts[0] == "Thinking…", texts
    assert "".join(texts[1:]) == answer
    assert yach.shown[1].message["at"] == {"atWorkCodes": ["W001"]}
