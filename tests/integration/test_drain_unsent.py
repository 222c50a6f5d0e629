"""A drain's deadline cuts a turn short (SPEC §6), but what the turn had composed and not
sent yet — pieces waiting for the send budget, the text of a stream still coming — is
journalled before the turn lets go, so the next process sends it (SPEC §4: excess is queued,
never dropped). A turn whose upstream had answered in full gets no cut-off notice."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from bridge.messages import Catalogue
from bridge.store import Keys
from tests.fakes.openai import SCRIPTED_ANSWER, ScriptedOpenAI, chunks_for
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach
from tests.harness import bridge_env, group_message, running_bridge, wait_until
from tests.procs import wait_acknowledged

HEAD = "Whole sentence one. Half of a sentence"
CUT_OFF = Catalogue("en")("cut_off")


def _env(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: ScriptedOpenAI, send_rate: str
) -> dict[str, str]:
    # Every sentence a piece of its own; the drain gives running turns 0.3 s.
    return bridge_env(
        redis_url, bot_id, yach, **upstream.env(), BRIDGE_LANG="en",
        BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="0", BRIDGE_FLUSH_MAX_WAIT_S="0",
        BRIDGE_YACH_SEND_RATE=send_rate, BRIDGE_DRAIN_TIMEOUT_S="0.3", BRIDGE_CLAIM_IDLE_S="5",
    )  # fmt: skip


def _stalling(answer: str) -> bytes:
    """The answer's events, without the end (finish, usage, [DONE]): a stream that stalls."""
    events = chunks_for(answer).split(b"\n\n")
    return b"\n\n".join(events[:-4]) + b"\n\n"


def _words(texts: list[str]) -> str:
    return " ".join(" ".join(texts).split())


async def test_pieces_waiting_for_the_send_budget_at_the_drain_are_sent_by_the_next_process(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """Two sends per 3 s: the upstream has answered all 12 sentences when the drain comes,
    10 of them waiting for the budget. The next process sends those 10 (merged into one
    message as they waited) and no cut-off notice: the answer was whole."""
    async with ScriptedOpenAI() as upstream:
        env = _env(redis_url, bot_id, yach, upstream, send_rate="2/3")
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("q")))[0] == 200
            await wait_until(lambda: len(yach.shown) == 2, timeout=10)
        assert len(yach.shown) == 2
        async with running_bridge(env):
            await wait_acknowledged(redis_client, Keys(bot_id).inbox)
    texts = yach.texts()
    assert CUT_OFF not in texts
    assert _words(texts) == SCRIPTED_ANSWER
    assert len(texts) == 3


async def test_text_still_streaming_at_the_drain_is_sent_by_the_next_process_with_a_notice(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """The upstream stalls mid-sentence when the drain comes: the half sentence it sent
    is not lost. The next process sends it, then says the answer was cut off."""
    async with ScriptedOpenAI() as upstream:
        upstream.script.then(upstream.sse(_stalling(HEAD), stall_after=10**6))
        env = _env(redis_url, bot_id, yach, upstream, send_rate="0")
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("q")))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1, timeout=10)
        shown_before = len(yach.shown)
        async with running_bridge(env):
            await wait_acknowledged(redis_client, Keys(bot_id).inbox)
    texts = yach.texts()
    assert shown_before == 1 and texts[-1] == CUT_OFF
    assert _words(texts[:-1]) == HEAD


async def test_a_whole_answer_whose_last_send_the_drain_cuts_gets_no_notice(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach
) -> None:
    """The answer's last piece had left (at its sentence's end) when the upstream's end
    came; its send is still on the wire at the drain's deadline. The answer was whole: the
    next process sends that piece again (same message_id), with no cut-off notice."""
    answer = "Only one sentence here. "
    async with ScriptedOpenAI() as upstream:
        upstream.delay_s = 0.03  # the end comes after the piece has gone to be sent
        upstream.script.then(upstream.sse(chunks_for(answer)))
        env = _env(redis_url, bot_id, yach, upstream, send_rate="0")
        env.update(BRIDGE_YACH_APP_KEY=APP_KEY, BRIDGE_YACH_APP_SECRET=APP_SECRET)
        yach.hold_next()  # the piece's send: it never answers
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("q")))[0] == 200
            await wait_until(lambda: len(yach.held) == 1, timeout=10)
            await asyncio.sleep(3)  # the upstream's end has come (~1 s)
        async with running_bridge(env):
            await wait_acknowledged(redis_client, Keys(bot_id).inbox)
    texts = yach.texts()
    assert CUT_OFF not in texts, texts
    assert _words(texts) == answer.strip()
