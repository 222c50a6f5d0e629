"""Incremental Server-Sent Events decoder: bytes in, events out (WHATWG HTML §9.2.6).

Two layers, as the standard reads: lines, then fields. Both work on *bytes*: field names, the
colon, the optional space and the line ends are ASCII, and only an event's data, type and id
are decoded. That is the same text as decoding the stream first: CR and LF never occur inside
a UTF-8 sequence and an invalid sequence cannot straddle an ASCII byte, so a read is cut after
its last line end and a character split across reads waits with the unfinished line.

The field layer takes a read's blocks (a block is the lines one blank line ends) all at once,
because a stream is overwhelmingly made of one shape:

- token streams (OpenAI-style): blocks of one `data: ` line. One `split` at "\n\ndata: " over
  the whole read, its unfinished last line included, gives every event's data; the blocks
  before another shape begins (a read handing over from one stream to another, say) are
  taken the same way, and only the rest goes on;
- blocks of `data:` lines, each perhaps after the same `event:` line (HiAgent, Coze, …): every
  data line's start becomes a CR (none is left once line ends are LF), a `split` at the block
  starts cuts the blocks apart, and a CR back to LF in each leaves its data.

Either way the shape is proven, not assumed: once the pieces are cut, not one of them may hold
a line end (one memchr over them all), which leaves no room for a comment, an `id:`, another
event type or an extra blank line. Every event's data is then decoded and its tuple built in one
comprehension, with no Python code run per line. A read that mixes shapes goes in stretches of
blocks that begin alike; what the fast paths refuse goes line by line, exactly as the standard
says. The lines of a block still waiting for its blank line are kept as they are, with the
unfinished line after them, and read again with the next read, so the fast paths see whole
blocks. tests/unit/test_sse.py checks every path against a plain line-by-line reading of the
standard.

Searches from the end (`rsplit`, `rfind`) are used where a search from the start would do:
for needles that begin with a line end, CPython's reverse search skips over JSON about twice
as fast. And `in` is given an int: given bytes, it first tries them as an int and formats the
error it then throws away.

One deliberate leniency: at end of stream an event whose blank line never came is still
dispatched (WHATWG discards it). Real upstreams end with `data: [DONE]` and no blank line
often enough that dropping the last event would lose answer text.

Pure: no I/O and no aiohttp, so benchmarks can time it alone.
"""

from __future__ import annotations

from itertools import groupby
from typing import NamedTuple, NoReturn

__all__ = ["DEFAULT_MAX_LINE_BYTES", "SSEDecoder", "SSEEvent", "SSELineTooLong"]

DEFAULT_MAX_LINE_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_LF, _CR, _SPACE, _COLON = 10, 13, 32, 58
_MAX_CACHED_EVENT_NAMES = 32
_MAX_UNFINISHED_BYTES = 1 << 16


class SSEEvent(NamedTuple):
    # A NamedTuple rather than a frozen dataclass: as immutable and as typed, and built four
    # times faster, which is a quarter of the decoder's time on a token stream.
    data: str
    event: str = "message"
    id: str = ""  # the last event ID at dispatch time, as the standard defines it
    retry: int | None = None  # the latest valid `retry:` seen in the stream, in milliseconds


_new_event = tuple.__new__  # SSEEvent(...) without its Python-level __new__


