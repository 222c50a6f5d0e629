"""Yach (知音楼) chat robot: verify and parse its webhooks, send answers back (SPEC §4)."""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson
from yarl import URL

from adapters.yach_api import YachAPI, YachAPIError, signed_robot_url, verify_sign
from bridge import jsontext
from bridge.config import Settings
from bridge.interfaces import InboundMessage, Piece, ReplyTarget, Sender, SendError, WebhookRejected

__all__ = [
    "MAX_CHARS",
    "YachIM",
    "decode_body",
    "extract_images",
    "on_api_host",
    "parse_payload",
    "render",
    "reply_gaps",
    "skew_gaps",
    "strip_mention",
    "unverified_gaps",
]

MAX_CHARS = 5000
# Below this a timestamp check refuses real messages: delivery delay and clock drift alone.
MIN_USEFUL_SKEW_S = 5.0
DEFAULT_RATE_LIMIT_BACKOFF_S = 2.0
_IMAGE_MARKER = re.compile(r"image::(\S+?)::")
_LEADING_MENTION = re.compile(r"^\s*@[^\s\u2005]+[\s\u2005]*")
_TITLE_CHARS = 30
# The escape of a UTF-16 surrogate: valid JSON, but alone it is no character UTF-8 can hold.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# More digits are no time in milliseconds (and would not fit the stored JSON's 64 bits).
_MAX_MS_DIGITS = 18
_SECONDS_BELOW = 10**11  # a creation time below this is in seconds (in ms it is 1973)

_ALIASES: dict[str, tuple[str, ...]] = {
    "msg_id": ("msgId", "msg_id", "message_id"),
    # `markdown.text`: where a `markdown` message (one of SPEC's types) holds its text, as the
    # outbound format does; read only when none of SPEC's three names is present.
    "text": ("text.content", "content", "text", "markdown.text"),
    "msg_type": ("msgtype", "msg_type"),
    "image": ("image.url", "picUrl", "image_url"),
    "sender_id": ("senderId", "sender_id", "fromUserId"),
    "sender_name": ("senderNick", "sender_name"),
    "work_code": ("senderStaffId", "workCode"),
    "conversation_id": ("conversationId", "groupId", "group_id"),
    # `conversation_type`: the snake_case spelling, as every other field has one; without it
    # a direct chat sent in snake_case was a 400 ("no conversation"), never answered.
    "conversation_type": ("conversationType", "conversation_type"),
    "reply_url": ("sessionWebhook",),
    "created_at": ("createAt",),
}
# The aliases split once: a top-level name, or the path of a nested field followed by its
# name as one flat key (a form cannot nest: `text.content=…` is the same field written flat).
_PATHS = {
    field: tuple(
        form
        for alias in aliases
        for form in ((tuple(alias.split(".")), alias) if "." in alias else (alias,))
    )
    for field, aliases in _ALIASES.items()
}


