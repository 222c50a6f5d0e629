"""What the group sees where an upstream's text or a user's command is unusual: an emoji
whose UTF-16 halves arrive in two deltas, an answer that is reasoning and a blank line, a
command typed with fullwidth punctuation (SPEC §4, §5, §8)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from bridge.messages import MESSAGES
from tests.fakes.scripted import sse_reply
from tests.fakes.yach import FakeYach
from tests.harness import group_message, running_bridge, wait_until
from tests.integration.test_failures_user_facing import ScriptedOpenAI, env

ZH = MESSAGES["zh"]


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedOpenAI]:
    fake = await ScriptedOpenAI().start()
    yield fake
    await fake.close()


def deltas(*parts: str | dict[str, str]) -> bytes:
    """A chat-completions stream whose deltas are `parts` (a string is `content`), written
    as escaped JSON the way servers with `ensure_ascii` write it: an emoji as a surrogate
    pair, each half of which may end up in a delta of its own."""
    out = []
    for part in parts:
        delta = {"content": part} if isinstance(part, str) else part
        out.append(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n")
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def halves(char: str) -> tuple[str, str]:
    """The two UTF-16 surrogates of a character outside the BMP, as two 1-character strings."""
    units = char.encode("utf-16-le")
    return units[:2].decode("utf-16-le", "surrogatepass"), units[2:].decode(
        "utf-16-le", "surrogatepass"
    )


async def ask(env: dict[str, str], yach: FakeYach, text: str = "question") -> list[str]:
    """Ask once; what the group shows once the entry is acknowledged."""
    async with running_bridge(env) as bridge:
        assert (await bridge.post(group_message(text)))[0] == 200
        redis, inbox = bridge.bridge.redis, bridge.bridge.keys.inbox
        assert redis is not None

        async def pending() -> int:
            return int((await redis.xpending(inbox, "workers"))["pending"])

        await wait_until(lambda: bool(yach.shown))
        for _ in range(100):
            if not await pending():
                break
            await asyncio.sleep(0.05)
        assert await pending() == 0
        await asyncio.sleep(0.2)  # anything more would show by now
    return yach.texts()


@pytest.mark.parametrize("mode", ["stream", "final"])
async def test_an_emoji_split_between_two_deltas_shows_whole(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    mode: str,
) -> None:
    high, low = halves("😀")
    lone_high, _ = halves("🎉")
    upstream.script.then(sse_reply(
        deltas(f"Hi {high}", f"{low} there, 你好", f"{lone_high}", "！"), upstream.rng
    ))  # fmt: skip
    with capture_logs() as logs:
        texts = await ask(env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_REPLY_MODE=mode),
                          yach)  # fmt: skip
    assert "".join(texts) == "Hi 😀 there, 你好\ufffd！"  # a half without its pair: U+FFFD
    assert not [e for e in logs if e["log_level"] == "error"]
    assert upstream.calls() == 1


@pytest.mark.parametrize("reasoning", [
    ("<think>I reason", " about it</think>"),  # inline, the blank line in a delta of its own
    ({"reasoning_content": "I reason"}, {"reasoning_content": " about it"}),
], ids=["think-block", "reasoning_content"])  # fmt: skip
@pytest.mark.parametrize("mode", ["stream", "final"])
async def test_reasoning_then_a_blank_line_shows_the_reasoning_not_empty_answer(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    reasoning: tuple[str | dict[str, str], ...], mode: str,
) -> None:
    """SPEC §4: a turn that ends with reasoning but no answer text shows the reasoning,
    quoted, rather than nothing; blank space after it is no answer text."""
    upstream.script.then(sse_reply(deltas(*reasoning, "\n\n"), upstream.rng))
    texts = await ask(env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_REPLY_MODE=mode),
                      yach)  # fmt: skip
    assert texts == ["> I reason about it"]


async def test_blank_space_before_the_answer_is_kept_with_it(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object
) -> None:
    upstream.script.then(sse_reply(deltas("  ", "    code line", "\n\nDone."), upstream.rng))
    texts = await ask(env(redis_url, bot_id, yach, upstream.base_url), yach)
    assert "".join(texts) == "      code line\n\nDone."


@pytest.mark.parametrize("parts", [
    ("<think>I reason</think>\n\nThe answer.",),
    ("<think>I reason</think>", "\n\n", "The answer."),
    ("<think>I reason</think>", "\n", "\nThe answer."),
], ids=["one-delta", "own-delta", "split"])  # fmt: skip
async def test_the_line_breaks_after_a_think_block_are_not_shown_however_chunked(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    parts: tuple[str, ...],
) -> None:
    upstream.script.then(sse_reply(deltas(*parts), upstream.rng))
    texts = await ask(env(redis_url, bot_id, yach, upstream.base_url,
                          BRIDGE_YACH_MSG_FORMAT="text"), yach)  # fmt: skip
    assert texts == ["The answer."]


@pytest.mark.parametrize(("command", "reply"), [
    ("帮助？", ZH["help"]),
    ("停止？", ZH["nothing_to_stop"]),
    ("／ｓｔａｔｕｓ", ZH["status_none"].format(upstream="openai", queue=0)),
    ("/help?", ZH["help"]),
    ("重置～", ZH["reset_done"]),
])  # fmt: skip
async def test_a_command_typed_with_fullwidth_punctuation_is_a_command(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, redis_client: object,
    command: str, reply: str,
) -> None:
    texts = await ask(env(redis_url, bot_id, yach, upstream.base_url), yach, command)
    assert texts == [reply]
    assert upstream.calls() == 0  # not sent to the AI as a question
