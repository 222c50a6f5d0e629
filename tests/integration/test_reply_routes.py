"""Where a group reply goes (SPEC §4): the app API with app credentials, else the inbound
`sessionWebhook` when it is on the API host, else the signed custom robot URL."""

from __future__ import annotations

import pytest

from tests.fakes import yach as fake_yach
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

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
