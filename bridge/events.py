"""The internal stream events every upstream adapter turns its wire format into."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "AgentSwitch",
    "ConversationRef",
    "Done",
    "ErrorKind",
    "Event",
    "ReasoningDelta",
    "Suggestions",
    "TextDelta",
    "TextReplace",
    "UpstreamError",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of answer text, to be appended."""

    text: str


@dataclass(frozen=True, slots=True)
class TextReplace:
    """The whole answer so far, replacing what came before (Dify `message_replace`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (`reasoning_content`, `<think>`, Yach `think`)."""

    text: str


@dataclass(frozen=True, slots=True)
class AgentSwitch:
    """A multi-agent hand-off: from here on, `agent` answers."""

    agent: str


@dataclass(frozen=True, slots=True)
class Suggestions:
    """Follow-up questions the upstream proposes."""

    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and the upstream's own latency, when it reports them."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """The upstream's reference to this conversation, saved as soon as it is known.

    `ref` is a flat JSON object; its keys are the adapter's own (SPEC §5).
    """

    ref: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Done:
    """The upstream finished the answer normally."""


class ErrorKind(enum.StrEnum):
    """Why an upstream call failed; each kind has its own message to the user."""

    UNAVAILABLE = "unavailable"  # connect error, 5xx after retries
    AUTH = "auth"  # 401/403: the operator must fix credentials
    NOT_FOUND = "not_found"  # 404/410: what the settings name is not there (URL, agent, model)
    RATE_LIMITED = "rate_limited"  # 429 after retries
    TIMEOUT = "timeout"  # idle or total timeout
    BROKEN = "broken"  # the stream ended or broke midway
    REJECTED = "rejected"  # the upstream answered with an error of its own
    PROTOCOL = "protocol"  # an answer we cannot read
    TOO_LONG = "too_long"  # the answer passed BRIDGE_MAX_ANSWER_CHARS: cut there


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream failed; `message` is for the log, never shown to the user verbatim."""

    kind: ErrorKind
    message: str
    retryable: bool = False


Event = (
    TextDelta
    | TextReplace
    | ReasoningDelta
    | AgentSwitch
    | Suggestions
    | Usage
    | ConversationRef
    | Done
    | UpstreamError
)
