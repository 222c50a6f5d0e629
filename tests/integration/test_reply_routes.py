"""Where a group reply goes (SPEC §4): the app API with app credentials, else the inbound
`sessionWebhook` when it is on the API host, else the signed custom robot URL."""

from __future__ import annotations

import json
import time

import pytest
import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import (
    bridge_env,
    group_message,
    openai_env,
    running_bridge,
    signed_headers,
    wait_until,
)

APP = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}


@pytest.mark.parametrize(("credentials", "webhook_host", "route"), [
    ({}, "api", "session"),
    ({}, "elsewhere", "robot"),
    (APP, "api", "app"),
])  # fmt: skip
async def test_a_group_reply_takes_the_preferred_route(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    credentials: dict[str, str], webhook_host: str, route: str,
) -> None:  # fmt: skip
    webhook = yach.session_webhook("s-1")
    if webhook_host == "elsewhere":  # same server, another host name: never trusted
        webhook = webhook.replace("127.0.0.1", "localhost")
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), **credentials)
    async with running_bridge(env) as bridge:
        message = group_message("where to?", sessionWebhook=webhook)
        assert (await bridge.post(message))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
    [shown] = yach.shown
    assert shown.route == route
    assert shown.text == "You said: where to?. (history: 0 messages)"
    assert shown.message["at"] == {"atWorkCodes": ["W001"]}
    if route == "session":  # the message itself is the body, as for the robot URL
        assert shown.to == "s-1" and shown.message["msgtype"] == "markdown"


async def test_the_robot_url_is_signed_with_the_webhook_secret_by_default(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
) -> None:
    """BRIDGE_YACH_ROBOT_SECRET defaults to BRIDGE_YACH_SECRET (SPEC §2): the robot URL gets
    `&timestamp=T&sign=S` signed with it (the fake robot checks the signature)."""
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_YACH_SECRET=fake_yach.ROBOT_SECRET, BRIDGE_YACH_ROBOT_SECRET="")
    async with running_bridge(env) as bridge:
        headers = signed_headers(fake_yach.ROBOT_SECRET)
        assert (await bridge.post(group_message("signed?"), headers=headers))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
    assert yach.shown[0].route == "robot"
    [request] = yach.server.on("/robot/send")
    assert request.query["access_token"] == fake_yach.ROBOT_TOKEN
    assert set(request.query) == {"access_token", "timestamp", "sign"}


async def test_the_app_api_request_is_as_spec_writes_it(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
) -> None:
    """`POST {api_base}/group/robot/message/send?access_token=…` with `group_id` (the inbound
    conversation id), `message` (the message JSON as a string) and `message_id`."""
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), **APP)
    async with running_bridge(env) as bridge:
        assert (await bridge.post(group_message("shape", group="cid-42")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
    [request] = yach.server.on("/group/robot/message/send")
    assert dict(request.query) == {"access_token": "app-token-1"}
    body = request.json()
    assert set(body) == {"group_id", "message", "message_id"}
    assert body["group_id"] == "cid-42"
    assert isinstance(body["message"], str) and isinstance(body["message_id"], str)
    assert json.loads(body["message"]) == {
        "msgtype": "markdown",
        "markdown": {"title": "You said: shape. (history: 0 m",
                     "text": "You said: shape. (history: 0 messages)"},
        "at": {"atWorkCodes": ["W001"]},
    }


async def test_two_bots_sending_through_one_app_never_share_a_message_id(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
    redis_client: aioredis.Redis,
) -> None:  # fmt: skip
    """Two bots (two service instances, each its own BRIDGE_BOT_ID) may send through one Yach
    app, and each bot's inbox numbers its entries itself: the same entry id comes up in both
    (here forced; by chance, two messages in the same millisecond). The platform shows a
    message_id once, so an id made of the entry id alone had one bot's answer dropped."""
    other = f"{bot_id}-b"
    same_next_id = f"{int(time.time() * 1000) + 60_000}-0"  # each stream's next: …-1
    for bot in (bot_id, other):
        inbox = Keys(bot).inbox
        await redis_client.xadd(inbox, {"placeholder": "1"}, id=same_next_id)
        await redis_client.xdel(inbox, same_next_id)
    envs = [bridge_env(redis_url, bot, yach, **openai_env(upstream.base_url), **APP)
            for bot in (bot_id, other)]  # fmt: skip
    try:
        async with running_bridge(envs[0]) as first, running_bridge(envs[1]) as second:
            for bridge, group in ((first, "g-first"), (second, "g-second")):
                assert (await bridge.post(group_message("same", group=group)))[0] == 200
            await wait_until(lambda: len(yach.shown) == 2)
    finally:
        keys = [key async for key in redis_client.scan_iter(match=f"chatbridge:{{{other}}}:*")]
        if keys:
            await redis_client.delete(*keys)
    assert sorted(shown.to for shown in yach.shown) == ["g-first", "g-second"]
