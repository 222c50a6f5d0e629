"""No secret reaches the log (issue 7 item 3, SPEC §9): every secret variable of `Settings` is
set, full turns run at debug level through an in-process bridge and loopback fakes, and the
captured output holds none of them — nor the tokens the platform hands out on the way.

Logging is set up exactly as `chatbridge run` sets it up (`bridge.cli.setup_logging`), into a
StringIO. The OpenAI turn goes every way a secret travels: `/gettoken` with the app key and
secret, app-API group and single-chat sends with the access token in the URL, the custom robot
URL with its `access_token` and `sign`, the OCR key and autocut token of an image question, an
upstream refusing its key, and a platform error on a send. Each other upstream runs a turn with
its own credentials.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import fields
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from bridge.cli import setup_logging
from bridge.config import Settings, env_name, load_settings
from tests.fakes import autocut as fake_autocut
from tests.fakes import ocr as fake_ocr
from tests.fakes import yach as fake_yach
from tests.fakes.aimaster import FakeAimaster
from tests.fakes.autocut import FakeAutocut
from tests.fakes.chatgpt_web import FakeChatGPT
from tests.fakes.coze import CozeFake
from tests.fakes.dify import DifyFake
from tests.fakes.hiagent import HiAgentFake
from tests.fakes.images import FakeImages
from tests.fakes.ocr import FakeOCR
from tests.fakes.openai import FakeOpenAI
from tests.fakes.scripted import ScriptedFake
from tests.fakes.yach import FakeYach
from tests.fakes.yach_agent import FakeYachAgent
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

SECRET_VARIABLES = [env_name(spec.name) for spec in fields(Settings) if spec.metadata["secret"]]

# Credentials that appear only in logs that leak: a parameter, a header or a JSON field whose
# value is not the mask.
LEAK_PATTERNS = [
    re.compile(r"access_token=(?!\*\*\*)[^&\s\"'\\]"),
    re.compile(r"[?&]sign=(?!\*\*\*)[^&\s\"'\\]"),
    re.compile(r"(?i)bearer\s+(?!\*\*\*)[A-Za-z0-9]"),
    re.compile(r"(?i)\"access_token\\?\"\s*:\s*\\?\"(?!\*\*\*)"),
    re.compile(r"(?i)\b(?:appkey|appsecret)=(?!\*\*\*)[^&\s\"'\\]"),
]




def every_secret(**known: str) -> dict[str, str]:
    """A value for every secret variable: those the fakes check, the rest made up (each
    distinct, so finding one in the log names the variable that leaked)."""
    values = {name: f"{name.lower()}-{uuid.uuid4().hex[:10]}" for name in SECRET_VARIABLES}
    values.update(known)
    assert set(values) >= set(SECRET_VARIABLES)
    return values


def forms(value: str) -> set[str]:
    """A secret as it may be written: raw, URL-encoded, JSON-escaped; a URL's token alone."""
    out = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    if "access_token=" in value:
        out.add(value.rpartition("access_token=")[2])
    return {form for form in out if len(form) >= 4}


def assert_nothing_leaked(log: str, secrets: dict[str, str], *issued: str) -> None:
    for name, value in secrets.items():
        for form in forms(value):
            assert form not in log, f"{name} appears in the log: {_around(log, form)}"
    for token in issued:
        assert token not in log, f"the issued token {token!r} appears: {_around(log, token)}"
    for pattern in LEAK_PATTERNS:
        match = pattern.search(log)
        assert match is None, f"a credential appears: {_around(log, match.group(0))}"


def _around(log: str, needle: str) -> str:
    at = log.find(needle)
    return log[max(at - 300, 0): at + 200]


def assert_captured_a_turn(log: str, *masked: str) -> None:
    """The capture is real: whole turns with their context, and the credentials that went by
    (in the fakes' access log lines, which go through the same logging) shown masked."""
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    done = [event for event in events if event.get("event") == "turn_done"]
    assert done and all(event.get("chat_session_id") for event in done), log[-3000:]
    for marker in masked:
        assert marker in log, f"{marker!r} not in the log: the credential never went by"


def logged_bridge_env(env: dict[str, str], log: io.StringIO) -> dict[str, str]:
    env = {**env, "BRIDGE_LOG_LEVEL": "debug", "BRIDGE_LOG_FORMAT": "json"}
    setup_logging(load_settings(env, command="run"), log)
    return env


def direct_message(text: str) -> dict[str, Any]:
    return {"msgId": uuid.uuid4().hex, "msgtype": "text", "text": {"content": text},
            "senderId": "u-direct", "senderNick": "Dana", "senderStaffId": "W007",
            "conversationType": "1"}


