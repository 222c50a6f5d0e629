"""From stream events to the pieces people read: rendering, flush policy, splitting.

Pure: the relay feeds events and the current time, and sends whatever texts come back.
Cut points are chosen so that a piece never ends inside a code fence, a display-math block,
a table, a list item, a quoted line, an inline code span or a word, nor right after a
heading; only a fence longer than one message is split, and then it is closed at the end of
the first piece and reopened at the start of the next (SPEC §4).

In `stream` mode a piece leaves once `min_chars` are buffered and a paragraph or sentence
boundary (a line break at worst) lies past them, or once `max_wait_s` have passed since the
last piece and any such boundary exists. Joined, the pieces are the rendered turn.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.events import AgentSwitch, Event, ReasoningDelta, Suggestions, TextDelta, TextReplace

__all__ = ["Composer", "FlushPolicy", "Standalone", "quote_block", "split_text"]

MAX_SUGGESTIONS = 5

# A fence line at any indentation: one inside a (nested) list item is indented as deep as the
# item's content (CommonMark counts the 0-3 spaces from there). At the margin the indentation
# is at most 3; only such a fence ends a list item. A backtick fence's info string holds no
# backtick (CommonMark): a line opening with ```npm install``` is inline code.
_FENCE = re.compile(r"^[ \t]*(`{3,}(?![^\n]*`)|~{3,})(.*)$", re.MULTILINE)
_MARGIN_FENCE = re.compile(r"^ {0,3}(?:`{3,}(?![^\n]*`)|~{3,})")
_FENCE_INDENT_SLACK = 3  # a closer may be indented this much deeper than its opener
_MATH = re.compile(r"\$\$")
_INLINE_CODE = re.compile(r"(`+)[^`\n]+?\1")
_BACKTICKS = re.compile(r"`+")
_LIST_MARKER = re.compile(r"^( {0,12})(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_TABLE_ROW = re.compile(r"^ {0,3}\|")
_TABLE_DELIMITER = re.compile(r"^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*$")
_DELIMITER_CHARS = re.compile(r"[-|: \t]*")  # what a delimiter row still arriving can hold
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]|$)")
_QUOTE = re.compile(r"^ {0,3}>")

# What would open a block at the start of a message: a cut inside a line must not leave it
# there (a "- " or "# " in mid-line shown as a list item or a heading). In a stream, nor
# before what may yet become one: a buffer ending in "1" or "`" (the ". " or "``" to come).
_BLOCK_OPENER = re.compile(
    r" {0,3}(?:(?:[-*+]|[0-9]{1,9}[.)]|#{1,6})(?:[ \t\n]|\Z)|[>|]|`{3}|~{3})"
)
# What may yet become one (or not: "-" may be "- " or "-based"); the scan cache leaves it open
_OPENER_BEGUN = re.compile(r" {0,3}(?:[0-9]{1,9}[.)]?|[-*+]|#{1,6}|`{1,2}|~{1,2})?\Z")
_OPENER_BEGUN_CHARS = 13  # the longest: three spaces, nine digits and a dot
_OPENER_BEGUN_ENDS = frozenset(" `~0123456789-*+#.)")
_BLOCK_OPENER_CHARS = frozenset(" -*+#>|`~0123456789")

_PARAGRAPH = re.compile(r"\n[ \t]*\n+")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"[.!?][\"')\]”’]*[ \t]+|[。！？…]+[”’」』）)\]\"']*")
_CLAUSE = re.compile(r"[;:,][ \t]+|[；：，、]")
_SPACE = re.compile(r"[ \t]+")
_WORD_CHAR = re.compile(r"\w")

# every character a match of _PARAGRAPH, _SENTENCE, _LINE, _CLAUSE or _SPACE can hold
_BOUNDARY_CHARS = frozenset("\n \t.!?\"')]”’。！？…」』）;:,；：，、")
_STREAM_BOUNDARIES = (_PARAGRAPH, _SENTENCE, _LINE)
_SPLIT_BOUNDARIES = (_PARAGRAPH, _LINE, _SENTENCE, _CLAUSE, _SPACE)


class Standalone(str):
    """A message that is never merged with the pieces around it (a correction, a notice)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class _Span:
    """A cut at p is forbidden when start < p < end."""

    start: int
    end: int
    fence_opener: str = ""  # the opening line of a code fence, e.g. "```python"
    is_fence: bool = False
    is_table: bool = False
    fence_indent: str = ""  # the indentation of the fence's opening line


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
            and _indent_width(match) <= _code_indent(text, opener, match) + _FENCE_INDENT_SLACK
        ):
            spans.append(_fence_span(opener, match.end()))
            opener = None
    if opener is not None:  # still open: nothing after its start may be cut yet
        spans.append(_fence_span(opener, len(text) + 1))
    return spans


