"""A leading `<think>…</think>` block in answer text is reasoning (SPEC §7), whatever the
upstream: models served through Dify or OpenAI-compatible servers emit it inline."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.events import (
    AgentSwitch,
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    TextReplace,
    UpstreamError,
)

__all__ = ["ThinkSplitter"]

_OPEN, _CLOSE = "<think>", "</think>"
_PART_ENDS = (AgentSwitch, Done, UpstreamError)


class ThinkSplitter:
    """Feed text deltas of one answer part; get text and reasoning events back."""

    def __init__(self) -> None:
        # start → thinking → closed (blank lines after `</think>`) → answer, or start → answer
        self._state = "start"
        self._held = ""

    def split(self, event: Event) -> Sequence[Event]:
        """What an upstream's event stands for: a text delta split into reasoning and answer
        text; an agent switch or the end of the answer after what was held back for it; a
        replacement without its leading <think> block."""
        if isinstance(event, TextDelta):
            if self._state == "answer":
                return (event,)
            return self.feed(event.text)
        if isinstance(event, TextReplace):
            return self.replace(event.text)
        if isinstance(event, _PART_ENDS):
            held = self.flush()
            self.reset()
            return [*held, event]
        return (event,)

    def reset(self) -> None:
        self._state, self._held = "start", ""

    def feed(self, text: str) -> list[Event]:
        if self._state == "answer":
            return [TextDelta(text)]
        if self._state == "closed":  # the line breaks after `</think>`, in whatever delta
            text = text.lstrip("\n")
            return self._answer(text) if text else []
        self._held += text
        if self._state == "start":
            stripped = self._held.lstrip()
            if not stripped or (len(stripped) < len(_OPEN) and _OPEN.startswith(stripped)):
                return []
            if not stripped.startswith(_OPEN):
                return self._answer(self._held)
            self._state, self._held = "thinking", stripped[len(_OPEN) :]
        return self._thinking()

    def replace(self, text: str) -> list[Event]:
        """A replacement of the whole answer so far (Dify `message_replace`) repeats its
        leading `<think>` block, if it had one: that is reasoning there too, not answer text.
        What was held back is superseded; deltas that follow continue the replacement, read
        as if it had come as the part's first delta (a tag cut at its end is held, the line
        breaks after `</think>` are skipped), its reasoning dropped as a repeat."""
        self.reset()
        answer = [event.text for event in self.feed(text) if isinstance(event, TextDelta)]
        return [TextReplace("".join(answer))]

    def flush(self) -> list[Event]:
        """End of the part: whatever is held back is what it looked like."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [ReasoningDelta(held) if self._state == "thinking" else TextDelta(held)]

    def _thinking(self) -> list[Event]:
        end = self._held.find(_CLOSE)
        if end >= 0:
            reasoning, rest = self._held[:end], self._held[end + len(_CLOSE) :].lstrip("\n")
            events: list[Event] = [ReasoningDelta(reasoning)] if reasoning else []
            self._held = ""
            if not rest:
                self._state = "closed"
                return events
            return events + self._answer(rest)
        keep = _partial_suffix(self._held, _CLOSE)
        reasoning = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return [ReasoningDelta(reasoning)] if reasoning else []

    def _answer(self, text: str) -> list[Event]:
        self._state, self._held = "answer", ""
        return [TextDelta(text)] if text else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
