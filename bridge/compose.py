"""From stream events to the pieces people read: rendering, flush policy, splitting.

Pure: the relay feeds events and the current time, and sends whatever texts come back.
Cut points are chosen so that a piece never ends inside a code fence, a table or a list
item, nor inside a word; only a fence longer than one message is split, and then it is
closed at the end of the first piece and reopened at the start of the next.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.events import AgentSwitch, Event, ReasoningDelta, Suggestions, TextDelta, TextReplace

__all__ = ["Composer", "FlushPolicy", "quote_block", "split_text"]

_FENCE = re.compile(r"^ {0,3}(```+|~~~+)(.*)$", re.MULTILINE)
_TABLE_LINE = re.compile(r"^ {0,3}\|.*$", re.MULTILINE)
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)]) ", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n+")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?:[.!?;:][\"')\]]*[ \t]+|[。！？；…]+[”’」』）]*)")
_SPACE = re.compile(r"\s+")
_WORD_CHAR = re.compile(r"\w")


@dataclass(frozen=True, slots=True)
class _Span:
    start: int
    end: int
    fence_opener: str = ""  # the opening line of a code fence, e.g. "```python"


def _fences(text: str) -> list[_Span]:
    spans: list[_Span] = []
    opener: re.Match[str] | None = None
    for match in _FENCE.finditer(text):
        if opener is None:
            opener = match
        elif (
            match.group(1)[0] == opener.group(1)[0]
            and len(match.group(1)) >= len(opener.group(1))
            and not match.group(2).strip()
        ):
            spans.append(_Span(opener.start(), match.end(), opener.group(0).strip()))
            opener = None
    if opener is not None:
        spans.append(_Span(opener.start(), len(text) + 1, opener.group(0).strip()))
    return spans


def _protected(text: str) -> list[_Span]:
    """Spans a cut must not fall strictly inside: fences, tables, list-item lines."""
    spans = _fences(text)
    for pattern in (_TABLE_LINE,):
        block_start = block_end = -1
        for match in pattern.finditer(text):
            if match.start() == block_end + 1 and block_start >= 0:
                block_end = match.end()
            else:
                if block_start >= 0:
                    spans.append(_Span(block_start, block_end))
                block_start, block_end = match.start(), match.end()
        if block_start >= 0:
            spans.append(_Span(block_start, block_end))
    for match in _LIST_ITEM.finditer(text):
        line_end = text.find("\n", match.start())
        spans.append(_Span(match.start(), len(text) if line_end < 0 else line_end))
    return spans


def _inside(position: int, spans: Sequence[_Span]) -> bool:
    return any(span.start < position < span.end for span in spans)


def _last_cut(
    text: str, limit: int, patterns: Sequence[re.Pattern[str]], spans: Sequence[_Span]
) -> int:
    """The latest position ≤ limit just after a boundary of the first pattern that has one."""
    for pattern in patterns:
        best = 0
        for match in pattern.finditer(text, 0, limit):
            position = match.end()
            if 0 < position <= limit and not _inside(position, spans):
                best = position
        if best:
            return best
    return 0


def _word_safe_cut(text: str, limit: int) -> int:
    """A hard cut for text without any boundary: never between two word characters of a
    space-separated script (CJK characters are words of their own)."""
    position = limit
    while position > limit // 2 and (
        _WORD_CHAR.match(text[position - 1])
        and _WORD_CHAR.match(text[position])
        and text[position - 1].isascii()
        and text[position].isascii()
    ):
        position -= 1
    return position if position > limit // 2 else limit


def split_text(text: str, max_chars: int) -> list[str]:
    """Split text into messages of at most `max_chars` code points at the best boundary."""
    pieces: list[str] = []
    while len(text) > max_chars:
        spans = _protected(text)
        cut = _last_cut(text, max_chars, (_PARAGRAPH, _LINE, _SENTENCE, _SPACE), spans)
        if cut:
            pieces.append(text[:cut])
            text = text[cut:]
            continue
        fence = next((s for s in _fences(text) if s.start < max_chars < s.end), None)
        if fence is not None:
            head, text = _split_fence(text, fence, max_chars)
            pieces.append(head)
            continue
        cut = _word_safe_cut(text, max_chars)
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def _split_fence(text: str, fence: _Span, max_chars: int) -> tuple[str, str]:
    """Cut inside an over-long fence: close it in the head, reopen it in the rest."""
    closer = "\n```"
    limit = max_chars - len(closer)
    cut = text.rfind("\n", fence.start + 1, limit) + 1
    if cut <= fence.start + 1:
        cut = limit
    opener = (fence.fence_opener or "```") + "\n"
    head = text[:cut]
    return (head.rstrip("\n") + closer, opener + text[cut:])


def quote_block(text: str) -> str:
    lines = text.strip("\n").split("\n")
    return "\n".join("> " + line if line else ">" for line in lines)


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """When a streamed piece goes out. `every_delta` is the terminal's: tokens as they come."""

    mode: str = "stream"  # "stream" or "final"
    min_chars: int = 300
    max_wait_s: float = 6.0
    max_chars: int = 5000
    every_delta: bool = False