def _nested(payload: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value = payload.get(path[0])
    for part in path[1:]:
        if isinstance(value, str) and value.startswith("{"):
            value = _json_object(value) or value
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _first(payload: Mapping[str, Any], field: str) -> str:
    """The first present alias of a field, as text ("" when none is present)."""
    for alias in _PATHS[field]:
        value = payload.get(alias) if isinstance(alias, str) else _nested(payload, alias)
        if type(value) is str:  # nearly every field: no conversion to make
            if value:
                return value
            continue
        if value is None or isinstance(value, dict | list):
            continue
        text = value if isinstance(value, str) else str(value)
        if text:
            return text
    return ""


def _json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in `text` (None when it holds none or nests deeper than Python's
    stack: no message of the platform does)."""
    try:
        return _read_json_object(text)
    except RecursionError:
        return None


def _read_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in `text` (None when it holds none), read exactly as the standard
    library reads it: by orjson (4× faster) where the two agree. orjson refuses what `json`
    accepts (NaN, a lone surrogate) and reads an integer beyond 64 bits as a float (a message
    id `123…` rounded): such texts, and any with a float, are read by `json`."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    else:
        if _without_floats(value):
            return value if isinstance(value, dict) else None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if _SURROGATE_ESCAPE.search(text):  # a pair makes one character; a lone one cannot be stored
        json.dumps(value, ensure_ascii=False).encode()  # UnicodeEncodeError, a ValueError
    return value if isinstance(value, dict) else None


def _without_floats(value: Any) -> bool:
    kind = type(value)
    if kind is not dict and kind is not list:
        return kind is not float
    for item in value.values() if kind is dict else value:
        kind = type(item)
        if kind is float or ((kind is dict or kind is list) and not _without_floats(item)):
            return False
    return True


def decode_body(body: bytes) -> dict[str, Any]:
    """JSON, or a form (whose single field may hold the JSON); ValueError when neither.

    A byte-order mark is ignored (RFC 8259 allows a reader to). A form is read as the
    form-urlencoded standard reads it: empty `&`-separated parts (a trailing `&`, `&&`)
    and whitespace around the body are no fields. A part without `=` (other than a lone
    JSON object) makes the body no form; the reason never quotes the body (it may be a
    megabyte, and it is logged)."""
    text = body.removeprefix(codecs.BOM_UTF8).decode().strip()  # the codec "utf-8-sig": 8× slower
    if text.startswith("{"):
        payload = _json_object(text)
        if payload is None:
            raise ValueError("body is not a JSON object")
        return payload
    parts = [part for part in text.split("&") if part]
    fields = dict(parse_qsl("&".join(parts), keep_blank_values=True))
    if len(fields) == 1:
        key, value = next(iter(fields.items()))
        unpacked = _json_object(value) or (_json_object(key) if not value else None)
        if unpacked is not None:
            return unpacked
    if not fields:
        raise ValueError("empty body")
    if any("=" not in part for part in parts):
        raise ValueError("body is neither a JSON object nor a form")
    return fields


def strip_mention(text: str) -> str:
    """Drop the leading `@bot` mention the platform puts before the question."""
    if "@" not in text:
        return text.strip()
    return _LEADING_MENTION.sub("", text, count=1).strip()


def extract_images(text: str) -> tuple[str, tuple[str, ...]]:
    """Split `image::URL::` markers (the image_text convention) out of the text."""
    if "image::" not in text:
        return text, ()
    urls = tuple(_IMAGE_MARKER.findall(text))
    return (_IMAGE_MARKER.sub("", text).strip(), urls) if urls else (text, ())


def _dedupe_key(
    payload: Mapping[str, Any], msg_id: str, sender: str, conversation: str, text: str
) -> str | None:
    if msg_id:
        return "id:" + msg_id
    created = _first(payload, "created_at")
    if not created:
        return None
    digest = hashlib.sha256(f"{sender}\n{conversation}\n{created}\n{text}".encode()).hexdigest()
    return "h:" + digest


def parse_payload(payload: Mapping[str, Any]) -> InboundMessage:
    """An InboundMessage from a decoded webhook payload; ValueError names what is missing."""
    sender_id = _first(payload, "sender_id")
    conversation_id = _first(payload, "conversation_id")
    is_direct = _first(payload, "conversation_type") == "1"
    if not sender_id:
        raise ValueError("no sender (senderId)")
    if not conversation_id and not is_direct:
        raise ValueError("no conversation (conversationId)")
    raw_text = _first(payload, "text")
    text, images = extract_images(strip_mention(raw_text))
    image = _first(payload, "image")
    if image:
        images = (image, *images)
    msg_id = _first(payload, "msg_id")
    created = _first(payload, "created_at")
    return InboundMessage(
        im_msg_id=msg_id,
        text=text,
        sender=Sender(sender_id, _first(payload, "sender_name"), _first(payload, "work_code")),
        conversation_id=conversation_id or sender_id,
        is_direct=is_direct,
        msg_type=_first(payload, "msg_type") or "text",
        image_urls=images,
        reply_url=_first(payload, "reply_url"),
        created_at_ms=_created_at_ms(created),
        dedupe_key=_dedupe_key(payload, msg_id, sender_id, conversation_id, raw_text),
    )


def _created_at_ms(created: str) -> int | None:
    """`createAt` in milliseconds. SPEC gives no unit (the header `timestamp` is in ms);
    a value below 10^11 (in ms, March 1973) is a Unix time in seconds, as the agent API's
    `create_at` is: read as ms, it reached the agent as a date in January 1970."""
    if not _is_time_ms(created):
        return None
    value = int(created)
    return value * 1000 if value < _SECONDS_BELOW else value


def _is_time_ms(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= _MAX_MS_DIGITS


def _scheme_and_host(url: str) -> tuple[str, str] | None:
    """(scheme, host) of an absolute URL, as yarl (and so aiohttp) reads it to connect (not
    as `urlsplit` does: `https://evil\\@api/` is evil's); None when it is not one."""
    try:
        parts = URL(url)
    except (ValueError, UnicodeError):
        return None
    return (parts.scheme, parts.host) if parts.absolute and parts.host else None


def on_api_host(url: str, base: str) -> bool:
    """Whether `url` is on `base`'s host (SPEC §4), with its scheme: `http://` would send the
    answer in clear. The port is free, as SPEC names only the host."""
    where = _scheme_and_host(url)
    return where is not None and where == _scheme_and_host(base)


def render(piece: Piece, target: ReplyTarget, msg_format: str) -> dict[str, Any]:
    """The Yach message JSON of one piece."""
    message: dict[str, Any]
    if msg_format == "markdown":
        title = " ".join(piece.text.split())[:_TITLE_CHARS] or "…"
        message = {"msgtype": "markdown", "markdown": {"title": title, "text": piece.text}}
    else:
        message = {"msgtype": "text", "text": {"content": piece.text}}
    if piece.mention and target.sender.work_code:
        message["at"] = {"atWorkCodes": [target.sender.work_code]}
    return message


def reply_gaps(settings: Settings) -> list[str]:
    """The chats this configuration has no reply route to of its own (SPEC §4), for the
    operator to hear at start and from `check`: such a chat is answered only through the
    `sessionWebhook` Yach may send with its message, else its answer fails at every delivery
    and is dead-lettered."""
    if settings.yach_app_key and settings.yach_app_secret:
        return []  # the app API reaches every group the robot is in, and direct chats
    gaps = [
        "BRIDGE_YACH_APP_KEY/BRIDGE_YACH_APP_SECRET are not set: direct (one-to-one) chats "
        "are answered only through the sessionWebhook Yach sends with a message"
    ]
    if not settings.yach_robot_url:
        gaps.append(
            "neither the app credentials nor BRIDGE_YACH_ROBOT_URL are set: group chats are "
            "answered only through the sessionWebhook Yach sends with a message"
        )
    elif len(settings.allow_groups) != 1:
        gaps.append(
            "without the app credentials group answers go to BRIDGE_YACH_ROBOT_URL, whose "
            "robot posts into the one group it belongs to: a question from another group "
            "(without a sessionWebhook) is answered there; set BRIDGE_YACH_APP_KEY/_SECRET, "
            "or BRIDGE_ALLOW_GROUPS to that one group"
        )
    return gaps


def skew_gaps(settings: Settings) -> list[str]:
    """A timestamp window too narrow to pass real messages, as the operator hears it at
    start and from `check` (0 reads like "no check" and refuses every webhook instead)."""
    skew = settings.yach_max_skew_s
    if not settings.yach_secret or skew >= MIN_USEFUL_SKEW_S:
        return []
    return [
        f"BRIDGE_YACH_MAX_SKEW_S={skew:g} refuses (401) every webhook whose timestamp is more "
        f"than {skew:g} s from this host's clock: delivery delay and clock drift alone exceed "
        f"that, so real messages are refused; the default is 300"
    ]


def unverified_gaps(settings: Settings) -> list[str]:
    """BRIDGE_YACH_INSECURE without a secret: every webhook is taken unsigned, so whoever
    reaches the port chooses the group (and, through the app API, any group of the robot)
    the bot answers in, and spends the upstream's quota. Meant for tests; said at start and
    by `check` so that it is not deployed unnoticed."""
    if settings.yach_secret or not settings.yach_insecure:
        return []
    return [
        "BRIDGE_YACH_INSECURE=1 without BRIDGE_YACH_SECRET: webhooks are not verified, and "
        f"anyone who can reach {settings.host}:{settings.port} can make the bot answer; "
        "set BRIDGE_YACH_SECRET outside tests"
    ]


class YachIM:
    name = "yach"
    max_chars = MAX_CHARS
    streams_tokens = False
    rate_limited = True  # the platform limits robots: sends go through the Redis budget

    def __init__(
        self, settings: Settings, api: YachAPI, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = settings.yach_secret
        self._insecure = settings.yach_insecure
        self._max_skew_s = settings.yach_max_skew_s
        self._robot_url = settings.yach_robot_url
        self._robot_secret = settings.yach_sign_secret
        self._msg_format = settings.yach_msg_format
        self._api = api
        self._clock = clock

    def verify(self, headers: Mapping[str, str]) -> None:
        if not self._secret:
            if self._insecure:
                return
            raise WebhookRejected(401, "no secret configured")
        timestamp, sign = headers.get("timestamp", ""), headers.get("sign", "")
        if not (_is_time_ms(timestamp) and sign):
            raise WebhookRejected(401, "missing timestamp or sign")
        if abs(self._clock() - int(timestamp) / 1000) > self._max_skew_s:
            raise WebhookRejected(401, "stale timestamp")
        if not verify_sign(self._secret, timestamp, sign):
            raise WebhookRejected(401, "bad signature")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> InboundMessage:
        try:
            return parse_payload(decode_body(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise WebhookRejected(400, str(exc)) from exc

    async def send(self, target: ReplyTarget, piece: Piece) -> None:
        message = render(piece, target, self._msg_format)
        try:
            await self._route(target, piece, message)
        except YachAPIError as exc:
            retry_after = exc.retry_after
            if exc.rate_limited and retry_after is None:
                retry_after = DEFAULT_RATE_LIMIT_BACKOFF_S
            raise SendError(exc.reason, retry_after=retry_after) from exc

    def dedupes(self, target: ReplyTarget) -> bool:
        """Whether sends to this target go through the app API, which shows a `message_id`
        once (SPEC §4): there a piece sent again cannot show twice."""
        return self._app_route(target)

    def _app_route(self, target: ReplyTarget) -> bool:
        """Direct: the single-chat API (a sessionWebhook without app credentials). Group:
        the app API, else the sessionWebhook, else the signed custom robot URL (SPEC §4)."""
        with_app = self._api.has_app_credentials
        if target.is_direct:
            return with_app or not self._on_api_host(target)
        return with_app

    async def _route(self, target: ReplyTarget, piece: Piece, message: dict[str, Any]) -> None:
        if self._app_route(target):
            if target.is_direct:
                recipient = {"to_user_id": target.sender.id}
                await self._send_app("/v1/single/message/send", recipient, message, piece)
            else:
                recipient = {"group_id": target.conversation_id}
                await self._send_app("/group/robot/message/send", recipient, message, piece)
        elif self._on_api_host(target):
            await self._api.request_json("POST", target.reply_url, json=message)
        elif self._robot_url and not target.is_direct:
            now_ms = int(self._clock() * 1000)
            url = signed_robot_url(self._robot_url, self._robot_secret, now_ms)
            await self._api.request_json("POST", url, json=message)
        else:
            raise SendError(
                "no way to reply: set BRIDGE_YACH_APP_KEY/_SECRET or BRIDGE_YACH_ROBOT_URL"
            )

    def _on_api_host(self, target: ReplyTarget) -> bool:
        """A `sessionWebhook` is used only on the platform's own host (never a URL that a
        forged body could point anywhere)."""
        return bool(target.reply_url) and on_api_host(target.reply_url, self._api.api_base)

    async def _send_app(
        self, path: str, recipient: dict[str, str], message: dict[str, Any], piece: Piece
    ) -> None:
        body = {
            **recipient,
            "message": jsontext.dumps(message),
            "message_id": piece.message_id,
        }
        await self._api.call_with_token("POST", path, json=body)
