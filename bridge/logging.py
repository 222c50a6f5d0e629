"""structlog set-up for every `chatbridge` command, and the processor that masks secrets.

One line per event, JSON under systemd or a console rendering on a terminal. Lines logged
through the standard library (aiohttp, redis, asyncio) go through the same processors and the
same renderer, so they are masked and formatted like our own. Context bound with
`structlog.contextvars.bind_contextvars` (`bot` once at start; `chat_session_id`, `msg_id`,
`upstream` per turn) is merged into every line, the standard library's included.

`mask_secrets` replaces with `***`, in every string of the event (nested dicts and lists too,
the rendered traceback included): the values given to `register_secrets` (and the last few
credentials of each kind given to `register_issued_secret`), in their raw,
URL-encoded and JSON-escaped forms; `access_token=`, `sign=`, `token=`, `appsecret=`,
`secret=`, `password=`… parameters (also with a prefix such as `x_csrf_token=` or
`BRIDGE_YACH_SECRET=`, or in camelCase: `accessToken=`); `Authorization:`, `X-Api-Key:` and
other header lines of those names, and `Bearer …` credentials; JSON or Python dict fields of
those names (`"access_token": "…"`); the password of a URL (`redis://:pw@host`); and the
value of any event or dict key of those names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, TextIO, cast
from urllib.parse import quote, quote_plus

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "MASK",
    "as_text",
    "clip",
    "clip_value",
    "configure_logging",
    "debug_enabled",
    "discard_output",
    "mask_secrets",
    "mask_text",
    "mask_with",
    "register_issued_secret",
    "register_secrets",
]

MASK = "***"
# Shorter values are not secrets worth the damage: masking "abc" would garble every line.
MIN_SECRET_LEN = 4

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Names whose value is a credential: as a URL/form parameter, a JSON field, an event key.
# A name may carry a prefix ending in `_` or `-` (`x-csrf-token`, `BRIDGE_OPENAI_API_KEY`),
# never a bare one (`design=` is not `sign=`).
_NAMES = (
    r"access_token|refresh_token|id_token|token|sign|signature|appsecret|app_secret"
    r"|client_secret|secret|api_key|api-key|apikey|password|passwd|authorization|cookie|csrf"
)
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SENSITIVE_KEY = re.compile(rf"(?:[\w-]*[_-])?(?:{_NAMES})|app-visitor-key", re.IGNORECASE)

# The patterns run on `text.lower()`, case-sensitively: a case-insensitive regex defeats
# sre's literal scan and is several times slower. Each branch starts with a literal and
# captures the credential in a group named after the branch; only that group is masked.
_PATTERNS = re.compile(
    "|".join(
        (
            # access_token=… (URL, form body, env dump; quoted as Python prints a keyword)
            # or "access_token": "…" (JSON, a Python repr, JSON escaped inside a JSON string).
            rf"(?:{_NAMES})(?:=[\"']?(?P<param>[^\s&#\"'<>]+)"
            r"|\\?[\"']\s*:\s*\\?[\"'](?P<json>(?:[^\"'\\]|\\\\|\\[^\"'\\])+))",
            # Authorization: Bearer … / authorization=Basic … (header dumps).
            r"authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?"
            r"(?P<auth>[^\s\"',;}\]]+)",
            # Cookie: a=b; c=d — everything to the end of the header value.
            r"cookie[\"']?\s*:\s*[\"']?(?P<cookie>[^\"'\r\n]+)",
            # Bearer … anywhere else.
            r"bearer\s+(?P<bearer>[a-z0-9\-._~+/]+=*)",
            # scheme://user:password@host, to the last `@` of the authority as redis-py and
            # urllib read it: `redis://:p@ss@host` has the password `p@ss` (stopping at the
            # first `@` left `ss` showing). Not past a quote, `<` or `>`: the end of the URL.
            r"://[^\s:/@]*:(?P<userinfo>[^\s/\"'<>]+)(?=@)",
            # X-Api-Key: … (a header line: the name starts the line or ends a dashed header
            # name, not `token: str` in a traceback's source line; after the Authorization
            # and Cookie branches).
            rf"(?:(?<=-)|(?<![^\n]))(?:{_NAMES})[ \t]*:[ \t]*(?P<header>[^\s\"',;}}\]]+)",
        )
    )
)
_SLOW_PATTERNS = re.compile(_PATTERNS.pattern, re.IGNORECASE)
# A cheap scan that rules out most strings before `_PATTERNS` runs.
_TRIGGER = re.compile(r"token|sign|secret|key|passw|auth|cookie|csrf|bearer|://")

# Not masked: structlog's own bookkeeping on records that come from the standard library, and
# what our own processors wrote just before (`add_log_level`, `TimeStamper`: they overwrite
# whatever a caller passed under those names).
_SKIP_KEYS = frozenset({"_record", "_from_structlog", "level", "timestamp"})
# Strings up to this long are masked through a cache: most values of a line (event names,
# kinds, ids of sessions and users) recur line after line.
_CACHED_LEN = 64

# The level configure_logging set (none yet: everything passes, as structlog's default does).
_level = logging.NOTSET

_secrets_lock = threading.Lock()
_secret_values: set[str] = set()
_ISSUED_KEPT = 4  # credentials issued at run time kept masked, per kind
_issued_values: dict[str, deque[str]] = {}
_secrets_re: re.Pattern[str] | None = None
_secrets_version = 0  # bumped by every registration: a key of the cache of masked strings


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these exact values (and their JSON-escaped and URL-encoded forms) from now on.

    Values shorter than `MIN_SECRET_LEN` and `None` are ignored. Registration accumulates
    for the life of the process; the matching regex is rebuilt once per call.
    """
    with _secrets_lock:
        for value in values:
            if value is not None and len(value.strip()) >= MIN_SECRET_LEN:
                _secret_values.update(_forms(value.strip()))
        _rebuild()


