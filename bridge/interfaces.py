"""The two ports of the bridge, the IM and the upstream, and the values they exchange."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import orjson

from bridge.events import Event

__all__ = [
    "IM",
    "HistoryTurn",
    "ImageInput",
    "InboundMessage",
    "KeyValue",
    "Piece",
    "ReplyTarget",
    "SendError",
    "Sender",
    "Turn",
    "Upstream",
    "WebhookRejected",
]


# Sender, InboundMessage: named tuples, values made on every webhook. A frozen dataclass sets
# each field through `object.__setattr__`; made that way they were a tenth of the ingest
# path's instructions, beyond the bare server's.


class Sender(NamedTuple):
    id: str
    name: str = ""
    work_code: str = ""


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Where an answer goes: the conversation, and whom its first piece mentions."""

    conversation_id: str
    is_direct: bool
    sender: Sender
    reply_url: str = ""  # the platform's per-message reply URL (Yach `sessionWebhook`)


class InboundMessage(NamedTuple):
    """One message from the IM, as every part of the core sees it."""

    im_msg_id: str
    text: str
    sender: Sender
    conversation_id: str
    is_direct: bool
    msg_type: str = "text"
    image_urls: tuple[str, ...] = ()
    reply_url: str = ""
    created_at_ms: int | None = None
    dedupe_key: str | None = None  # None: this message cannot be deduplicated

    @property
    def target(self) -> ReplyTarget:
        return ReplyTarget(self.conversation_id, self.is_direct, self.sender, self.reply_url)

    def to_json(self) -> str:
        """Compact JSON, non-ASCII as is. orjson.JSONEncodeError (a TypeError) for what JSON
        in UTF-8 cannot hold: a lone surrogate, an integer beyond 64 bits."""
        sender = self.sender  # the fields written out: `_asdict` costs half as much again
        data = {
            "im_msg_id": self.im_msg_id,
            "text": self.text,
            "sender": {"id": sender.id, "name": sender.name, "work_code": sender.work_code},
            "conversation_id": self.conversation_id,
            "is_direct": self.is_direct,
            "msg_type": self.msg_type,
            "image_urls": self.image_urls,
            "reply_url": self.reply_url,
            "created_at_ms": self.created_at_ms,
            "dedupe_key": self.dedupe_key,
        }
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> InboundMessage:
        data: dict[str, Any] = json.loads(raw)
        data["sender"] = Sender(**data["sender"])
        data["image_urls"] = tuple(data.get("image_urls", ()))
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Piece:
    """One message the bot sends; `message_id` makes a resend idempotent."""

    text: str
    message_id: str
    mention: bool = False
    kind: Literal["answer", "notice"] = "answer"


class WebhookRejected(Exception):
    """The IM adapter refuses an inbound request; `status` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SendError(Exception):
    """Sending to the IM failed. `retry_after` is set when the platform asked us to slow down."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class IM(Protocol):
    """An IM channel: turns requests into messages and sends pieces back."""

    name: str
    max_chars: int
    streams_tokens: bool  # True: send every delta at once (a terminal), not in pieces
    rate_limited: bool  # True: the platform limits sends; they go through the Redis budget

    def verify(self, headers: Mapping[str, str]) -> None:
        """Check the request's signature from its headers alone; raise `WebhookRejected`."""
        ...

    def parse(self, body: bytes, headers: Mapping[str, str]) -> InboundMessage:
        """Parse one verified webhook body; raise `WebhookRejected` (400) to refuse it."""
        ...

    async def send(self, target: ReplyTarget, piece: Piece) -> None:
        """Deliver one piece; raise `SendError` when the platform did not confirm it."""
        ...

    def dedupes(self, target: ReplyTarget) -> bool:
        """Whether a piece sent to this target again shows once (the platform keeps its
        `message_id`): then a sent mark may wait for the next journal write."""
        ...


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image of the question: its URL, and its bytes as a data URL once fetched."""

    url: str
    data_url: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryTurn:
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class Turn:
    """One question to an upstream, with what it needs to keep the conversation."""

    text: str
    sender: Sender
    chat_session_id: str
    conversation: Mapping[str, str] | None = None
    history: tuple[HistoryTurn, ...] = ()
    images: tuple[ImageInput, ...] = ()
    created_at_s: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


class Upstream(Protocol):
    """An AI agent: streams events for a turn. Cancelling the iteration stops the request."""

    name: str
    keeps_history: bool  # True: the upstream remembers the conversation server-side

    def stream(self, turn: Turn) -> AsyncIterator[Event]: ...

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Forget a session's conversation upstream, where the upstream can."""
        ...

    async def aclose(self) -> None: ...


class KeyValue(Protocol):
    """The few values an adapter keeps, scoped to the bot and the adapter."""

    async def get(self, name: str) -> str | None: ...

    async def set(self, name: str, value: str) -> None: ...