def _indent_width(match: re.Match[str]) -> int:
    return match.start(1) - match.start()


def _code_indent(text: str, opener: re.Match[str], closer: re.Match[str]) -> int:
    """How deep the fence sits: its opener's indentation, or deeper if every line of its code
    is. A fence `_split_fence` reopened at the margin keeps its code, and its closer still to
    come, as deep as its list item has them; closed only by a line as shallow as its opener,
    it would hold the rest of the answer as code."""
    indent = _indent_width(opener)
    if _indent_width(closer) <= indent + _FENCE_INDENT_SLACK:
        return indent  # (nearly always: no need to look at the code)
    lines = [line for line in text[opener.end() : closer.start()].split("\n") if line.strip()]
    if not lines:
        return indent
    return max(indent, min(len(line) - len(line.lstrip(" \t")) for line in lines))


def _fence_span(opener: re.Match[str], end: int) -> _Span:
    line = opener.group(0)
    indent = line[: _indent_width(opener)]
    return _Span(opener.start(), end, line.strip(), is_fence=True, fence_indent=indent)


class _Cover:
    """The positions spans cover (strictly inside one), for many lookups at O(log n) each: a
    look at every span for every line or boundary of a long answer (final mode splits it
    whole) cost that answer's length squared, seconds on the event loop at 200,000 chars."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, spans: Sequence[_Span]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for span in sorted(spans, key=lambda span: span.start):
            if self._ends and span.start < self._ends[-1]:  # overlaps the last: one cover
                self._ends[-1] = max(self._ends[-1], span.end)
            else:
                self._starts.append(span.start)
                self._ends.append(span.end)

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_left(self._starts, position) - 1  # the last span starting before
        return i >= 0 and position < self._ends[i]


def _math(text: str, code: Sequence[_Span]) -> list[_Span]:
    """`$$ … $$` display math (the OCR pipelines' transcripts and math answers use it)."""
    covered = _Cover(code)
    marks = [m.start() for m in _MATH.finditer(text) if m.start() not in covered]
    spans = [_Span(a, b + 2) for a, b in zip(marks[::2], marks[1::2], strict=False)]
    if len(marks) % 2:
        spans.append(_Span(marks[-1], len(text) + 1))
    return spans


def _lines(text: str) -> list[tuple[int, int, str]]:
    """(start, end, line) for every line; `end` is the index of its newline. The last line
    has none yet: its end lies past the text, so a span ending with it covers the end."""
    out, start = [], 0
    for line in text.split("\n"):
        out.append((start, start + len(line), line))
        start += len(line) + 1
    last_start, last_end, last = out[-1]
    out[-1] = (last_start, last_end + 1, last)
    return out


def _is_table_line(lines: Sequence[tuple[int, int, str]], i: int, previous: bool) -> bool:
    _, end, line = lines[i]
    if _TABLE_ROW.match(line):
        return True
    if not line.strip():
        return False
    last = len(lines) - 1
    if "|" not in line:
        # A row without outer pipes shows no `|` before its first cell ends: the last line
        # (a stream's, still to come) after a row is taken for one until it says otherwise.
        return previous and i == last
    if previous or _TABLE_DELIMITER.match(line):
        return True
    # The next line of `lines` may lie past a fence (its lines are left out): no delimiter row.
    if i == last or lines[i + 1][0] != end + 1:
        return False
    following = lines[i + 1][2]
    # A header row over a delimiter row still arriving (`a | b` over `--`, or over nothing
    # yet) is one until that last line holds something no delimiter row can, or ends without
    # being one. (Such a line opens no fence: it is the text's last.) The line still being
    # written is not held: a `|` in a paragraph (`|x|`, a pipe in inline code) would hold it
    # whole, and a cut at a sentence end in a header's first cell, before its `|`, cannot
    # be avoided anyway.
    return bool(_TABLE_DELIMITER.match(following)) or (
        i + 1 == last and _DELIMITER_CHARS.fullmatch(following) is not None
    )


def _tables(lines: Sequence[tuple[int, int, str]]) -> list[_Span]:
    """One span per table, from its first row to the end of its last (a span per row would
    make every cut candidate be checked against every row)."""
    spans: list[_Span] = []
    block: tuple[int, int] | None = None  # the table being read: its start, its end so far
    previous = False
    for i, (start, end, _) in enumerate(lines):
        previous = _is_table_line(lines, i, previous)
        if previous:
            block = (start if block is None else block[0], end)
        elif block is not None:
            spans.append(_Span(*block, is_table=True))
            block = None
    if block is not None:
        spans.append(_Span(*block, is_table=True))
    return spans


def _list_items(lines: Sequence[tuple[int, int, str]]) -> list[_Span]:
    """An item runs from its marker to the line before a blank line or the next item of
    the same or an outer level (nested items and continuation lines belong to it)."""
    spans: list[_Span] = []
    for i, (start, end, line) in enumerate(lines):
        marker = _LIST_MARKER.match(line)
        if marker is None:
            continue
        indent, last_end = len(marker.group(1)), end
        for _, next_end, following in lines[i + 1 :]:
            nested = _LIST_MARKER.match(following)
            if not following.strip() or (nested is not None and len(nested.group(1)) <= indent):
                break
            if _MARGIN_FENCE.match(following) or _HEADING.match(following):
                break
            last_end = next_end
        spans.append(_Span(start, last_end))
    return spans


def _headings_and_quotes(text: str, lines: Sequence[tuple[int, int, str]]) -> list[_Span]:
    spans: list[_Span] = []
    for start, end, line in lines:
        if _QUOTE.match(line):
            spans.append(_Span(start, end))
        elif _HEADING.match(line):
            # never cut between a heading and the first line of what it heads
            rest = len(text[end:]) - len(text[end:].lstrip())
            spans.append(_Span(start, end + rest + 1))
    return spans


def _protected(text: str) -> list[_Span]:
    """Spans a cut must not fall strictly inside."""
    fences = _fences(text)
    in_fence = _Cover(fences)
    outside = [line for line in _lines(text) if line[0] not in in_fence]
    code = [*fences, *(_Span(m.start(), m.end()) for m in _INLINE_CODE.finditer(text))]
    opened = _open_code_span(text)
    if opened is not None:
        code.append(_Span(opened, len(text) + 1))
    # `$$` in code (`echo $$`, the shell's PID) opens no display math
    spans = [*code, *_math(text, code)]
    spans += _tables(outside) + _list_items(outside) + _headings_and_quotes(text, outside)
    return spans


def _open_code_span(text: str) -> int | None:
    """Where an inline code span opens on the last line without closing (yet), if one does."""
    line_start = text.rfind("\n") + 1
    opener: re.Match[str] | None = None
    for run in _BACKTICKS.finditer(text, line_start):
        if opener is None:
            opener = run
        elif len(run.group(0)) == len(opener.group(0)):
            opener = None
    return None if opener is None or _FENCE.match(text, line_start) else opener.start()


def _best_cut(
    text: str,
    limit: int,
    patterns: Sequence[re.Pattern[str]],
    spans: Sequence[_Span],
    *,
    floor: int = 1,
    lookahead: bool = False,
) -> int:
    """The latest position in [floor, limit] just after a boundary of the first pattern
    that has one outside every span; 0 when none has. With `lookahead`, the character after
    the cut must be known and not blank (a streamed buffer may not have its end yet)."""
    if text[:1].isspace():
        floor = max(floor, len(text) - len(text.lstrip()) + 1)  # never a blank head
    start = _scan_start(text, floor)
    covered = _Cover(spans)
    for pattern in patterns:
        best = 0
        for match in pattern.finditer(text, start, limit):
            position = match.end()
            if position < floor or position > limit or position in covered:
                continue
            if lookahead and not _known_end(text, position, match):
                continue
            if _opens_block_mid_line(text, position, lookahead):
                continue
            best = position
        if best:
            return best
    return 0


def _opens_block_mid_line(text: str, position: int, lookahead: bool) -> bool:
    if position >= len(text) or text[position - 1] == "\n":
        return False
    if text[position] not in _BLOCK_OPENER_CHARS:
        return False
    if _BLOCK_OPENER.match(text, position) is not None:
        return True
    return lookahead and _OPENER_BEGUN.match(text, position) is not None


def _settled(text: str) -> str:
    """A streamed buffer but for an end that may be the start of a block opener: a cut just
    before it is not decided yet (`_Scanned` must not rule it out)."""
    if not text or text[-1] not in _OPENER_BEGUN_ENDS:
        return text
    begun = _OPENER_BEGUN.search(text, max(len(text) - _OPENER_BEGUN_CHARS, 0))
    return text[: begun.start()] if begun is not None else text


def _scan_start(text: str, floor: int) -> int:
    """Where to look for boundaries that end at `floor` or later: after the last character
    before `floor` that no boundary can hold. No match of the full scan spans that
    character, so a scan from there finds the same matches from there on; a streamed buffer
    that waits for a sentence end is not scanned from its start token after token."""
    start = min(floor, len(text))
    while start > 0 and text[start - 1] in _BOUNDARY_CHARS:
        start -= 1
    return start


def _known_end(text: str, position: int, match: re.Match[str]) -> bool:
    """In a streamed buffer, a cut must not depend on text still to come: the next
    character must be known and start something (not more blank space, a closing quote or
    a continuation line). A sentence end whose following spaces arrived is known already."""
    if position < len(text):
        return not text[position].isspace()
    return match.group(0)[-1] in " \t"


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
    """Split text into messages of at most `max_chars` code points at the best boundary:
    paragraph, line, sentence, clause, then word, preferring pieces of at least half the
    limit; an over-long fence is closed and reopened; joined, the pieces are the text (but
    for blank space at its end that no piece had room for: no message is blank)."""
    pieces: list[str] = []
    while len(text) > max_chars:
        head, text = _split_once(text, max_chars)
        pieces.append(head)
    if text.strip() or (text and not pieces):
        pieces.append(text)
    elif text and len(pieces[-1]) + len(text) <= max_chars:
        pieces[-1] += text
    return pieces


def _split_once(text: str, max_chars: int) -> tuple[str, str]:
    spans = _protected(text)
    for floor in (max_chars // 2, 1):
        cut = _best_cut(text, max_chars, _SPLIT_BOUNDARIES, spans, floor=floor)
        if cut:
            return text[:cut], text[cut:]
    fence = next((s for s in spans if s.is_fence and s.start < max_chars < s.end), None)
    # Only a fence longer than a message is split (SPEC §4); one that fits, inside a block
    # that left no other cut (an unclosed `$$`, a long list item), is cut before, below.
    if fence is not None and (
        fence.end - fence.start > max_chars or not text[: fence.start].strip()
    ):
        return _split_fence(text, fence, max_chars)
    # a table, list item or math block longer than a message (a fence that fits in one
    # inside it included): cut it at a line at least, never inside a fence
    fences = [s for s in spans if s.is_fence]
    cut = _best_cut(text, max_chars, _SPLIT_BOUNDARIES, fences) or _word_safe_cut(text, max_chars)
    return text[:cut], text[cut:]


def _split_fence(text: str, fence: _Span, max_chars: int) -> tuple[str, str]:
    """Cut inside an over-long fence: close it in the head, reopen it in the rest.

    The cut falls after a line of the code, else (a code line longer than a message) inside
    the line at the limit; the rest must come out shorter than the text, or splitting would
    never end: an opening line about as long as a message is reopened with its marker alone,
    and a marker too long for that is not reopened at all.
    """
    marker = re.match(r"\s*(`{3,}|~{3,})", fence.fence_opener)
    bare = marker.group(1) if marker else "```"
    # Closed where it was opened (inside its list item); reopened at the margin, where the
    # next message begins (indented 4 spaces there it would be no fence but indented code).
    closer = "\n" + fence.fence_indent + bare
    if 2 * len(closer) > max_chars:  # an absurd indentation: room for the code comes first
        closer = "\n" + bare
    limit = max_chars - len(closer)
    body = text.find("\n", fence.start) + 1 or len(text)  # where the code's first line starts
    cut = text.rfind("\n", body, max(limit, 0)) + 1  # (a negative end counts from the end)
    if cut <= body:
        if limit < body and text[: fence.start].strip():
            # The cut would fall inside the opening line (one still arriving, after a table
            # that left no other cut): closed there and reopened whole, its info string would
            # show twice and the code would begin with the rest of it. Cut before the fence.
            return _before_fence(text, fence, max_chars)
        cut = limit
    opener = fence.fence_opener or bare
    if len(opener) + 1 >= cut:
        opener = bare
    rest = opener + "\n" + text[cut:]
    if cut < 1 or len(rest) >= len(text):
        # A marker too long to close and reopen within one message (thousands of backticks;
        # or a limit hardly longer than the marker lines): reopened, the rest came out
        # longer than the text, for ever.
        return _before_fence(text, fence, max_chars)
    return text[:cut].rstrip("\n") + closer, rest


def _before_fence(text: str, fence: _Span, max_chars: int) -> tuple[str, str]:
    """Cut before the fence; with only blank space before it (a blank message), through it
    as plain text."""
    cut = fence.start if text[: fence.start].strip() else _word_safe_cut(text, max_chars)
    return text[:cut], text[cut:]


def quote_block(text: str) -> str:
    lines = text.strip("\n").split("\n")
    return "\n".join("> " + line if line.strip() else ">" for line in lines)


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """When a streamed piece goes out. `every_delta` is the terminal's: tokens as they come."""

    mode: str = "stream"  # "stream" or "final"
    min_chars: int = 300
    max_wait_s: float = 6.0
    max_chars: int = 5000
    every_delta: bool = False


def _default_agent_line(agent: str) -> str:
    return f"→ {agent}"


def _table_row(line: str) -> bool:
    """Whether a line after a table's row is a row too (`_is_table_line` with a row before)."""
    return "|" in line and bool(line.strip()) and not _FENCE.match(line)


@dataclass(frozen=True, slots=True)
class _Stuck:
    """A look at `text` with `floor` found no cut while a code fence, or a table, was open to
    its end. Every position after the block's start is inside it while it stays open, and
    the text before it — every span and boundary there — is as it was: so the look's answer
    stands for a longer text as long as only text was added, none of it can end the block,
    and the floor did not drop. A fence ends only at a line of backticks or tildes; a table
    at a line that is not a row. `last_line` is where `text`'s last line starts."""

    text: str
    floor: int
    table: bool
    last_line: int

    @classmethod
    def at_end(cls, text: str, spans: Sequence[_Span], floor: int) -> _Stuck | None:
        end, last_line = len(text), text.rfind("\n") + 1
        open_fence = next((span for span in spans if span.is_fence and span.end > end), None)
        if open_fence is not None:
            # An opening line still being written may yet be no fence (a backtick after its
            # ``` makes it inline code): no shortcut before that line has ended.
            return None if open_fence.start >= last_line else cls(text, floor, False, last_line)
        # A table with two rows before the last line: the one before the last is a row by
        # following a row, whatever the last line becomes (a row's status can hang on the
        # next line being a delimiter row), and so is every row added after it.
        before_last = text.rfind("\n", 0, max(last_line - 1, 0)) + 1
        if any(s.is_table and s.end > end and s.start < before_last for s in spans):
            return cls(text, floor, True, last_line)
        return None

    def holds(self, text: str, floor: int) -> bool:
        if floor < self.floor or not text.startswith(self.text):
            return False
        if self.table:  # a line just begun may be empty: a cut before it waits for its start
            *rows, begun = text[self.last_line :].split("\n")
            return all(map(_table_row, rows)) and (not begun or _table_row(begun))
        added = text[max(len(self.text) - 3, 0) :]  # a closing run may begin in the old text
        return "```" not in added and "~~~" not in added


@dataclass(frozen=True, slots=True)
class _Scanned:
    """A look at `text` with `floor` found no boundary to cut at, spans aside. Every match
    ending before `text`'s end was judged on characters all known then (the patterns look
    at nothing past a match), so a longer text that starts with `text` has no cut before
    `len(text)` for a floor no lower: a buffer that waits for its first boundary (a long
    URL, CJK without punctuation) is not scanned from the floor again for every token."""

    text: str
    floor: int

    def floor_for(self, text: str, floor: int) -> int:
        if floor >= self.floor and text.startswith(self.text):
            return max(floor, len(self.text))
        return floor


class _Growing:
    """Text built a little at a time: an append is O(1), the text is joined when read.
    (`self.text += delta` copies the whole text at every token: quadratic in the answer's
    length, ~25 µs a token at 20,000 tokens against 2.)"""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, text: str) -> None:
        self._parts.append(text)

    @property
    def text(self) -> str:
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @text.setter
    def text(self, text: str) -> None:
        self._parts = [text]


@dataclass
class Composer:
    """Turns the events of one turn into message texts, in order.

    Rendering: reasoning (with `show_reasoning`, quoted) before each part's answer; a part
    that ends with reasoning but no answer (blank space is none) shows it quoted, once, when
    it ends; one short line at each agent switch after the first agent; suggestions as a
    short list at the end; a replacement that contradicts text already sent goes out as one
    `Standalone` correction.
    """

    policy: FlushPolicy
    show_reasoning: bool = False
    agent_line: Callable[[str], str] = _default_agent_line
    suggestions_title: str = "You could also ask:"
    correction_title: str = "Correction:"
    now: float = 0.0
    _answer: _Growing = field(default_factory=_Growing)  # the answer text alone, for history
    _pending: str = ""  # rendered, not yet taken to send
    _tail: str = ""  # the last characters rendered (sent or pending), for separators
    _last_flush: float = 0.0
    _answer_sent: bool = False  # part of the answer has left in a piece
    _answer_at: int | None = None  # where the answer begins inside _pending
    _agent: str | None = None
    _part_text: bool = False  # the part has answer text (more than blank space)
    _part_blank: str = ""  # blank space that began the part's answer, held until text shows
    _reasoning: _Growing = field(default_factory=_Growing)  # of the part, not yet rendered
    _suggestions: tuple[str, ...] = ()
    _stuck: _Stuck | None = None  # the last look found no cut inside a block still open
    _scanned: _Scanned | None = None  # the last look found no boundary at all
    _visible: bool = False  # something other than blank space was rendered

    def __post_init__(self) -> None:
        self._last_flush = self.now

    @property
    def answer(self) -> str:
        """The answer text alone (no reasoning, agent lines or suggestions), for history."""
        return self._answer.text

    @property
    def _part_reasoning(self) -> str:
        return self._reasoning.text

    @_part_reasoning.setter
    def _part_reasoning(self, text: str) -> None:
        self._reasoning.text = text

    def feed(self, event: Event, now: float) -> list[str]:
        if isinstance(event, TextDelta):  # (nearly every event)
            self._text(event.text)
            return self._ready(now)
        corrections: list[str] = []
        if isinstance(event, ReasoningDelta):
            self._reasoning.add(event.text)
        elif isinstance(event, AgentSwitch):
            self._switch(event.agent)
        elif isinstance(event, Suggestions):
            self._suggestions = event.items
        elif isinstance(event, TextReplace):
            corrections = self._replace(event.text, now)
        else:
            return []
        return corrections + self._ready(now)

    @property
    def rendered(self) -> bool:
        """Whether the turn has rendered anything to show (answer, reasoning, lines)."""
        return self._visible

    def tick(self, now: float) -> list[str]:
        """Called while the upstream is quiet: the max-wait flush."""
        return self._ready(now)

    def finish(self) -> list[str]:
        """The end of the turn (normal or not): everything that is left."""
        self._close_part()
        items = [" ".join(item.split()) for item in self._suggestions if item.strip()]
        if items:
            listed = "\n".join(f"- {item}" for item in items[:MAX_SUGGESTIONS])
            self._block(f"{self.suggestions_title}\n{listed}")
        text, self._pending = self._pending, ""
        return [piece for piece in split_text(text, self.policy.max_chars) if piece.strip()]

    # Rendering

    def _append(self, text: str) -> None:
        # Through a local that holds the only reference, CPython grows the string in place
        # (`self._pending += text` would copy it whole: in final mode, where it is the whole
        # answer, at every token). A list is joined at each read, and stream mode reads the
        # buffer at every token.
        pending, self._pending = self._pending, ""
        pending += text
        self._pending = pending
        self._tail = text[-2:] if len(text) >= 2 else (self._tail + text)[-2:]
        if not self._visible and text and not text.isspace():
            self._visible = True

    def _separate(self) -> None:
        """Start a new block: a blank line after whatever was rendered before."""
        if self._tail and not self._tail.endswith("\n\n"):
            self._append("\n" if self._tail.endswith("\n") else "\n\n")

    def _block(self, text: str) -> None:
        self._separate()
        self._append(text)

    def _text(self, text: str) -> None:
        if not text:
            return
        if not self._part_text:
            if text.isspace():  # (e.g. the blank line after `</think>`): no answer yet
                self._part_blank += text
                return
            text, self._part_blank = self._part_blank + text, ""
            self._part_text = True
            reasoning, self._part_reasoning = self._part_reasoning, ""
            if self.show_reasoning and reasoning.strip():
                self._block(quote_block(reasoning))
            self._separate()
            if self._answer_at is None:
                self._answer_at = len(self._pending)
            if self.answer:
                self._answer.add("\n\n")
        self._append(text)
        self._answer.add(text)

    def _switch(self, agent: str) -> None:
        if agent == self._agent:
            return
        first = self._agent is None and not (self._tail or self._part_reasoning)
        self._agent = agent
        if first:
            return
        self._close_part()
        self._block(self.agent_line(agent))
        self._part_text = False

    def _close_part(self) -> None:
        """A part that ended with reasoning and no answer shows its reasoning, once."""
        if not self._part_text and self._part_reasoning.strip():
            self._block(quote_block(self._part_reasoning))
        self._part_reasoning = self._part_blank = ""

    def _replace(self, text: str, now: float) -> list[str]:
        if text == self.answer:
            return []
        self._part_blank = ""  # replaced with the rest of the answer so far
        if self._answer_at is None and not self._answer_sent:
            self._text(text)
        elif not self._answer_sent:
            assert self._answer_at is not None
            self._pending = self._pending[: self._answer_at]
            self._tail = self._pending[-2:]
            self._answer.text = ""
            self._part_text = False
            self._text(text)
        elif text.startswith(self.answer):
            self._text(text[len(self.answer) :])
        else:
            return self._correct(text, now)
        return []

    def _correct(self, text: str, now: float) -> list[str]:
        """Text already sent is contradicted: the unsent rest of the old answer is dropped
        and the whole new answer goes out as one correction message."""
        self._pending = self._pending[: self._answer_at or 0]
        self._answer.text = text
        self._tail = text[-2:]
        self._last_flush = now
        correction = f"{self.correction_title}\n{text}"
        return [Standalone(piece) for piece in split_text(correction, self.policy.max_chars)]

    # Flushing

    def _ready(self, now: float) -> list[str]:
        if self.policy.every_delta:
            return self._take(len(self._pending), now)
        if self.policy.mode != "stream":
            return []
        pending = self._pending
        if not pending or pending.isspace():
            return []
        due = now - self._last_flush >= self.policy.max_wait_s
        if len(pending) < self.policy.min_chars and not due:
            return []
        limit = min(len(pending), self.policy.max_chars)
        floor = 1 if due else self.policy.min_chars
        cut = 0 if self._still_stuck(pending, floor) else self._cut(pending, limit, floor)
        if cut:
            return self._take(cut, now)
        if len(pending) > self.policy.max_chars:
            return self._take_split(now)
        return []

    def _cut(self, pending: str, limit: int, floor: int) -> int:
        # Spans only rule cuts out: without a cut before them there is none after them, and
        # they cost far more to find (the buffer waits for a boundary token after token).
        self._stuck = None
        scanned = self._scanned
        from_floor = floor if scanned is None else scanned.floor_for(pending, floor)
        cut = _best_cut(pending, limit, _STREAM_BOUNDARIES, (), floor=from_floor, lookahead=True)
        if not cut:
            self._scanned = _Scanned(_settled(pending), floor)
            return 0
        spans = _protected(pending)
        cut = _best_cut(pending, limit, _STREAM_BOUNDARIES, spans, floor=floor, lookahead=True)
        if not cut:
            self._stuck = _Stuck.at_end(pending, spans, floor)
        return cut

    def _still_stuck(self, pending: str, floor: int) -> bool:
        """Whether the last look's "no cut" stands, so that a long code block or table is not
        searched from its start again for every token (a 7 KB code block cost ~400 ms of CPU,
        150× the same length of prose). See `_Stuck`."""
        stuck = self._stuck
        if stuck is None or not stuck.holds(pending, floor):
            return False
        self._stuck = _Stuck(pending, stuck.floor, stuck.table, pending.rfind("\n") + 1)
        return True

    def _take(self, cut: int, now: float) -> list[str]:
        head, self._pending = self._pending[:cut], self._pending[cut:]
        if not head:
            return []
        if self._answer_at is not None:
            if cut > self._answer_at:
                self._answer_sent = True
            self._answer_at = max(self._answer_at - cut, 0)
        self._last_flush = now
        return [head] if head.strip() or self.policy.every_delta else []

    def _take_split(self, now: float) -> list[str]:
        head, self._pending = _split_once(self._pending, self.policy.max_chars)
        if self._answer_at is not None:
            self._answer_sent = True
            self._answer_at = 0
        self._last_flush = now
        return [head] if head.strip() else []