def register_issued_secret(kind: str, value: str | None) -> None:
    """Mask a credential handed out at run time (an access token, a CSRF token) as a
    configured secret is masked: an upstream that refuses it may quote it in its error,
    which the log then shows. Such credentials are replaced as they expire, so only the
    last `_ISSUED_KEPT` of each `kind` are kept (a process that runs for months must not
    grow the regex that every log string goes through); a value already kept is not
    registered again."""
    if value is None or len(value.strip()) < MIN_SECRET_LEN:
        return
    value = value.strip()
    with _secrets_lock:
        kept = _issued_values.setdefault(kind, deque(maxlen=_ISSUED_KEPT))
        if value in kept:
            return
        kept.append(value)
        _rebuild()


def _forms(value: str) -> tuple[str, ...]:
    return (
        value,
        json.dumps(value)[1:-1],
        quote(value, safe=""),
        quote_plus(value),
        quote(value, safe="/?:@"),  # how yarl (aiohttp) encodes a query value
    )


def _rebuild() -> None:
    """The regex of every registered value, rebuilt (under `_secrets_lock`)."""
    global _secrets_re, _secrets_version
    values = set(_secret_values)
    for kept in _issued_values.values():
        for value in kept:
            values.update(_forms(value))
    if values:
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(values, key=len, reverse=True)
        _secrets_re = re.compile("|".join(map(re.escape, ordered)))
    _secrets_version += 1
    _mask_short.cache_clear()


def _mask_patterns(text: str, lowered: str, patterns: re.Pattern[str]) -> str:
    parts: list[str] = []
    done = 0
    for match in patterns.finditer(lowered):
        group = match.lastgroup or ""
        # A name must not continue a word: `design=` is not `sign=`; `x_sign=` is, and so
        # is a camelCase hump (`accessToken=`, `"refreshToken":`).
        at = match.start()
        if group != "userinfo" and at > 0 and lowered[at - 1].isalnum() and not _hump(text, at):
            continue
        start, end = match.span(group)
        parts += (text[done:start], MASK)
        done = end
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _hump(text: str, at: int) -> bool:
    return text[at].isupper() and text[at - 1].islower()


def mask_text(text: str) -> str:
    """`text` with every registered secret and every credential-shaped substring masked."""
    secrets_re = _secrets_re
    if secrets_re is not None:
        text = secrets_re.sub(MASK, text)
    lowered = text.lower()
    if _TRIGGER.search(lowered) is None:
        return text
    if len(lowered) == len(text):  # offsets in `lowered` are offsets in `text`
        return _mask_patterns(text, lowered, _PATTERNS)
    return _mask_patterns(text, text, _SLOW_PATTERNS)  # rare: a letter that lowers to two


def mask_with(text: str, values: Iterable[str]) -> str:
    """`mask_text`, and these values masked too (their forms, as registered ones are),
    without registering them: for text shown before the process knows its secrets."""
    forms = {form for value in values if len(value.strip()) >= MIN_SECRET_LEN
             for form in _forms(value.strip())}
    for form in sorted(forms, key=len, reverse=True):  # a secret containing another: whole
        text = text.replace(form, MASK)
    return mask_text(text)


def clip(text: str, limit: int) -> str:
    """`text` masked, then cut to `limit` characters, for error details quoting what a server
    answered. Cut first, a secret the answer echoes across the cut would leave its head behind,
    which masking (of whole values) no longer recognises."""
    return mask_text(text)[:limit]


