"""bridge.logging: masked secrets in every shape, both renderers, stdlib routing, context."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import fields
from typing import Any
from urllib.parse import quote

import pytest
import structlog
import yarl

from bridge.cli import setup_logging
from bridge.config import Settings, env_name, load_settings
from bridge.logging import (
    MASK,
    configure_logging,
    debug_enabled,
    mask_secrets,
    mask_text,
    register_issued_secret,
    register_secrets,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _secret(name: str) -> str:
    """A value unique to this test, so registrations of other tests cannot mask it by luck."""
    return f"{name}-{uuid.uuid4().hex}"


def _configured(fmt: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, stream)
    return stream


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


class Secrets:
    """One value for every kind of secret the masking must catch."""

    def __init__(self) -> None:
        self.registered = _secret("registered+key/with=chars")
        self.access_token = _secret("at")
        self.sign = _secret("sign")
        self.appsecret = _secret("appsecret")
        self.token = _secret("tok")
        self.bearer = _secret("bearer")
        self.json_token = _secret("jsontok")
        self.password = _secret("redispw")
        register_secrets([self.registered])

    def all(self) -> list[str]:
        return [
            self.registered,
            self.access_token,
            self.sign,
            self.appsecret,
            self.token,
            self.bearer,
            self.json_token,
            self.password,
        ]

    def assert_absent(self, output: str) -> None:
        for value in self.all():
            # Long enough that no fragment of the uuid survives either.
            assert value not in output
            assert value.split("-")[-1] not in output


def _log_every_shape(secrets: Secrets) -> None:
    log = structlog.get_logger("test")
    robot = (
        "https://yach-oapi.zhiyinlou.com/robot/send?access_token="
        f"{secrets.access_token}&timestamp=1700000000000&sign={secrets.sign}"
    )
    log.info(
        "every_shape",
        robot_url=robot,
        gettoken=f"/gettoken?appkey=k&appsecret={secrets.appsecret}",
        stream=f"https://h/openapi/v2/agent/chat?stream_id=1&token={secrets.token}",
        header_line=f"Authorization: Bearer {secrets.bearer}",
        headers={"Authorization": f"Bearer {secrets.bearer}", "Accept": "text/event-stream"},
        body=json.dumps({"code": 200, "obj": {"access_token": secrets.json_token}}),
        redis_url=f"redis://:{secrets.password}@redis.internal:6379/0",
        nested=[{"text": f"plain {secrets.registered} in a list"}, ("tuple", secrets.registered)],
        encoded=f"q={quote(secrets.registered, safe='')}",
        yarl_url=str(yarl.URL("https://h/p").with_query(q=secrets.registered)),
        raw=f"the registered secret {secrets.registered} in text",
    )


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_kind_of_secret_is_masked(fmt: str) -> None:
    secrets = Secrets()
    stream = _configured(fmt)
    _log_every_shape(secrets)
    output = stream.getvalue()
    secrets.assert_absent(output)
    assert "every_shape" in output
    assert MASK in output
    # What is not secret stays readable.
    assert "timestamp=1700000000000" in output
    assert "redis.internal:6379" in output
    assert "stream_id=1" in output


def test_json_fields_are_masked_in_place() -> None:
    secrets = Secrets()
    stream = _configured("json")
    _log_every_shape(secrets)
    (line,) = _json_lines(stream)
    assert line["robot_url"] == (
        "https://yach-oapi.zhiyinlou.com/robot/send?access_token=***"
        "&timestamp=1700000000000&sign=***"
    )
    assert line["gettoken"] == "/gettoken?appkey=k&appsecret=***"
    assert line["header_line"] == "Authorization: Bearer ***"
    assert line["headers"] == {"Authorization": "***", "Accept": "text/event-stream"}
    assert json.loads(line["body"]) == {"code": 200, "obj": {"access_token": "***"}}
    assert line["redis_url"] == "redis://:***@redis.internal:6379/0"
    assert line["nested"] == [{"text": "plain *** in a list"}, ["tuple", "***"]]
    assert line["encoded"] == "q=***"
    assert line["yarl_url"] == "https://h/p?q=***"
    assert line["raw"] == "the registered secret *** in text"
    assert line["level"] == "info"
    assert list(line)[:3] == ["timestamp", "level", "event"]


def _fail_with(secrets: Secrets) -> None:
    try:
        raise ConnectionError(f"cannot reach ?access_token={secrets.access_token}")
    except ConnectionError as exc:
        raise RuntimeError(f"upstream said no to {secrets.registered}") from exc


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_traceback_is_masked(fmt: str) -> None:
    secrets = Secrets()
    stream = _configured(fmt)
    try:
        _fail_with(secrets)
    except RuntimeError:
        structlog.get_logger().exception("turn_failed")
    output = stream.getvalue()
    secrets.assert_absent(output)
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: upstream said no to ***" in output
    assert "ConnectionError: cannot reach ?access_token=***" in output


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_logging_goes_through_the_same_masking(fmt: str) -> None:
    secrets = Secrets()
    stream = _configured(fmt)
    aiohttp_log = logging.getLogger("aiohttp.client")
    aiohttp_log.warning("GET %s failed", f"https://h/x?access_token={secrets.access_token}")
    try:
        _fail_with(secrets)
    except RuntimeError:
        logging.getLogger("redis.asyncio").error("redis broke", exc_info=True)
    output = stream.getvalue()
    secrets.assert_absent(output)
    assert "GET https://h/x?access_token=*** failed" in output
    assert "RuntimeError: upstream said no to ***" in output
    if fmt == "json":
        first, second = _json_lines(stream)
        assert first["logger"] == "aiohttp.client"
        assert first["level"] == "warning"
        assert second["logger"] == "redis.asyncio"
        assert "Traceback" in second["exception"]


def test_every_secret_setting_is_masked_once_registered(tmp_path: Any) -> None:
    """What the core does at start: register every secret setting, then log freely."""
    env: dict[str, str] = {"BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_MODEL": "m"}
    for spec in fields(Settings):
        if spec.metadata["secret"]:
            value = _secret(spec.name)
            if spec.name == "yach_robot_url":
                value = f"https://yach.example/robot/send?x={value}"
            env[env_name(spec.name)] = value
    settings = load_settings(env)
    secret_values = [
        getattr(settings, spec.name) for spec in fields(Settings) if spec.metadata["secret"]
    ]
    register_secrets(secret_values)
    stream = _configured("json")
    log = structlog.get_logger()
    log.debug("settings_dump", values=secret_values, text=" ".join(secret_values))
    log.debug("env_dump", env=env)
    output = stream.getvalue()
    for value in secret_values:
        assert value not in output
        assert value.rsplit("-", 1)[-1] not in output


def test_the_token_of_a_secret_url_is_masked_where_it_shows_alone() -> None:
    """The robot URL is a secret, and so is its `access_token` on its own: a server that
    refuses it quotes it alone (Yach: "不合法的access_token: …"), which neither the whole
    URL registered as one value nor the `access_token=` shape finds."""
    token = _secret("robot-token")
    env = {"BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_MODEL": "m", "BRIDGE_OPENAI_API_KEY": "k",
           "BRIDGE_YACH_ROBOT_URL": f"https://yach.example/robot/send?access_token={token}"}
    stream = io.StringIO()
    setup_logging(load_settings(env, command="chat"), stream, level="info")
    structlog.get_logger().warning("send_failed", reason=f"code 400: 不合法的access_token: {token}")
    output = stream.getvalue()
    assert "send_failed" in output
    assert token not in output and token.rsplit("-", 1)[-1] not in output


def test_context_fields_on_every_line() -> None:
    stream = _configured("json")
    with structlog.contextvars.bound_contextvars(
        bot="support", chat_session_id="yach:g:c1:u:u1", msg_id="m-1", upstream="openai"
    ):
        structlog.get_logger().info("piece_sent", chars=12)
        logging.getLogger("aiohttp.client").warning("slow")
    structlog.get_logger().info("after")
    own, stdlib, after = _json_lines(stream)
    for line in (own, stdlib):
        assert line["bot"] == "support"
        assert line["chat_session_id"] == "yach:g:c1:u:u1"
        assert line["msg_id"] == "m-1"
        assert line["upstream"] == "openai"
    assert "msg_id" not in after


async def test_context_follows_into_tasks_and_stays_apart() -> None:
    stream = _configured("json")
    structlog.contextvars.bind_contextvars(bot="support")
    log = structlog.get_logger()

    async def turn(msg_id: str) -> None:
        structlog.contextvars.bind_contextvars(msg_id=msg_id)
        await asyncio.sleep(0)
        log.info("turn_done")

    await asyncio.gather(turn("a"), turn("b"))
    lines = _json_lines(stream)
    assert sorted(line["msg_id"] for line in lines) == ["a", "b"]
    assert all(line["bot"] == "support" for line in lines)


def test_level_filters_both_paths() -> None:
    stream = _configured("json", level="warning")
    structlog.get_logger().info("hidden")
    logging.getLogger("aiohttp.access").info("hidden too")
    structlog.get_logger().warning("shown")
    assert [line["event"] for line in _json_lines(stream)] == ["shown"]


@pytest.mark.parametrize(("level", "enabled"), [("debug", True), ("info", False), ("error", False)])
def test_debug_enabled_follows_the_configured_level(level: str, enabled: bool) -> None:
    _configured("json", level=level)
    assert debug_enabled() is enabled


def test_reconfiguring_replaces_the_handler_and_reaches_existing_loggers() -> None:
    early = structlog.get_logger("early")
    first = _configured("json")
    second = _configured("console")
    early.info("to_second")
    logging.getLogger("aiohttp.server").error("stdlib_to_second")
    assert first.getvalue() == ""
    assert "to_second" in second.getvalue()
    assert second.getvalue().count("stdlib_to_second") == 1


def test_console_output_is_one_readable_line() -> None:
    stream = _configured("console")
    with structlog.contextvars.bound_contextvars(bot="support"):
        structlog.get_logger().info("listening", host="127.0.0.1", port=8080)
    (line,) = stream.getvalue().splitlines()
    assert "listening" in line
    assert "bot=support" in line
    assert "port=8080" in line
    assert "\x1b[" not in line  # no colours on a stream that is not a terminal


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "json", io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml", io.StringIO())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("?access_token=abc&timestamp=1&sign=x%2By", "?access_token=***&timestamp=1&sign=***"),
        ("ACCESS_TOKEN=abc", "ACCESS_TOKEN=***"),
        ("BRIDGE_OPENAI_API_KEY=sk-1 BRIDGE_PORT=80", "BRIDGE_OPENAI_API_KEY=*** BRIDGE_PORT=80"),
        ("x-csrf-token=abc", "x-csrf-token=***"),
        ("design=1 assign=2 max_tokens=5 tokens=9", "design=1 assign=2 max_tokens=5 tokens=9"),
        ("authorization: Basic Zm9vOmJhcg==", "authorization: Basic ***"),
        ("bearer eyJhbGciOi.J9.x-y_z", "bearer ***"),
        ("{'Authorization': 'Bearer sk-1', 'n': 1}", "{'Authorization': '***', 'n': 1}"),
        ('{"token": "t-1", "tokens": 12}', '{"token": "***", "tokens": 12}'),
        ('"{\\"access_token\\": \\"a\\\\/b\\"}"', '"{\\"access_token\\": \\"***\\"}"'),
        ("Cookie: hiagent-csrf=a; x=b\nnext", "Cookie: ***\nnext"),
        ("rediss://user:pw@h:6380 http://h:80/p@x", "rediss://user:***@h:6380 http://h:80/p@x"),
        ("İstanbul token=abc", "İstanbul token=***"),
        ('accessToken=abc {"refreshToken":"r-1"}', 'accessToken=*** {"refreshToken":"***"}'),
        ("X-Api-Key: k-1\nX-Auth-Token:\tt-1", "X-Api-Key: ***\nX-Auth-Token:\t***"),
        ("token: t-1\n  def send(token: str):", "token: ***\n  def send(token: str):"),
        ("Session(api_key='k-1', token=\"t-1\")", "Session(api_key='***', token=\"***\")"),
        ("designToken=1 maxTokens=5 deSign=2", "designToken=*** maxTokens=5 deSign=***"),
        ("password=hunter2 passwd=x", "password=*** passwd=***"),
        ("nothing to see", "nothing to see"),
    ],
)
def test_mask_text(text: str, expected: str) -> None:
    assert mask_text(text) == expected


def test_registered_values_regex_safe_short_and_none_ignored() -> None:
    tricky = _secret("a.b*c(d)[e]")
    register_secrets([tricky, None, "", "abc"])
    assert mask_text(f"x {tricky} y") == "x *** y"
    assert mask_text("axbxc abc") == "axbxc abc"  # too short to be registered
    assert mask_text(json.dumps({"v": tricky + '"'})) == '{"v": "***\\""}'


def test_registered_values_from_four_characters_nested_and_percent_encoded() -> None:
    """A 4-character secret is masked (MIN_SECRET_LEN); a secret that holds another is
    masked whole, not its head only; a secret with a space and a `/` is masked as
    `quote(..., safe="")` encodes it (neither `quote_plus` nor yarl writes it so)."""
    short = "k7#Q"
    outer = _secret("outer")
    inner = outer[:20]
    spaced = _secret("open sesame/")
    register_secrets([short, inner, outer, spaced])
    assert mask_text(f"x {short} y") == "x *** y"
    assert mask_text(f"x {outer} y") == "x *** y"
    assert mask_text(f"q={quote(spaced, safe='')}&n=1") == "q=***&n=1"


def test_bytes_under_a_credential_name_are_masked() -> None:
    stream = _configured("json")
    structlog.get_logger().info("raw", access_token=b"raw-bytes-token-value", n=1)
    [line] = _json_lines(stream)
    assert line["access_token"] == MASK
    assert "raw-bytes-token-value" not in stream.getvalue()


def test_a_value_logged_before_its_secret_was_registered_is_masked_after() -> None:
    """Short values are masked through a cache: a registration must reach them too."""
    stream = _configured("json")
    late = _secret("late")
    for _ in range(2):
        structlog.get_logger().info("seen", value=late, long=late * 3)
    register_secrets([late])
    structlog.get_logger().info("seen", value=late, long=late * 3)
    *before, after = _json_lines(stream)
    assert [line["value"] for line in before] == [late, late]
    assert after["value"] == MASK and after["long"] == MASK * 3


def test_an_issued_credential_is_masked_in_any_form_and_only_the_last_few_are_kept() -> None:
    """Tokens handed out at run time (yach's app access token, HiAgent's CSRF cookies) are
    masked like configured secrets, also where nothing names them (an upstream's error
    quoting the token it refuses); as they rotate, only the last few of a kind stay."""
    kind = f"token-{uuid.uuid4().hex}"
    issued = [_secret(f"issued/{n}+=") for n in range(6)]  # (with what URLs encode)
    register_issued_secret(kind, issued[0])
    assert mask_text(f"invalid token {issued[0]}") == f"invalid token {MASK}"
    assert mask_text(f"t={quote(issued[0], safe='')}") == f"t={MASK}"
    for value in issued[1:]:
        register_issued_secret(kind, value)
    kept = issued[-4:]
    assert [mask_text(value) for value in kept] == [MASK] * 4
    assert [mask_text(value) for value in issued[:2]] == issued[:2]  # rotated out
    register_issued_secret(kind, None)
    register_issued_secret(kind, "abc")  # too short: ignored, as by register_secrets
    assert [mask_text(value) for value in kept] == [MASK] * 4


def test_json_lines_hold_what_orjson_refuses() -> None:
    stream = _configured("json")
    structlog.get_logger().info("big", count=2**70, ids={1: "a"})
    [line] = _json_lines(stream)
    assert line["count"] == 2**70 and line["ids"] == {"1": "a"}


def test_processor_does_not_mutate_the_callers_data() -> None:
    headers = {"Authorization": "Bearer abc", "sign": "s", "count": 3}
    event = {"event": "x", "headers": headers, "sign": "top", "token": 7, "n": None}
    out = mask_secrets(None, "info", event)
    assert out["headers"] == {"Authorization": "***", "sign": "***", "count": 3}
    assert headers == {"Authorization": "Bearer abc", "sign": "s", "count": 3}
    assert out["sign"] == "***"
    assert out["token"] == 7  # a number under a sensitive name is not a credential
    assert out["n"] is None


def test_processor_masks_reprs_of_other_objects() -> None:
    class Request:
        def __repr__(self) -> str:
            return "<Request https://h/?access_token=abc>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    event = {"event": "x", "req": Request(), "b": Broken(), "by": b"sign=a"}
    out = mask_secrets(None, "info", event)
    assert out["req"] == "<Request https://h/?access_token=***>"
    assert "repr failed" in out["b"]
    assert out["by"] == "b'sign=***'"


def test_capture_logs_still_sees_events() -> None:
    """Other tests assert events with capture_logs; our configuration must not get in the way."""
    _configured("json")
    with structlog.testing.capture_logs() as captured:
        structlog.get_logger().info("listening", port=0)
    assert captured == [{"event": "listening", "port": 0, "log_level": "info"}]


def test_camel_case_keys_are_masked() -> None:
    stream = _configured("json")
    session = {"accessToken": "at-0123456789", "user": {"name": "n"}, "expires": "2026-12-01"}
    structlog.get_logger("test").info("chatgpt_session", session=session, appSecret="s-98765")
    (line,) = _json_lines(stream)
    assert line["session"] == {"accessToken": "***", "user": {"name": "n"}, "expires": "2026-12-01"}
    assert line["appSecret"] == "***"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # redis-py reads the password to the last `@`: this one is `p@ssw0rd`.
        ("redis://:p@ssw0rd@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:a@b@c@redis.internal/0", "redis://user:***@redis.internal/0"),
        (  # not past the end of the URL to another `@`
            '{"url": "redis://:pw@h", "to": "a@b.example"}',
            '{"url": "redis://:***@h", "to": "a@b.example"}',
        ),
    ],
)
def test_a_url_password_holding_an_at_sign_is_masked_whole(text: str, shown: str) -> None:
    assert mask_text(text) == shown
