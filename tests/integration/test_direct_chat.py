"""Direct chats (conversationType 1): replies through the single-chat send API with the app
access token from /gettoken — cached, refreshed before expiry and once on an invalid-token
answer — and `message_id` as the idempotency key (SPEC §4)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes import yach as fake_yach
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import RunningBridge, bridge_env, openai_env, running_bridge, wait_until

SINGLE = "/v1/single/message/send"




@pytest.fixture
async def bridge(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
                 redis_client: object) -> AsyncIterator[RunningBridge]:
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                     BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET)
    async with running_bridge(env) as running:
        yield running


def direct_message(text: str, sender: str = "u7") -> dict[str, Any]:
    return {
        "msgId": uuid.uuid4().hex,
        "msgtype": "text",
        "text": {"content": text},
        "senderId": sender,
        "senderNick": "Dana",
        "senderStaffId": "W007",
        "conversationType": "1",
    }


async def ask(bridge: RunningBridge, yach: FakeYach, text: str, count: int) -> None:
    status, _ = await bridge.post(direct_message(text))
    assert status == 200
    await wait_until(lambda: len(yach.shown) >= count)


async def test_a_direct_reply_goes_through_the_single_chat_api(bridge: RunningBridge,
                                                               yach: FakeYach) -> None:
    await ask(bridge, yach, "hello", 1)
    shown = yach.shown[0]
    assert (shown.route, shown.to) == ("single", "u7")
    assert shown.text == "You said: hello. (history: 0 messages)"
    assert "at" not in shown.message  # nobody to mention in a direct chat
    request = yach.server.on(SINGLE)[0]
    assert request.query["access_token"] == "app-token-1"
    assert request.json()["message_id"] == shown.message_id
    assert yach.server.on("/robot/send") == []


async def test_the_token_is_cached_and_the_session_is_per_user(bridge: RunningBridge,
                                                               yach: FakeYach) -> None:
    await ask(bridge, yach, "one", 1)
    await ask(bridge, yach, "two", 2)
    assert yach.tokens_issued == 1
    assert yach.texts()[1] == "You said: two. (history: 2 messages)"


async def test_an_invalid_token_is_refreshed_once(bridge: RunningBridge, yach: FakeYach) -> None:
    await ask(bridge, yach, "one", 1)
    yach.invalidate_next = 1
    await ask(bridge, yach, "two", 2)
    assert yach.tokens_issued == 2
    sends = yach.server.on(SINGLE)
    assert [r.query["access_token"] for r in sends] == ["app-token-1", "app-token-1",
                                                        "app-token-2"]
    assert sends[1].json()["message_id"] == sends[2].json()["message_id"]
    assert len(yach.shown) == 2


async def test_the_token_is_refreshed_before_it_expires(bridge: RunningBridge,
                                                        yach: FakeYach) -> None:
    yach.token_lifetime_s = 1  # refreshed a tenth of its life before expiry
    await ask(bridge, yach, "one", 1)
    await asyncio.sleep(1.0)
    await ask(bridge, yach, "two", 2)
    assert yach.tokens_issued == 2
    assert len(yach.server.on(SINGLE)) == 2  # no send was refused for an expired token


@pytest.mark.parametrize("expired_time", ["soon", "NaN", -5, None])
async def test_a_token_with_a_garbled_lifetime_is_kept_for_two_hours(
    bridge: RunningBridge, yach: FakeYach, expired_time: str | int | None
) -> None:
    yach.token_lifetime_s = expired_time
    await ask(bridge, yach, "one", 1)
    await ask(bridge, yach, "two", 2)
    assert yach.tokens_issued == 1
    assert len(yach.shown) == 2


async def test_a_retried_send_reuses_its_message_id(bridge: RunningBridge,
                                                    yach: FakeYach) -> None:
    yach.fail_next(500)
    await ask(bridge, yach, "hello", 1)
    sends = yach.server.on(SINGLE)
    assert len(sends) == 2
    assert sends[0].json()["message_id"] == sends[1].json()["message_id"]
    assert len(yach.shown) == 1


async def test_direct_sends_use_the_shared_direct_budget(bridge: RunningBridge,
                                                         yach: FakeYach) -> None:
    await ask(bridge, yach, "hello", 1)
    redis = bridge.bridge.redis
    assert redis is not None
    keys = bridge.bridge.keys
    assert await redis.zcard(keys.send_budget_direct) == 1
    assert await redis.zcard(keys.send_budget_group) == 0
    # the platform's 60 per minute: the send is counted for a minute
    assert 59_000 < await redis.pttl(keys.send_budget_direct) <= 60_000
