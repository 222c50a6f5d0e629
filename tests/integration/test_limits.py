"""Access and abuse limits, and the outbound send rate (SPEC §2, §4, §8).

Allow lists ignore others silently (200, nothing stored, no reply); BRIDGE_USER_RATE,
BRIDGE_MAX_INPUT_CHARS and a full session queue each get their short message; the send
budget holds across processes, queues and merges pieces (never drops them), and a
platform rate-limit answer is backed off and retried.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from bridge import outbox as outbox_module
from bridge.config import Rate
from bridge.messages import MESSAGES
from bridge.outbox import SendBudget
from bridge.store import Keys
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

ZH = MESSAGES["zh"]




def env(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
        **extra: str) -> dict[str, str]:
    return bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                      BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                      BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET, **extra)


async def inbox_length(bridge: RunningBridge) -> int:
    assert bridge.bridge.redis is not None
    return int(await bridge.bridge.redis.xlen(bridge.bridge.keys.inbox))


# Allow lists


@pytest.mark.parametrize(("allow", "fields"), [
    ({"BRIDGE_ALLOW_GROUPS": "g-ok"}, {"group": "g-other"}),
    ({"BRIDGE_ALLOW_USERS": "W-ok,u-ok"}, {"sender": "u-other", "work_code": "W-other"}),
])
async def test_others_are_ignored_silently(redis_url: str, bot_id: str, yach: FakeYach,
                                           upstream: FakeOpenAI, redis_client: object,
                                           allow: dict[str, str],
                                           fields: dict[str, str]) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, upstream, **allow)) as bridge:
        status, body = await bridge.post(group_message("hello", **fields))
        assert (status, body) == (200, {"code": 200, "msg": "ok"})
        status, _ = await bridge.post(group_message("/help", **fields))
        assert status == 200
        assert await inbox_length(bridge) == 0
        await asyncio.sleep(0.3)
    assert yach.shown == [] and upstream.bodies == []


async def test_allowed_groups_and_users_are_answered(redis_url: str, bot_id: str,
                                                     yach: FakeYach, upstream: FakeOpenAI,
                                                     redis_client: object) -> None:
    allow = {"BRIDGE_ALLOW_GROUPS": "g-ok", "BRIDGE_ALLOW_USERS": "W-ok"}
    async with running_bridge(env(redis_url, bot_id, yach, upstream, **allow)) as bridge:
        await bridge.post(group_message("hello", group="g-ok", work_code="W-ok"))
        await wait_until(lambda: len(yach.shown) == 1)
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]


# User rate, input length, busy


async def test_user_rate(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
                         redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_USER_RATE="2/60")) as bridge:
        for i in range(3):
            await bridge.post(group_message(f"q{i}"))
            await wait_until(lambda i=i: len(yach.shown) == i + 1)  # type: ignore[misc]
        await bridge.post(group_message("hi", sender="someone-else"))
        await wait_until(lambda: len(yach.shown) == 4)
        await wait_until(lambda: not bridge.bridge.worker or not bridge.bridge.worker.held)
        assert await inbox_length(bridge) == 0  # the refused one is acknowledged too
    assert yach.texts()[2] == ZH["rate_limited"]
    assert yach.texts()[3].startswith("You said: hi.")
    assert len(upstream.bodies) == 3


async def test_a_user_rate_window_in_decimal_seconds_is_kept_exactly(
        redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
        redis_client: object) -> None:
    """`1/1.5` is one message per 1.5 s: a second message 1.1 s after the first is over
    it (the window was cut to whole seconds, 1 s, and let it through)."""
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_USER_RATE="1/1.5")) as bridge:
        first = time.monotonic()
        await bridge.post(group_message("q0"))
        await wait_until(lambda: len(yach.shown) == 1)
        await asyncio.sleep(max(first + 1.1 - time.monotonic(), 0))
        await bridge.post(group_message("q1"))
        await wait_until(lambda: len(yach.shown) == 2)
    assert yach.texts()[1] == ZH["rate_limited"]


async def test_an_unsupported_message_does_not_count_against_the_user_rate(
        redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
        redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_USER_RATE="1/60")) as bridge:
        await bridge.post(group_message("", msgtype="voice"))
        await wait_until(lambda: len(yach.shown) == 1)
        await bridge.post(group_message("after the voice"))
        await wait_until(lambda: len(yach.shown) == 2)
    assert yach.texts() == [ZH["unsupported_type"],
                            "You said: after the voice. (history: 0 messages)"]


async def test_input_too_long(redis_url: str, bot_id: str, yach: FakeYach,
                              upstream: FakeOpenAI, redis_client: object) -> None:
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_MAX_INPUT_CHARS="10")) as bridge:
        await bridge.post(group_message("一二三四五六七八九十"))
        await bridge.post(group_message("一二三四五六七八九十十"))
        await wait_until(lambda: len(yach.shown) == 2)
    assert sorted(yach.texts()) == sorted([
        "You said: 一二三四五六七八九十. (history: 0 messages)",
        "消息太长了（11 字，上限 10 字），请精简后再发。",
    ])
    assert len(upstream.bodies) == 1


@pytest.mark.parametrize(
    ("changed", "shown"),
    [({"BRIDGE_ALLOW_GROUPS": "g-other"}, []),
     ({"BRIDGE_MAX_INPUT_CHARS": "100"}, ["You said: 一二三. (history: 0 messages)"])],
    ids=["group-no-longer-allowed", "limit-raised"],
)  # fmt: skip
async def test_a_notice_left_pending_is_answered_under_a_changed_configuration(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    changed: dict[str, str], shown: list[str],
) -> None:
    """A notice whose send failed (the platform out of reach), taken over by a bridge
    restarted with other allow lists or a higher input limit: ignored silently if its group
    is no longer allowed; a question that fits the limit now is answered. Judged again as no
    notice, it raised a KeyError (a traceback at every delivery) and was dead-lettered with
    "failed repeatedly", also to a group no longer allowed."""
    first = {"BRIDGE_MAX_INPUT_CHARS": "2", "BRIDGE_CLAIM_IDLE_S": "1"}
    yach.fail_next(500, times=5)  # every try of the outbox: the notice is left pending
    async with running_bridge(env(redis_url, bot_id, yach, upstream, **first),
                              send_backoff_s=0.01) as bridge:  # fmt: skip
        worker = bridge.bridge.worker
        assert worker is not None
        await bridge.post(group_message("一二三"))
        await wait_until(lambda: not yach.failures and not worker.held)
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  **{**first, **changed})) as bridge:  # fmt: skip
        assert bridge.bridge.redis is not None
        for _ in range(200):  # claimed once idle BRIDGE_CLAIM_IDLE_S, then acknowledged
            if not await inbox_length(bridge):
                break
            await asyncio.sleep(0.02)
        assert await inbox_length(bridge) == 0
        await wait_until(lambda: len(yach.shown) == len(shown))
        assert await bridge.bridge.redis.xlen(bridge.bridge.keys.dead) == 0
    assert yach.texts() == shown


@pytest.mark.parametrize("workers", ["32", "1"])
async def test_busy_session_is_told_at_once(redis_url: str, bot_id: str, yach: FakeYach,
                                            upstream: FakeOpenAI, redis_client: object,
                                            workers: str) -> None:
    """Also when every turn slot is taken (BRIDGE_WORKERS=1, by the running turn): the
    message learns that it waits behind too many without waiting for a slot first."""
    upstream.first_byte_delay_s = 0.5
    async with running_bridge(env(redis_url, bot_id, yach, upstream, BRIDGE_WORKERS=workers,
                                  BRIDGE_SESSION_QUEUE_MAX="1")) as bridge:
        for text in ("first", "second", "third"):
            await bridge.post(group_message(text))
        await wait_until(lambda: len(yach.shown) == 1)
        assert yach.texts() == [ZH["busy"]]  # before the running answer
        await wait_until(lambda: len(yach.shown) == 3, timeout=10)
        await wait_until(lambda: not bridge.bridge.worker or not bridge.bridge.worker.held)
        assert await inbox_length(bridge) == 0  # "busy" is acknowledged, never retried
        await asyncio.sleep(0.3)
    assert len(yach.shown) == 3
    assert [t.split(".")[0] for t in yach.texts()[1:]] == ["You said: first",
                                                          "You said: second"]


# Outbound rate


async def test_the_send_budget_holds_across_processes(redis_url: str, bot_id: str,
                                                      redis_client: object) -> None:
    """Two processes' budgets on one Redis key: 3 per second between them."""
    key = Keys(bot_id).send_budget_group
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        budgets = [SendBudget(client, key, Rate(3, 1.0)) for client in clients]
        started = time.monotonic()
        await asyncio.gather(*(budgets[i % 2].acquire() for i in range(6)))
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            await client.aclose()
    assert 0.9 <= elapsed < 3.0