def clip_value(value: object, limit: int) -> str:
    """`clip` of any value a server sent as JSON (a code, a message that is no string)."""
    return clip(as_text(value), limit)


def as_text(value: object) -> str:
    """A JSON value as text: a string itself, anything else as `str` shows it; a list or
    object nested deeper than `str` can recurse through (orjson reads 1024 levels) by its
    type alone, not as a RecursionError that fails the entry with a traceback."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep>"


@functools.lru_cache(maxsize=4096)
def _mask_short(text: str, secrets_version: int) -> str:
    return mask_text(text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) <= _CACHED_LEN:
            return _mask_short(value, _secrets_version)
        return mask_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {key: _mask_item(key, item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(item) for item in value]
    # Anything else is rendered by its repr (structlog's JSON fallback, and the console's).
    try:
        shown = repr(value)
    except Exception:  # a broken __repr__ must not lose the log line
        shown = f"<{type(value).__name__} object (repr failed)>"
    return mask_text(shown)


@functools.lru_cache(maxsize=4096)
def _is_sensitive_key(key: str) -> bool:
    """`api_key`, `X-Csrf-Token`, and in camelCase `accessToken`, `appSecret`."""
    return _SENSITIVE_KEY.fullmatch(_CAMEL_HUMP.sub("_", key)) is not None


def _mask_item(key: Any, value: Any) -> Any:
    if isinstance(value, str | bytes) and isinstance(key, str) and _is_sensitive_key(key):
        return MASK
    return _mask_value(value)


def mask_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in every value of the event, tracebacks included.

    An `exc_info` still in the event is rendered to the `exception` text first (as
    `structlog.processors.format_exc_info` does), so no renderer ever prints a traceback
    that was not masked.
    """
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    for key, value in event_dict.items():
        if key not in _SKIP_KEYS:
            event_dict[key] = _mask_item(key, value)
    return event_dict


_LEADING_KEYS = ("timestamp", "level", "event")


def _json_renderer() -> Processor:
    def render_event_first(logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        # timestamp, level and event lead the line: what a person reading the journal scans.
        ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
        ordered.update(event_dict)
        try:  # every value is masked text by now: repr is for keys and is never reached else
            return orjson.dumps(ordered, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # what orjson refuses: a lone surrogate, an integer beyond 64 bits
            return json.dumps(ordered, ensure_ascii=False, default=repr)

    return render_event_first


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "json":
        return _json_renderer()
    if fmt == "console":
        isatty = getattr(stream, "isatty", None)
        return structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))
    raise ValueError(f"unknown log format {fmt!r}: expected json or console")


def discard_output(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null: its reader has gone, and what is still
    buffered, or written later, must not fail (the interpreter's last flush of a broken
    stdout printed "Exception ignored … BrokenPipeError" and made the exit status 120)."""
    with contextlib.suppress(OSError, ValueError):  # no descriptor (a StringIO), closed
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


class _Unread:
    """The stream log lines go to, lines dropped once nobody reads them.

    `chatbridge run | tee run.log` with tee gone, or a journal stream cut under a unit: each
    line met EPIPE, and the BrokenPipeError came out of every `log.info` in the daemon. Each
    turn died on its first line (messages taken, none answered, /readyz still 200) and a
    SIGTERM ended in a traceback, exit 1. The process goes on without its log."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except ConnectionError:  # EPIPE, ECONNRESET: the reader has gone
            discard_output(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except ConnectionError:
            discard_output(self._stream)


class _BridgeHandler(logging.StreamHandler[TextIO]):
    """The root handler this module installs; replaced, not duplicated, on reconfiguration."""


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send structlog and standard-library logging, masked and rendered as `fmt`, to `stream`.

    `level` is `debug`, `info`, `warning` or `error`; `fmt` is `json` or `console`; `stream`
    defaults to `sys.stdout` (`chat` and `demo` pass `sys.stderr`). May be called again (tests
    do): the previous configuration is replaced. Loggers are not cached on first use, so a
    module-level `structlog.get_logger()` follows a later reconfiguration.
    """
    global _level
    numeric_level = _LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(_LEVELS)}")
    _level = numeric_level
    stream = sys.stdout if stream is None else stream
    renderer = _renderer(fmt, stream)
    lines = cast(TextIO, _Unread(stream))
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=lines),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(numeric_level, lines, shared, renderer)


def debug_enabled() -> bool:
    """Whether debug lines are written. A hot path asks before it logs at debug: a call on a
    module's logger builds a bound logger (the loggers are not cached) even when the line is
    filtered out, ~2.5 µs."""
    return _level <= logging.DEBUG


def _route_stdlib(
    level: int, stream: TextIO, shared: list[Processor], renderer: Processor
) -> None:
    handler = _BridgeHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                mask_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
