"""A Dify `message_replace` that repeats an answer which began with a `<think>` block.

Reasoning models served through Dify stream their `<think>…</think>` block inside the answer,
and a `message_replace` repeats the answer as Dify holds it: the block included. The bridge
shows the block as reasoning, not as answer text (SPEC §7), so the repeat must be read the
same way: an unchanged repeat sends nothing more, and no raw `<think>` tag ever reaches the
group.
"""

from __future__ import annotations

from tests.fakes import dify as fake_dify
from tests.fakes.dify import DifyFake
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, running_bridge, wait_until

THINK = "<think>用户输入了数字，先想想。</think>\n\n"
PARTS = ("It looks like ", 'you\'ve typed "333". ', "数字有特别的含义吗？")
ANSWER = "".join(PARTS)
STREAM = {
    "BRIDGE_REPLY_MODE": "stream",
    "BRIDGE_FLUSH_MIN_CHARS": "5",
    "BRIDGE_FLUSH_MAX_WAIT_S": "30",
}


def stream(replacement: str) -> bytes:
    return fake_dify.render(
        [
            fake_dify.event("message", answer=THINK[:9]),
            fake_dify.event("message", answer=THINK[9:]),
            *(fake_dify.event("message", answer=part) for part in PARTS),
            fake_dify.event("message_replace", answer=replacement),
            fake_dify.end(),
        ]
    )


async def relayed(
    redis_url: str, bot_id: str, yach: FakeYach, replacement: str, **extra: str
) -> list[str]:
    fake = await DifyFake.start(seed=3)
    fake.stream = stream(replacement)
    env = bridge_env(
        redis_url,
        bot_id,
        yach,
        BRIDGE_UPSTREAM="dify",
        BRIDGE_DIFY_BASE_URL=fake.base_url,
        BRIDGE_DIFY_API_KEY=fake_dify.API_KEY,
        **STREAM,
        **extra,
    )
    try:
        async with running_bridge(env) as bridge:
            status, _ = await bridge.post(group_message("333"))
            assert status == 200
            await wait_until(lambda: bool(fake.server.on(fake_dify.PATH)) and bool(yach.texts()))
        # (leaving `running_bridge` drains: the turn finishes, every piece is sent)
    finally:
        await fake.close()
    return yach.texts()


async def test_an_unchanged_repeat_with_its_think_block_sends_nothing_more(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    texts = await relayed(redis_url, bot_id, yach, THINK + ANSWER)

    assert "".join(texts) == ANSWER
    assert not any("<think>" in text or "更正" in text for text in texts)


async def test_a_real_replacement_with_a_think_block_shows_only_its_answer(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    texts = await relayed(redis_url, bot_id, yach, THINK + "内容不合规，已被替换。")

    assert texts[-1] == "更正：\n内容不合规，已被替换。"
    assert not any("<think>" in text for text in texts)


async def test_a_repeat_does_not_count_twice_toward_the_answers_bound(
    redis_url: str, bot_id: str, yach: FakeYach
) -> None:
    """A replace is the whole answer so far: it sets the answer's length, it does not add to
    it (nor does the hidden reasoning). Added, this answer passed a bound it fits in."""
    bound = str(len(ANSWER) + 10)
    texts = await relayed(redis_url, bot_id, yach, THINK + ANSWER, BRIDGE_MAX_ANSWER_CHARS=bound)
    assert "".join(texts) == ANSWER