async def test_openai_turns_every_way_a_secret_travels(
    redis_url: str, bot_id: str, yach: FakeYach, log_output: io.StringIO, redis_client: object
) -> None:
    upstream = await FakeOpenAI(statuses=[401]).start()  # the first ask is refused its key
    ocr, autocut, images = (await FakeOCR().start(), await FakeAutocut().start(),
                            await FakeImages().start())
    try:
        secrets = every_secret(
            BRIDGE_YACH_SECRET=bridge_env("", bot_id, yach)["BRIDGE_YACH_SECRET"],
            BRIDGE_YACH_ROBOT_URL=yach.robot_url,
            BRIDGE_YACH_ROBOT_SECRET=fake_yach.ROBOT_SECRET,
            BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
            BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
            BRIDGE_OPENAI_API_KEY=openai_env(upstream.base_url)["BRIDGE_OPENAI_API_KEY"],
            BRIDGE_OCR_API_KEY=fake_ocr.API_KEY,
            BRIDGE_AUTOCUT_TOKEN=fake_autocut.TOKEN,
        )
        env = logged_bridge_env(bridge_env(
            redis_url, bot_id, yach, **{**openai_env(upstream.base_url), **secrets},
            BRIDGE_UPSTREAM_RETRIES="0", BRIDGE_IMAGE_PIPELINE="autocut+ocr",
            BRIDGE_OCR_BASE_URL=ocr.base_url, BRIDGE_OCR_MODEL=fake_ocr.MODEL,
            BRIDGE_AUTOCUT_URL=autocut.url, BRIDGE_FETCH_ALLOW_HOSTS="127.0.0.1",
            BRIDGE_REPLY_MODE="stream",
        ), log_output)
        # With the app credentials: /gettoken, then app-API sends (group and single chat).
        async with running_bridge(env) as bridge:
            for payload in (
                group_message("first, refused upstream key"),
                group_message("what is OpenStack?"),
                group_message("批改这张卷子", msgtype="image", picUrl=images.add("paper")),
                direct_message("and in a direct chat?"),
            ):
                count = len(yach.shown)
                status, _ = await bridge.post(payload)
                assert status == 200
                await wait_until(lambda n=count: len(yach.shown) > n, timeout=15)
        # Without them: the custom robot URL, signed, its first send refused by the platform.
        robot_env = {key: value for key, value in env.items()
                     if key not in ("BRIDGE_YACH_APP_KEY", "BRIDGE_YACH_APP_SECRET")}
        yach.fail_next(500, {"code": 500, "msg": "internal error"})
        async with running_bridge(robot_env) as bridge:
            count = len(yach.shown)
            status, _ = await bridge.post(group_message("through the robot, please"))
            assert status == 200
            await wait_until(lambda: len(yach.shown) > count, timeout=15)
    finally:
        for fake in (upstream, ocr, autocut, images):
            await fake.close()
    routes = [shown.route for shown in yach.shown]
    assert routes == ["app", "app", "app", "single", "robot"], routes
    assert autocut.papers == ["paper"] and ocr.labels(), "the image pipeline did not run"
    assert yach.server.on("/gettoken") and yach.server.on("/robot/send")
    log = log_output.getvalue()
    issued = [f"app-token-{n}" for n in range(1, yach.tokens_issued + 1)]
    assert_nothing_leaked(log, secrets, *issued)
    assert_captured_a_turn(log, "appkey=***", "appsecret=***", "access_token=***", "sign=***")


@pytest.mark.parametrize(
    "fake_class",
    [HiAgentFake, CozeFake, DifyFake, FakeAimaster, FakeChatGPT, FakeYachAgent],
    ids=["hiagent", "coze", "dify", "aimaster", "chatgpt-web", "yach-agent"],
)
async def test_every_upstream_turn_keeps_its_credentials_out_of_the_log(
    fake_class: type[ScriptedFake], redis_url: str, bot_id: str, yach: FakeYach,
    log_output: io.StringIO, redis_client: object,
) -> None:
    fake = fake_class()
    async with fake:
        upstream_env = fake.env()
        known = {key: value for key, value in upstream_env.items() if key in SECRET_VARIABLES}
        known.update(
            BRIDGE_YACH_SECRET=bridge_env("", bot_id, yach)["BRIDGE_YACH_SECRET"],
            BRIDGE_YACH_ROBOT_URL=yach.robot_url,
            BRIDGE_YACH_ROBOT_SECRET=fake_yach.ROBOT_SECRET,
        )
        if isinstance(fake, FakeYachAgent):  # its /gettoken takes any app credentials
            known.pop("BRIDGE_YACH_APP_KEY", None)
            known.pop("BRIDGE_YACH_APP_SECRET", None)
        else:
            known.update(BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                         BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET)
        secrets = every_secret(**known)
        env = logged_bridge_env(
            bridge_env(redis_url, bot_id, yach, **{**upstream_env, **secrets}), log_output
        )

        def replies() -> int:
            # (the yach-agent fake takes the app-API sends itself: one host serves both)
            return len(fake.shown if isinstance(fake, FakeYachAgent) else ()) + len(yach.shown)

        async with running_bridge(env) as bridge:
            for payload in (group_message("你好，请介绍一下你自己"), direct_message("再说一次")):
                count = replies()
                status, _ = await bridge.post(payload)
                assert status == 200
                await wait_until(lambda n=count: replies() > n, timeout=15)
    log = log_output.getvalue()
    issued = [f"app-token-{n}" for n in range(1, yach.tokens_issued + 1)]
    if isinstance(fake, FakeYachAgent):
        issued += sorted(fake.valid_tokens)
    assert_nothing_leaked(log, secrets, *issued)
    assert_captured_a_turn(log, "access_token=***")