async def test_waiting_pieces_are_merged_never_dropped(redis_url: str, bot_id: str,
                                                       yach: FakeYach, upstream: FakeOpenAI,
                                                       redis_client: object) -> None:
    answer = " ".join(f"Sentence number {i} of the answer is here." for i in range(20))
    upstream.answer = lambda body: answer
    upstream.delay_s = 0.002  # the answer streams for about a second
    arrivals: list[float] = []

    async def watch() -> None:
        while True:
            arrivals.extend([time.monotonic()] * (len(yach.shown) - len(arrivals)))
            await asyncio.sleep(0.01)

    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="40",
                                  BRIDGE_YACH_SEND_RATE="2/1")) as bridge:
        watcher = asyncio.create_task(watch())
        await bridge.post(group_message("long"))
        await wait_until(lambda: "".join(yach.texts()) == answer, timeout=10)
        watcher.cancel()
    composed = len(answer) // 40
    assert 1 < len(yach.shown) < composed  # merged while they waited, nothing dropped
    for i, arrived in enumerate(arrivals[2:], start=2):
        assert arrived - arrivals[i - 2] >= 0.9  # never more than 2 sends a second
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W001"]}
    assert all("at" not in shown.message for shown in yach.shown[1:])


@pytest.mark.parametrize(("status", "body"), [
    (429, {"code": 429, "msg": "too many requests"}),
    (200, {"code": 43004, "msg": "机器人发送消息频率过快"}),
], ids=["http-429", "frequency"])
async def test_a_platform_rate_limit_is_backed_off_and_retried(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    status: int, body: dict[str, object]
) -> None:
    yach.fail_next(status, body)
    async with running_bridge(env(redis_url, bot_id, yach, upstream)) as bridge:
        started = time.monotonic()
        await bridge.post(group_message("hello"))
        await wait_until(lambda: len(yach.shown) == 1, timeout=10)
        elapsed = time.monotonic() - started
    sends = yach.server.on("/group/robot/message/send")
    assert len(sends) == 2
    assert sends[0].json()["message_id"] == sends[1].json()["message_id"]
    assert elapsed >= 1.5  # the default back-off without a Retry-After
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]


