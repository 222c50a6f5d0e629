"""Which chats a Yach configuration cannot answer by a route of its own (SPEC §4), and a
timestamp window that refuses real messages, as the operator is told at start and by `check`;
which `sessionWebhook` counts as on the API host."""

from __future__ import annotations

import pytest

from adapters.im.yach import on_api_host, reply_gaps, skew_gaps, unverified_gaps
from bridge.config import load_settings

BASE = {"BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_API_KEY": "sk-x", "BRIDGE_OPENAI_MODEL": "m",
        "BRIDGE_YACH_SECRET": "SEC-x"}  # fmt: skip
APP = {"BRIDGE_YACH_APP_KEY": "key", "BRIDGE_YACH_APP_SECRET": "secret"}
ROBOT = {"BRIDGE_YACH_ROBOT_URL": "https://yach.example/robot/send?access_token=t"}


def gaps(**env: str) -> list[str]:
    return reply_gaps(load_settings({**BASE, **env}))


def test_the_app_credentials_reach_every_chat() -> None:
    assert gaps(**APP) == []
    assert gaps(**APP, **ROBOT) == []


def test_without_any_route_only_a_session_webhook_answers() -> None:
    found = gaps()
    assert len(found) == 2
    assert found[0].startswith("BRIDGE_YACH_APP_KEY/BRIDGE_YACH_APP_SECRET are not set: direct")
    assert found[1].startswith("neither the app credentials nor BRIDGE_YACH_ROBOT_URL are set")


def test_a_robot_url_answers_into_its_one_group_whoever_asked() -> None:
    found = gaps(**ROBOT)
    assert len(found) == 2 and "answered there" in found[1]
    assert "BRIDGE_ALLOW_GROUPS" in found[1]
    assert "access_token" not in " ".join(found)
    # limited to the robot's own group: only direct chats are left without a route
    assert gaps(**ROBOT, BRIDGE_ALLOW_GROUPS="cid-1") == found[:1]
    assert len(gaps(**ROBOT, BRIDGE_ALLOW_GROUPS="cid-1,cid-2")) == 2


def test_half_the_app_credentials_are_none() -> None:
    assert len(gaps(BRIDGE_YACH_APP_KEY="key", **ROBOT)) == 2


def test_a_timestamp_window_under_5_s_is_reported_and_the_default_is_not() -> None:
    assert skew_gaps(load_settings(BASE)) == []
    assert skew_gaps(load_settings({**BASE, "BRIDGE_YACH_MAX_SKEW_S": "5"})) == []
    (gap,) = skew_gaps(load_settings({**BASE, "BRIDGE_YACH_MAX_SKEW_S": "0"}))
    assert gap.startswith("BRIDGE_YACH_MAX_SKEW_S=0 refuses (401) every webhook")
    # no secret, no timestamp check (BRIDGE_YACH_INSECURE): nothing to warn about
    insecure = {**BASE, "BRIDGE_YACH_SECRET": "", "BRIDGE_YACH_INSECURE": "1"}
    assert skew_gaps(load_settings({**insecure, "BRIDGE_YACH_MAX_SKEW_S": "0"})) == []


def test_webhooks_taken_unsigned_are_reported() -> None:
    """BRIDGE_YACH_INSECURE=1 without a secret: anyone who reaches the port makes the bot
    answer. With a secret, the secret is checked and INSECURE changes nothing."""
    insecure = {**BASE, "BRIDGE_YACH_SECRET": "", "BRIDGE_YACH_INSECURE": "1"}
    (gap,) = unverified_gaps(load_settings(insecure))
    assert gap.startswith("BRIDGE_YACH_INSECURE=1 without BRIDGE_YACH_SECRET")
    assert "127.0.0.1:8080" in gap
    assert unverified_gaps(load_settings({**insecure, "BRIDGE_YACH_SECRET": "SEC-x"})) == []
    assert unverified_gaps(load_settings(BASE)) == []


API = "https://yach-oapi.zhiyinlou.com"


@pytest.mark.parametrize(("url", "on_api"), [
    (f"{API}/robot/send?session=s", True),
    ("HTTPS://YACH-OAPI.ZhiYinLou.com/x", True),
    ("https://yach-oapi.zhiyinlou.com:443/x", True),
    ("http://yach-oapi.zhiyinlou.com/x", False),  # the answer in clear
    ("https://yach-oapi.zhiyinlou.com:8443/x", True),  # SPEC: on the API host
    ("https://yach-oapi.zhiyinlou.com.evil.com/x", False),
    ("https://yach-oapi.zhiyinlou.com@evil.com/x", False),
    ("https://evil.com/?u=https://yach-oapi.zhiyinlou.com/", False),
    ("https://evil.com#@yach-oapi.zhiyinlou.com/", False),
    ("https://evil.com\\@yach-oapi.zhiyinlou.com/", False),  # urlsplit's host is the API's
    ("https://yach-oapi.zhiyinlou.com./x", False),
    ("/relative/path", False),
    ("", False),
    ("https://[::1/", False),
])  # fmt: skip
def test_a_session_webhook_is_on_the_api_host_as_aiohttp_reads_it(url: str, on_api: bool) -> None:
    assert on_api_host(url, API) is on_api