@dataclass
class Composer:
    """Turns the events of one turn into message texts, in order."""

    policy: FlushPolicy
    show_reasoning: bool = False
    agent_line: Callable[[str], str] = lambda agent: f"→ {agent}"
    suggestions_title: str = "You could also ask:"
    correction_title: str = "Correction:"
    now: float = 0.0
    answer: str = ""  # the answer text alone, for history
    _pending: str = ""
    _last_flush: float = 0.0
    _flushed_answer: bool = False  # part of the answer has left in a piece
    _answer_start: int = 0  # where the answer begins inside _pending
    _agent: str | None = None
    _part_text: bool = False
    _part_reasoning: str = ""
    _suggestions: tuple[str, ...] = ()
    _correction: str | None = None
    _sent_texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._last_flush = self.now

    def feed(self, event: Event, now: float) -> list[str]:
        if isinstance(event, TextDelta):
            self._text(event.text)
        elif isinstance(event, ReasoningDelta):
            self._part_reasoning += event.text
        elif isinstance(event, AgentSwitch):
            self._switch(event.agent)
        elif isinstance(event, Suggestions):
            self._suggestions = event.items
        elif isinstance(event, TextReplace):
            self._replace(event.text)
        else:
            return []
        return self._ready(now)

    def tick(self, now: float) -> list[str]:
        """Called while the upstream is quiet: the max-wait flush."""
        return self._ready(now)

    def finish(self) -> list[str]:
        """The end of the turn (normal or not): everything that is left."""
        self._close_part()
        if self._suggestions:
            items = "\n".join(f"- {item}" for item in self._suggestions)
            self._pending += f"\n\n{self.suggestions_title}\n{items}"
        if self._correction is not None:
            self._pending += f"\n\n{self.correction_title}\n{self._correction}"
        text, self._pending = self._pending, ""
        return [piece for piece in split_text(text, self.policy.max_chars) if piece.strip()]

    def _text(self, text: str) -> None:
        if not text:
            return
        if not self._part_text:
            self._part_text = True
            if self._part_reasoning.strip() and self.show_reasoning:
                self._pending += quote_block(self._part_reasoning) + "\n\n"
            self._part_reasoning = ""
            if not self.answer:
                self._answer_start = len(self._pending)
        self._pending += text
        self.answer += text

    def _switch(self, agent: str) -> None:
        if agent == self._agent:
            return
        previous, self._agent = self._agent, agent
        if previous is None:
            return
        self._close_part()
        self._pending += ("\n\n" if self._pending else "") + self.agent_line(agent) + "\n\n"
        self._part_text = False

    def _close_part(self) -> None:
        """A part that ended with reasoning and no answer shows its reasoning, once."""
        if not self._part_text and self._part_reasoning.strip():
            separator = "\n\n" if self._pending.strip() else ""
            self._pending += separator + quote_block(self._part_reasoning) + "\n\n"
        self._part_reasoning = ""

    def _replace(self, text: str) -> None:
        if text == self.answer:
            return
        if not self._flushed_answer:
            self._pending = self._pending[: self._answer_start] + text
            self.answer = text
            self._part_text = bool(text)
        elif text != self._correction:
            self._correction = text

    def _ready(self, now: float) -> list[str]:
        if self.policy.every_delta:
            return self._take(len(self._pending), now)
        if self.policy.mode != "stream" or not self._pending.strip():
            return []
        limit = min(len(self._pending), self.policy.max_chars)
        due = now - self._last_flush >= self.policy.max_wait_s
        if len(self._pending) < self.policy.min_chars and not due:
            return []
        spans = _protected(self._pending)
        cut = _last_cut(self._pending, limit, (_PARAGRAPH, _SENTENCE, _LINE), spans)
        if not cut and len(self._pending) > self.policy.max_chars:
            return self._take_split(now)
        return self._take(cut, now) if cut else []

    def _take(self, cut: int, now: float) -> list[str]:
        head, self._pending = self._pending[:cut], self._pending[cut:]
        self._answer_start = max(self._answer_start - cut, 0)
        if not head:
            return []
        if self.answer:
            self._flushed_answer = True
        self._last_flush = now
        return [head] if head.strip() or self.policy.every_delta else []

    def _take_split(self, now: float) -> list[str]:
        pieces = split_text(self._pending, self.policy.max_chars)
        self._pending = pieces.pop()
        self._flushed_answer = True
        self._last_flush = now
        return pieces