async def test_a_platform_retry_after_is_honoured(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object
) -> None:
    """`Retry-After: 0.2` instead of the default back-off (1.5 s without one)."""
    yach.fail_next(429, {"code": 429, "msg": "too many requests"}, headers={"Retry-After": "0.2"})
    async with running_bridge(env(redis_url, bot_id, yach, upstream)) as bridge:
        started = time.monotonic()
        await bridge.post(group_message("hello"))
        await wait_until(lambda: len(yach.shown) == 1, timeout=10)
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.2
    first, second = yach.server.on("/group/robot/message/send")
    assert first.json()["message_id"] == second.json()["message_id"]
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]


async def test_a_retry_after_of_zero_is_not_a_tight_loop(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object
) -> None:
    """`Retry-After: 0` three times in a row: waits of 0.2, 0.4 and 0.8 s, not none."""
    yach.fail_next(429, {"code": 429, "msg": "too many"}, times=3, headers={"Retry-After": "0"})
    async with running_bridge(env(redis_url, bot_id, yach, upstream)) as bridge:
        started = time.monotonic()
        await bridge.post(group_message("hello"))
        await wait_until(lambda: len(yach.shown) == 1, timeout=10)
        elapsed = time.monotonic() - started
    assert len(yach.server.on("/group/robot/message/send")) == 4
    assert elapsed >= 1.4
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]


async def test_rate_limit_answers_use_up_no_attempt(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More "slow down" answers in a row than the outbox tries a failing send: the piece
    waits and goes out, the entry is neither left for redelivery nor, with
    BRIDGE_MAX_ATTEMPTS=1, dead-lettered. (The least wait is shortened: 0.2 s doubled five
    times is six seconds.)"""
    monkeypatch.setattr(outbox_module, "_MIN_RATE_LIMIT_WAIT_S", 0.01)
    yach.fail_next(429, {"code": 429, "msg": "too many"}, times=6, headers={"Retry-After": "0"})
    async with running_bridge(env(redis_url, bot_id, yach, upstream,
                                  BRIDGE_MAX_ATTEMPTS="1")) as bridge:  # fmt: skip
        await bridge.post(group_message("hello"))
        await wait_until(lambda: len(yach.shown) == 1, timeout=10)
        await wait_until(lambda: not bridge.bridge.worker or not bridge.bridge.worker.held)
        assert await inbox_length(bridge) == 0
        assert bridge.bridge.redis is not None
        assert await bridge.bridge.redis.xlen(bridge.bridge.keys.dead) == 0
    assert len(yach.server.on("/group/robot/message/send")) == 7
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