class SSELineTooLong(Exception):
    """A line, or the data of one event (its data lines joined), exceeded the decoder's
    limit; the stream cannot be trusted any further."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _block_kind(block: bytes) -> bytes:
    """What the blocks one fast path can take at once share: their event line, if they begin
    with one, else their first five bytes (`data:` for blocks of data lines)."""
    return block[: block.find(b"\n")] if block.startswith(b"event:") else block[:5]


def _last_block_start(text: bytes) -> int:
    """Where the last block of complete lines begins (ended by a blank line or not)."""
    blank = text.rfind(b"\n\n", 0, len(text) - 2)
    return blank + 2 if blank >= 0 else 0


class SSEDecoder:
    """Feed it chunks with `feed`, then call `close` at end of stream.

    After `SSELineTooLong` the decoder is spent: discard it with its stream.
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_event_names",
        "_event_type",
        "_last_id",
        "_max_line_bytes",
        "_pending",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        # What the next read continues, line ends already LF: the complete lines of a block
        # whose blank line has not come yet, read again with the next read so the fast paths
        # see the whole block (if there are too many to copy again, they are interpreted into
        # the fields below instead), then the unfinished last line, never longer than the limit.
        self._pending = b""
        self._skip_lf = False  # the last read ended in CR: a leading LF belongs to it
        self._started = False  # a leading BOM is stripped once
        self._data: list[bytes] = []  # the data buffer, one item per `data` line
        # Its size as last measured (joined, with its line ends): kept up to date only where
        # the buffer is carried from one read to the next (`_hold_data`).
        self._data_size = 0
        self._event_type = b""
        self._last_id = ""
        self._retry: int | None = None
        # `event:` line → its event type and a block's start, for the fast paths
        self._event_names: dict[bytes, tuple[str, bytes, bytes]] = {}

    # -- line layer ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by this chunk of the stream."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if _CR in chunk:
            # a read that ends in CR may be followed by that CR's LF
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = self._pending + chunk  # (no copy if nothing is pending)
        if _LF not in chunk:
            self._keep_partial(text)
            return []
        if not self._started:
            text = self._strip_bom(text)
        if len(text) > self._max_line_bytes and max(map(len, text.split(b"\n"))) > \
                self._max_line_bytes:
            self._too_long()
        if not (self._data or self._event_type) and text.startswith(b"data: "):
            events, taken = self._token_read(text)
            if taken == len(text):
                return events
            text = text[taken:]
        else:
            events = []
        # (what follows the read's last line end is an unfinished line)
        self._fields(text, len(text) - len(chunk) + 1 + chunk.rfind(b"\n"), events)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: interpret a last unterminated line and dispatch what is pending."""
        events: list[SSEEvent] = []
        # (ends with "", or the last unterminated line)
        lines = self._strip_bom(self._pending).split(b"\n")
        self._pending = b""
        self._lines(lines, events)
        self._dispatch(events)
        return events

    def _keep_partial(self, text: bytes) -> None:
        # A line that never ends would grow the buffer without bound; it is refused as soon
        # as it passes the limit, so the buffer holds at most the limit plus one read (plus
        # the lines kept before it). (Growing it by concatenation is quadratic only up to
        # that bound.)
        self._pending = text
        limit = self._max_line_bytes
        if len(text) > limit and len(text) - 1 - text.rfind(b"\n") > limit:
            self._too_long()

    def _too_long(self) -> NoReturn:
        self._pending = b""
        raise SSELineTooLong(f"line longer than {self._max_line_bytes} bytes")

    def _strip_bom(self, raw: bytes) -> bytes:
        if self._started:
            return raw
        self._started = True
        return raw[3:] if raw.startswith(_BOM) else raw

    # -- field layer -----------------------------------------------------------------------

    def _token_read(self, text: bytes) -> tuple[list[SSEEvent], int]:
        """The fast path of token streams on a whole read: `text` (from a line that is not
        blank, no block pending, the unfinished last line included) as far as it is blocks
        of one `data: ` line each, then perhaps the unfinished start of one more block. The
        events of those blocks, and how much of `text` they take: all of it, or up to the
        first block that is not of this shape (which is left to the other paths).

        One `split` at the block starts gives every event's data; the shape is proven if no
        piece but the last holds a line end, and the last holds its block's line end, then
        (if that block has ended) its blank line and at most an unfinished line.
        """
        values = text.rsplit(b"\n\ndata: ")  # (no match can overlap another: = split)
        tail = values.pop()
        taken = len(text)
        line_end = tail.find(b"\n") + 1
        if not line_end or line_end == len(tail):  # the last block's data line waits
            pending = text[len(text) - len(tail) - 6 :] if values else text
        elif tail[line_end] == _LF:  # the last block has ended
            values.append(tail[: line_end - 1])
            pending = tail[line_end + 1 :]
            if _LF in pending:  # more lines: another shape (a read handing over, say)
                pending, taken = b"", len(text) - len(pending)
        else:  # the last block has more lines
            pending, taken = b"", len(text) - len(tail) - 6 if values else 0
        if _LF in b"".join(values):  # (a copy and a memchr: cheaper than a count)
            good = 0
            while _LF not in values[good]:
                good += 1
            values, pending = values[:good], b""
            taken = sum(map(len, values)) + 8 * good - 6 if good else 0
        if not values:
            if taken:
                self._pending = pending
            return [], taken
        self._pending = pending  # (one line, at most: no more than the limit)
        values[0] = values[0][6:]
        last_id, retry = self._last_id, self._retry
        try:  # (`_events`, inlined: this is the hottest path)
            return [_new_event(SSEEvent, (value.decode(), "message", last_id, retry))
                    for value in values], taken
        except UnicodeDecodeError:
            return self._events(values, "message"), taken

    def _fields(self, text: bytes, cut: int, events: list[SSEEvent]) -> None:
        """Interpret the complete lines of `text` (those before `cut`), adding the events their
        blank lines end, and keep the rest pending."""
        if text[0] == _LF or self._data or self._event_type:
            rest = self._pending_block(text[:cut], events) + text[cut:]
            if len(rest) > len(text) - cut:  # complete lines follow the block
                self._fields(rest, cut + len(rest) - len(text), events)
            else:
                self._pending = rest
            return
        end = text.rfind(b"\n\n", 0, cut) + 2  # after the last complete block, if any
        if end > 1:
            run = text if end == len(text) else text[:end]
            if not self._data_run(run, events):
                self._blocks(run, events)
        else:
            end = 0
        if cut - end > _MAX_UNFINISHED_BYTES:
            # many lines still waiting for their blank line: the next read would copy them
            # all again, so they are interpreted now
            self._lines(text[end : cut - 1].split(b"\n"), events)
            self._hold_data(0)
            end = cut
        self._pending = text[end:]

    def _pending_block(self, text: bytes, events: list[SSEEvent]) -> bytes:
        """Finish the block begun in earlier reads (if any) with the lines of `text` up to its
        blank line; what follows that and any further blank lines (b"" if nothing, or if the
        blank line has not come yet)."""
        if text[0] != _LF:
            lines_end = text.find(b"\n\n")
            if lines_end < 0:
                held = len(self._data)
                self._lines(text[:-1].split(b"\n"), events)
                self._hold_data(held)
                return b""
            held = len(self._data)
            self._lines(text[:lines_end].split(b"\n"), events)
            if held:  # (carried from earlier reads: held to the limit up to its end)
                self._hold_data(held)
            text = text[lines_end + 1 :]
        self._dispatch(events)
        return text.lstrip(b"\n")  # more blank lines dispatch nothing more

    def _token_run(self, text: bytes, events: list[SSEEvent]) -> bool:
        """`_token_read` on complete blocks (`text` ends with a blank line): if all of them
        are blocks of one `data: ` line each, interpret them and return True; else do nothing
        and return False."""
        if not text.startswith(b"data: "):
            return False
        first_end = text.find(b"\n") + 1
        if first_end < len(text) and text[first_end] != _LF:  # the first block has more lines
            return False
        values = text.rsplit(b"\n\ndata: ")  # (no match can overlap another: = split)
        values[-1] = values[-1][:-2]  # (its block's line end and blank line)
        if _LF in b"".join(values):  # (a copy and a memchr: cheaper than a count)
            return False
        values[0] = values[0][6:]
        events += self._events(values, "message")
        return True

    def _data_run(self, run: bytes, events: list[SSEEvent]) -> bool:
        """The fast path of any stream of data blocks: if `run` (complete blocks, from a line
        that is not blank) is blocks of data lines, each perhaps after the same `event:` line,
        interpret it and return True; else do nothing and return False.

        Each data line's start (the line end before it, `data:`, the optional space) becomes a
        CR, which no text holds once line ends are LF; then a `split` at every blank line that
        is followed by the first block's event line (if any) and a data line cuts the blocks
        apart. The shape is proven if no piece still holds a line end: there is no line that
        is not a data line, and no blank line anywhere else. A CR back to LF in each piece
        leaves that block's data buffer.
        """
        if run.startswith(b"event:"):
            first_line_end = run.find(b"\n")
            line = run[:first_line_end]
            name, kind, block_start = self._event_names.get(line) or self._head(line)
        elif run.startswith(b"data:"):
            # (a data block's first line end and blank line: the blank line's end is marked)
            first_line_end, name, kind, block_start = -1, "message", b"data:", b"\n\r"
        else:
            return False
        last_blank = run.rfind(b"\n\n", 0, len(run) - 2)  # (before the last block, if any)
        if not run.startswith(kind, last_blank + 2 if last_blank >= 0 else 0):
            return False  # a mix: `_blocks` separates it
        # (`replace` as `join` of `rsplit`: the same bytes, as no match can overlap another)
        marked = b"\r".join(b"\r".join(run.rsplit(b"\ndata: ")).rsplit(b"\ndata:"))
        if first_line_end < 0:  # the first line is a data line that no line end comes before
            first_value = 6 if run[5] == _SPACE else 5
        elif marked[first_line_end] == _CR:
            first_value = first_line_end + 1
        else:  # the event line is not followed by a data line
            return False
        values = marked.rsplit(block_start)
        values[0] = values[0][first_value:]
        values[-1] = values[-1][:-2]
        joined = b"".join(values)
        if _LF in joined:
            return False
        if _CR not in joined:  # no block of several data lines
            events += self._events(values, name)
            return True
        last_id, retry = self._last_id, self._retry
        try:
            events += [_new_event(SSEEvent, (value.replace(b"\r", b"\n").decode(), name,
                                             last_id, retry))
                       for value in values]
        except UnicodeDecodeError:
            events += self._events([value.replace(b"\r", b"\n") for value in values], name)
        return True

    def _head(self, line: bytes) -> tuple[str, bytes, bytes]:
        """The event type an `event:` line sets, and how a block that begins with it starts,
        before and after `_data_run` marks its data lines (cached in `_event_names`)."""
        value = line[7:] if line[6:7] == b" " else line[6:]
        head = _text(value) or "message", line + b"\n", b"\n\n" + line + b"\r"
        if len(self._event_names) < _MAX_CACHED_EVENT_NAMES:
            self._event_names[line] = head
        return head

    def _events(self, values: list[bytes], name: str) -> list[SSEEvent]:
        """One event per data buffer. (A comprehension that decodes and builds each tuple
        runs fewer instructions than `map` over `bytes.decode` and `zip`: no intermediate
        list, no argument tuple per call.)"""
        last_id, retry = self._last_id, self._retry
        try:  # strict first: the same text whenever it succeeds, and no argument parsing
            return [_new_event(SSEEvent, (value.decode(), name, last_id, retry))
                    for value in values]
        except UnicodeDecodeError:
            return [_new_event(SSEEvent, (_text(value), name, last_id, retry))
                    for value in values]

    def _blocks(self, run: bytes, events: list[SSEEvent]) -> None:
        """Complete blocks of mixed shapes (the fast paths refused them as one run)."""
        kind = _block_kind(run)
        if _block_kind(run[_last_block_start(run) :]) == kind:
            self._stretches(run, events)
            return
        # one stream handing over to another, say: cut after the last block that begins as
        # the first does (searched for from the end: a search that skips faster over JSON)
        start = run.rfind(b"\n\n" + kind) + 2
        cut = run.find(b"\n\n", start if start > 1 else 0) + 2  # where a block begins
        for part in (run[:cut], run[cut:]):
            if not self._fast_run(part, events):
                self._stretches(part, events)

    def _stretches(self, run: bytes, events: list[SSEEvent]) -> None:
        """Each stretch of blocks that begin alike through the fast paths, what they refuse
        line by line."""
        # Every "\n\n" ends a line and is a blank line, so each block is ended by a blank
        # line; a block that starts with "\n" had more blank lines before it.
        for _, same_kind in groupby(run[:-2].split(b"\n\n"), _block_kind):
            stretch = list(same_kind)
            if not self._fast_run(b"\n\n".join(stretch) + b"\n\n", events):
                for block in stretch:
                    self._block(block, events)

    def _fast_run(self, run: bytes, events: list[SSEEvent]) -> bool:
        return self._token_run(run, events) or self._data_run(run, events)

    def _block(self, block: bytes, events: list[SSEEvent]) -> None:
        """A block and the blank line that ends it, line by line."""
        self._lines(block.split(b"\n"), events)
        self._dispatch(events)

    def _lines(self, lines: list[bytes], events: list[SSEEvent]) -> None:
        """The standard's interpretation of each line, in order."""
        for line in lines:
            if not line:
                self._dispatch(events)
                continue
            if line[0] == _COLON:  # a comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event_type = value
            elif name == b"id":
                if 0 not in value:
                    self._last_id = _text(value)
            elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
                self._retry = int(value)

    def _hold_data(self, measured: int) -> None:
        """The data buffer is carried to the next read (its event's blank line has not come):
        held to the limit as a line is. Lines of a few bytes each that no blank line ends
        would grow it without bound, none of them too long. `measured`: how many of its items
        `_data_size` counts already (the buffer had none of the new lines, no blank line came
        among them: they are appended)."""
        data = self._data
        if not measured:
            self._data_size = 0
        new = data[measured:] if measured else data
        self._data_size += sum(map(len, new)) + len(new)  # (each with its joining line end)
        if self._data_size - 1 > self._max_line_bytes:
            self._data, self._event_type, self._pending = [], b"", b""
            raise SSELineTooLong(f"event data longer than {self._max_line_bytes} bytes")

    def _dispatch(self, events: list[SSEEvent]) -> None:
        data, event_type = self._data, self._event_type
        self._data, self._event_type = [], b""
        if data:  # nothing is dispatched for an empty data buffer, even after `id:`
            text = _text(b"\n".join(data))
            name = _text(event_type) or "message"
            events.append(_new_event(SSEEvent, (text, name, self._last_id, self._retry)))
