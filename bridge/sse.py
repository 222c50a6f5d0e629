"""Incremental Server-Sent Events decoder: bytes in, events out (WHATWG HTML §9.2.6).

Two layers, as the standard reads: lines are split on *bytes* (CR and LF never occur inside
a UTF-8 sequence, so a character split across reads simply stays in the buffer), then each
complete line is decoded once and interpreted field by field. Pure: no I/O, no aiohttp.

One deliberate leniency: at end of stream an event whose blank line never came is still
dispatched (WHATWG discards it). Real upstreams end with `data: [DONE]` and no blank line
often enough that dropping the last event would lose answer text.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_LINE_BYTES", "SSEDecoder", "SSEEvent", "SSELineTooLong"]

DEFAULT_MAX_LINE_BYTES = 1 << 20
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str = ""  # the last event ID at dispatch time, as the standard defines it
    retry: int | None = None  # the latest valid `retry:` seen in the stream, in milliseconds


class SSELineTooLong(Exception):
    """A line exceeded the decoder's limit; the stream cannot be trusted any further."""


class SSEDecoder:
    """Feed it chunks with `feed`, then call `close` at end of stream."""

    __slots__ = (
        "_data",
        "_event_type",
        "_last_id",
        "_max_line_bytes",
        "_partial",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._partial = b""
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._started = False  # a leading BOM is stripped once
        self._data: list[str] = []
        self._event_type = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._partial + chunk if self._partial else chunk
        lines = buffer.splitlines(keepends=True)
        if not lines:
            return []
        last = lines[-1]
        if last.endswith((b"\n", b"\r")):
            self._partial = b""
            self._skip_lf = last.endswith(b"\r")
        else:
            self._partial = lines.pop()
            if len(self._partial) > self._max_line_bytes:
                raise SSELineTooLong(f"line longer than {self._max_line_bytes} bytes")
        events: list[SSEEvent] = []
        for raw in lines:
            line = raw.rstrip(b"\r\n") if raw[-1:] in b"\r\n" else raw
            if len(line) > self._max_line_bytes:
                raise SSELineTooLong(f"line longer than {self._max_line_bytes} bytes")
            event = self._process_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: interpret a last unterminated line and dispatch what is pending."""
        events: list[SSEEvent] = []
        if self._partial:
            line, self._partial = self._partial, b""
            self._process_line(line.decode("utf-8", errors="replace"))
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _process_line(self, line: str) -> SSEEvent | None:
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event_type = self._data, self._event_type
        self._data, self._event_type = [], ""
        if not data:
            return None
        return SSEEvent("\n".join(data), event_type or "message", self._last_id, self._retry)
