"""Environment → typed, validated, immutable Settings (SPEC §2)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from redis.connection import parse_url

from bridge.logging import mask_with

__all__ = [
    "ConfigError",
    "Rate",
    "Settings",
    "given_value",
    "load_settings",
    "masked_settings",
    "recording_format",
    "secret_values",
    "shadowed_files",
]

PREFIX = "BRIDGE_"
PLACEHOLDER = "change-me"
UPSTREAMS = ("openai", "hiagent", "coze", "dify", "aimaster", "yach-agent", "chatgpt-web", "replay")
IMAGE_PIPELINES = ("none", "native", "vision", "ocr", "autocut+ocr")
REPLAY_FORMATS = ("hiagent", "aimaster", "openai", "coze", "dify")


class ConfigError(Exception):
    """Every problem found in the environment, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `per_s` seconds; `count == 0` means unlimited."""

    count: int
    per_s: float

    @property
    def unlimited(self) -> bool:
        return self.count == 0

    def __str__(self) -> str:
        return "0" if self.unlimited else f"{self.count}/{self.per_s:g}"


def _parse_rate(raw: str) -> Rate:
    if raw.strip() == "0":
        return Rate(0, 0.0)
    count, sep, per = raw.partition("/")
    if not sep:
        raise ValueError("expected N/SECONDS")
    rate = Rate(_parse_int(count), _parse_finite(per))
    if rate.count < 0 or rate.per_s <= 0:
        raise ValueError("expected N/SECONDS with N >= 0 and SECONDS > 0")
    return rate


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _parse_list(raw: str) -> frozenset[str]:
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def _parse_json_object(raw: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _parse_int(raw: str) -> int:
    """`int(raw)`, refused in the operator's words rather than Python's ("invalid literal for
    int() with base 10")."""
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_finite(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:  # Python's "could not convert string to float" is no reason to show
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _parse_nonneg_float(raw: str) -> float:
    value = _parse_finite(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _parse_claim_idle(raw: str) -> float:
    """At least a second: a live worker renews its claims only every BRIDGE_CLAIM_IDLE_S/3
    (no more often than every 50 ms), so below that the claim loops of the other processes
    take over the entries of live workers (0 took every entry at once): each turn was
    restarted by each process in turn and dead-lettered unanswered."""
    value = _parse_finite(raw)
    if value < 1:
        raise ValueError("must be at least 1 (second): less takes messages from live workers")
    return value


def _parse_nonneg_int(raw: str) -> int:
    value = _parse_int(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _parse_positive_int(raw: str) -> int:
    value = _parse_int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _parse_port(raw: str) -> int:
    value = _parse_int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _parse_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def _parse_redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    parsed = parse_url(raw)  # as the client will: a port that is no number, or out of range
    if raw.startswith("unix://") and not parsed.get("path"):
        # Else a runtime failure, "Error 22 connecting to . Invalid argument." (exit 1)
        raise ValueError("a unix:// URL needs the socket's path (unix:///path/to/redis.sock)")
    return raw


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _parse_path(raw: str) -> Path:
    """A path, `~` expanded as a shell would (an EnvironmentFile, or a quoted value, does
    not: `~/state` made a folder named `~` in the working directory)."""
    return Path(raw).expanduser()


def _var(
    default: Any = None,
    *,
    parse: Callable[[str], Any] = str,
    example: str = "",
    secret: bool = False,
) -> Any:
    meta = {"parse": parse, "example": example, "secret": secret}
    if isinstance(default, frozenset | dict):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every `BRIDGE_*` variable, parsed. The attribute is the variable's name, lower-cased."""

    # Core
    host: str = _var("127.0.0.1", example="0.0.0.0")  # noqa: S104 - an example, not a default
    port: int = _var(8080, parse=_parse_port, example="8080")
    bot_id: str = _var("default", example="support")
    redis_url: str | None = _var(None, parse=_parse_redis_url, example="redis://127.0.0.1:6379/0")
    state_dir: Path | None = _var(None, parse=_parse_path, example="/var/lib/chatbridge/support")
    im: str = _var("yach", parse=_choice("yach"), example="yach")
    upstream: str | None = _var(None, parse=_choice(*UPSTREAMS), example="openai")
    log_format: str | None = _var(None, parse=_choice("json", "console"), example="json")
    log_level: str = _var(
        "info", parse=_choice("debug", "info", "warning", "error"), example="info"
    )
    lang: str = _var("zh", parse=_choice("zh", "en"), example="en")
    # Sessions, relay, limits
    session_scope: str = _var(
        "group_user", parse=_choice("group", "user", "group_user"), example="group"
    )
    session_ttl_s: float = _var(604800.0, parse=_parse_nonneg_float, example="604800")
    history_turns: int = _var(20, parse=_parse_nonneg_int, example="20")
    reply_mode: str = _var("stream", parse=_choice("stream", "final"), example="final")
    flush_min_chars: int = _var(300, parse=_parse_nonneg_int, example="300")
    flush_max_wait_s: float = _var(6.0, parse=_parse_nonneg_float, example="6")
    thinking_notice_s: float = _var(4.0, parse=_parse_nonneg_float, example="4")
    show_reasoning: str = _var("off", parse=_choice("off", "quote"), example="quote")
    workers: int = _var(32, parse=_parse_positive_int, example="32")
    session_queue_max: int = _var(5, parse=_parse_nonneg_int, example="5")
    max_attempts: int = _var(3, parse=_parse_positive_int, example="3")
    claim_idle_s: float = _var(60.0, parse=_parse_claim_idle, example="60")
    drain_timeout_s: float = _var(25.0, parse=_parse_nonneg_float, example="25")
    max_body_bytes: int = _var(1048576, parse=_parse_positive_int, example="1048576")
    max_input_chars: int = _var(8000, parse=_parse_positive_int, example="8000")
    max_answer_chars: int = _var(50000, parse=_parse_nonneg_int, example="50000")
    user_rate: Rate = _var(Rate(20, 60.0), parse=_parse_rate, example="20/60")
    allow_groups: frozenset[str] = _var(frozenset(), parse=_parse_list, example="cid1,cid2")
    allow_users: frozenset[str] = _var(frozenset(), parse=_parse_list, example="u1,012345")
    upstream_connect_timeout_s: float = _var(10.0, parse=_parse_nonneg_float, example="10")
    upstream_idle_timeout_s: float = _var(90.0, parse=_parse_nonneg_float, example="90")
    upstream_total_timeout_s: float = _var(600.0, parse=_parse_nonneg_float, example="600")
    upstream_retries: int = _var(3, parse=_parse_nonneg_int, example="3")
    max_image_bytes: int = _var(10485760, parse=_parse_positive_int, example="10485760")
    image_pipeline: str | None = _var(None, parse=_choice(*IMAGE_PIPELINES), example="ocr")
    ocr_base_url: str | None = _var(None, parse=_parse_url, example="https://ocr.example/v1")
    ocr_api_key: str | None = _var(None, secret=True, example="sk-...")
    ocr_model: str | None = _var(None, example="qwen-vl-max")
    autocut_url: str | None = _var(None, parse=_parse_url, example="https://cut.example/autocut")
    autocut_token: str | None = _var(None, secret=True, example="token")
    fetch_allow_hosts: frozenset[str] = _var(
        frozenset(), parse=_parse_list, example="images.internal"
    )
    # Yach
    yach_secret: str | None = _var(None, secret=True, example="SEC0123...")
    yach_insecure: bool = _var(False, parse=_parse_bool, example="1")
    yach_max_skew_s: float = _var(300.0, parse=_parse_nonneg_float, example="300")
    yach_robot_url: str | None = _var(
        None,
        parse=_parse_url,
        secret=True,
        example="https://yach-oapi.zhiyinlou.com/robot/send?access_token=...",
    )
    yach_robot_secret: str | None = _var(None, secret=True, example="SEC0123...")
    yach_api_base: str = _var(
        "https://yach-oapi.zhiyinlou.com",
        parse=_parse_url,
        example="https://yach-oapi.zhiyinlou.com",
    )
    yach_app_key: str | None = _var(None, secret=True, example="appkey")
    yach_app_secret: str | None = _var(None, secret=True, example="appsecret")
    yach_send_rate: Rate = _var(Rate(20, 60.0), parse=_parse_rate, example="20/60")
    yach_msg_format: str = _var("markdown", parse=_choice("markdown", "text"), example="text")
    # Upstreams
    openai_base_url: str = _var(
        "https://api.openai.com/v1", parse=_parse_url, example="https://api.openai.com/v1"
    )
    openai_api_key: str | None = _var(None, secret=True, example="sk-...")
    openai_model: str | None = _var(None, example="gpt-4o-mini")
    openai_system_prompt: str | None = _var(None, example="You are a helpful assistant.")
    openai_temperature: float | None = _var(None, parse=_parse_finite, example="0.7")
    hiagent_base_url: str | None = _var(None, parse=_parse_url, example="https://open.zju.edu.cn")
    hiagent_app_key: str | None = _var(None, secret=True, example="d0abc...")
    hiagent_page_path: str = _var(
        "/product/llm/chat/{app_key}", example="/product/llm/chat/{app_key}"
    )
    hiagent_visitor_key: str | None = _var(None, secret=True, example="visitor-key")
    hiagent_inputs: dict[str, Any] = _var({}, parse=_parse_json_object, example='{"k":"v"}')
    coze_base_url: str = _var(
        "https://api.coze.cn", parse=_parse_url, example="https://api.coze.cn"
    )
    coze_token: str | None = _var(None, secret=True, example="pat_...")
    coze_bot_id: str | None = _var(None, example="7350000000000000000")
    dify_base_url: str | None = _var(None, parse=_parse_url, example="https://api.dify.ai/v1")
    dify_api_key: str | None = _var(None, secret=True, example="app-...")
    dify_inputs: dict[str, Any] = _var({}, parse=_parse_json_object, example='{"k":"v"}')
    aimaster_base_url: str | None = _var(
        None, parse=_parse_url, example="https://aimaster.example/dev-api"
    )
    aimaster_token: str | None = _var(None, secret=True, example="eyJ...")
    aimaster_scenario_id: str | None = _var(None, example="1897500000000000000")
    aimaster_params: dict[str, Any] = _var({}, parse=_parse_json_object, example='{"k":"v"}')
    yach_agent_biz_id: str | None = _var(None, example="012345")
    yach_agent_inputs: dict[str, Any] = _var({}, parse=_parse_json_object, example='{"k":"v"}')
    yach_agent_stream_url: str | None = _var(
        None, parse=_parse_url, example="https://yach-oapi.zhiyinlou.com/...?stream_id={stream_id}"
    )
    chatgpt_base_url: str = _var(
        "https://chatgpt.com/backend-api",
        parse=_parse_url,
        example="https://chatgpt.com/backend-api",
    )
    chatgpt_access_token: str | None = _var(None, secret=True, example="eyJ...")
    chatgpt_model: str = _var("auto", example="gpt-4o")
    replay_file: Path | None = _var(None, parse=_parse_path, example="/path/to/recording.sse")
    replay_format: str | None = _var(
        None, parse=_choice(*REPLAY_FORMATS), example="hiagent"
    )
    replay_cps: float = _var(0.0, parse=_parse_nonneg_float, example="200")

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        systemd_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if systemd_dir:
            return Path(systemd_dir)
        return Path.home() / ".local" / "state" / "chatbridge"

    @property
    def resolved_image_pipeline(self) -> str:
        if self.image_pipeline is not None:
            return self.image_pipeline
        return {"openai": "vision", "yach-agent": "native"}.get(self.upstream or "", "none")

    @property
    def resolved_log_format(self) -> str:
        if self.log_format is not None:
            return self.log_format
        return "console" if sys.stdout.isatty() else "json"

    @property
    def yach_sign_secret(self) -> str | None:
        """The key that signs outbound robot sends."""
        return self.yach_robot_secret or self.yach_secret

    @property
    def key_prefix(self) -> str:
        return f"chatbridge:{{{self.bot_id}}}:"


def env_name(attr: str) -> str:
    return PREFIX + attr.upper()


# What each upstream cannot start without (beyond what has a default).
REQUIRED_BY_UPSTREAM: dict[str, tuple[str, ...]] = {
    "openai": ("openai_api_key", "openai_model"),
    "hiagent": ("hiagent_base_url", "hiagent_app_key"),
    "coze": ("coze_token", "coze_bot_id"),
    "dify": ("dify_base_url", "dify_api_key"),
    "aimaster": ("aimaster_base_url", "aimaster_token", "aimaster_scenario_id"),
    "yach-agent": ("yach_app_key", "yach_app_secret"),
    "chatgpt-web": ("chatgpt_access_token",),
    "replay": ("replay_file",),  # and the format of a single file (in `_missing`)
}
REQUIRED_BY_IMAGE_PIPELINE: dict[str, tuple[str, ...]] = {
    "ocr": ("ocr_base_url", "ocr_model"),
    "autocut+ocr": ("ocr_base_url", "ocr_model", "autocut_url"),
}
# The pipelines that hand the images themselves to the upstream, and the upstreams that read
# them: `native` passes the URLs (yach-agent's `image_text`), `vision` adds the bytes as data
# URLs (OpenAI's `image_url` parts; yach-agent is still passed the URLs). Another upstream
# would get the text alone, the image dropped unseen.
IMAGES_READ_BY: dict[str, tuple[str, ...]] = {
    "native": ("yach-agent",),
    "vision": ("openai", "yach-agent"),
}


def _read_raw(attr: str, env: Mapping[str, str], problems: list[str]) -> str | None:
    name = env_name(attr)
    value = env.get(name, "")
    file_path = env.get(name + "_FILE", "")
    if value.strip() in ("", PLACEHOLDER) and file_path:
        path, why = _parse_path(file_path), ""
        if path.exists() and not path.is_file():  # a FIFO or a device: a read that never ends
            why = "not a regular file"
        else:
            try:
                value = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "not UTF-8 text"
        if why:
            problems.append(
                f"{name}_FILE: cannot read {file_path!r} ({why}); example: "
                f"{name}_FILE=/etc/chatbridge/credentials/{attr}"
            )
            return None
    if not value.strip() or value.strip() == PLACEHOLDER:
        return None
    return value


def given_value(attr: str, env: Mapping[str, str]) -> str | None:
    """The value `env` sets for `attr` (itself or its `_FILE`), stripped; None when it sets
    none (an empty or placeholder value sets none)."""
    raw = _read_raw(attr, env, [])
    return None if raw is None else raw.strip()


def _known_names() -> set[str]:
    names = {env_name(f.name) for f in fields(Settings)}
    return names | {name + "_FILE" for name in names}


def shadowed_files(env: Mapping[str, str]) -> list[str]:
    """The `X_FILE` variables left unread because `X` itself is set too (X wins)."""
    names = (env_name(spec.name) for spec in fields(Settings))
    return sorted(
        f"{name}_FILE"
        for name in names
        if env.get(f"{name}_FILE", "").strip()
        and env.get(name, "").strip() not in ("", PLACEHOLDER)
    )


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    known = _known_names()
    return sorted(name for name in env if name.startswith(PREFIX) and name not in known)


def load_settings(env: Mapping[str, str] | None = None, *, command: str = "run") -> Settings:
    """Parse and validate the environment for `command`; raise ConfigError listing every problem.

    `command` is `run`, `chat`, `check` (validated exactly as `run`) or `demo`.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    values: dict[str, Any] = {}
    invalid: set[str] = set()  # reported as invalid: not reported missing as well
    raws: dict[str, str | None] = {}
    for spec in fields(Settings):
        known_problems = len(problems)
        raws[spec.name] = _read_raw(spec.name, env, problems)
        if len(problems) > known_problems:
            invalid.add(spec.name)  # its _FILE cannot be read: not also "required but not set"
    # A secret pasted into another variable too is hidden in that variable's problem line.
    given_secrets = [
        raw for spec in fields(Settings) if spec.metadata["secret"] and (raw := raws[spec.name])
    ]
    for spec in fields(Settings):
        raw = raws[spec.name]
        if raw is None:
            continue
        try:
            values[spec.name] = spec.metadata["parse"](raw.strip())
        except (ValueError, json.JSONDecodeError) as exc:
            invalid.add(spec.name)
            example = spec.metadata["example"]
            shown = "(hidden)" if spec.metadata["secret"] else repr(mask_with(raw, given_secrets))
            problems.append(
                f"{env_name(spec.name)}: invalid value {shown}: {exc}; example: "
                f"{env_name(spec.name)}={example}"
            )
    settings = Settings(**values)
    if command in ("run", "check", "chat"):
        problems.extend(_missing(settings, command, invalid))
        problems.extend(_not_found(settings))
        problems.extend(_images_unread(settings))
    if problems:
        raise ConfigError(problems)
    return settings


def _missing(settings: Settings, command: str, invalid: set[str]) -> list[str]:
    required: list[str] = []
    if settings.upstream is None:
        required.append("upstream")  # unless invalid (below): what it needs is unknown
    else:
        required.extend(REQUIRED_BY_UPSTREAM[settings.upstream])
    if settings.upstream == "replay" and settings.replay_file and settings.replay_file.is_file():
        required.append("replay_format")  # a folder's files are named by their format
    required.extend(REQUIRED_BY_IMAGE_PIPELINE.get(settings.resolved_image_pipeline, ()))
    if command != "chat" and not settings.yach_insecure:
        required.append("yach_secret")
    return [
        f"{env_name(attr)}: required but not set; example: {env_name(attr)}={_example(attr)}"
        for attr in dict.fromkeys(required)
        if getattr(settings, attr) in (None, "") and attr not in invalid
    ]


def _not_found(settings: Settings) -> list[str]:
    """Paths the configuration names that do not exist: listed with the other problems, not
    by the one part that opens them once everything else is right."""
    path = settings.replay_file if settings.upstream == "replay" else None
    if path is None:
        return []
    if not path.exists():
        why = f"no such file or folder {str(path)!r}"
    elif path.is_dir() and not _has_recordings(path):
        why = (f"the folder {str(path)!r} holds no recordings (.sse files named after their "
               f"format: {', '.join(f'{fmt}-….sse' for fmt in REPLAY_FORMATS)})")
    else:
        return []
    return [f"BRIDGE_REPLAY_FILE: {why}; example: BRIDGE_REPLAY_FILE={_example('replay_file')}"]


def _has_recordings(folder: Path) -> bool:
    """Whether the replay upstream finds something to play in `folder`."""
    try:
        return any(recording_format(entry.name) and entry.is_file() for entry in folder.iterdir())
    except OSError:
        return True  # unreadable: the adapter says why


def recording_format(file_name: str) -> str | None:
    """The format a recording in a replay folder is named for (`aimaster-scenario.sse` →
    `aimaster`); None for a file of no known format, which the replay upstream leaves out."""
    fmt = file_name.partition("-")[0]
    return fmt if file_name.endswith(".sse") and fmt in REPLAY_FORMATS else None


def _images_unread(settings: Settings) -> list[str]:
    """A pipeline that hands images to an upstream that does not read them."""
    pipeline, upstream = settings.image_pipeline, settings.upstream
    readers = IMAGES_READ_BY.get(pipeline or "")
    if upstream is None or readers is None or upstream in readers:
        return []
    return [
        f"BRIDGE_IMAGE_PIPELINE: {pipeline} hands images to the upstream, and {upstream} does "
        f"not read them (only {' and '.join(readers)}: with {upstream} a question's image "
        f"would be dropped unseen); example: BRIDGE_IMAGE_PIPELINE=ocr"
    ]


def _example(attr: str) -> str:
    for spec in fields(Settings):
        if spec.name == attr:
            return str(spec.metadata["example"])
    raise KeyError(attr)


# Lists whose empty value allows nothing (the fetch guard's); the other lists allow everyone.
_EMPTY_ALLOWS_NONE = frozenset({"fetch_allow_hosts"})


def _shown(value: Any, secret: bool, *, empty: str = "(all)") -> str:
    if value is None:
        return "(unset)"
    if secret:
        return "****** (set)"
    if isinstance(value, frozenset):
        return ",".join(sorted(value)) or empty
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# Settings whose default depends on others or on the machine: shown as they resolve.
_DERIVED = {
    "state_dir": "resolved_state_dir",
    "image_pipeline": "resolved_image_pipeline",
    "log_format": "resolved_log_format",
}


def masked_settings(settings: Settings) -> list[tuple[str, str]]:
    """(variable, shown value) for every setting, resolved, secrets replaced; for
    `chatbridge check`."""
    shown = []
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        if value is None and spec.name in _DERIVED:
            text = f"{getattr(settings, _DERIVED[spec.name])} (default)"
        elif value is None and spec.name == "yach_robot_secret" and settings.yach_sign_secret:
            text = f"{_shown(settings.yach_sign_secret, True)} (default: BRIDGE_YACH_SECRET)"
        else:
            empty = "(none)" if spec.name in _EMPTY_ALLOWS_NONE else "(all)"
            text = _shown(value, spec.metadata["secret"], empty=empty)
        shown.append((env_name(spec.name), text))
    return shown


def secret_values(settings: Settings) -> list[str]:
    """What logs and `check` must never show: every secret setting, and the query values of
    those that are URLs. A server quotes a credential alone (Yach: "不合法的access_token:
    …" for the robot URL's token), where the whole URL registered as one value is not found
    and no `access_token=` shape is either."""
    values: list[str] = []
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        if spec.metadata["secret"] and isinstance(value, str):
            values.append(value)
            if "://" in value:
                values += [item for _, item in parse_qsl(urlsplit(value).query)]
    return values
