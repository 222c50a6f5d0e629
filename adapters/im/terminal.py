"""The terminal channel of `chatbridge chat` and `demo`: answers on stdout as they arrive.

Answer pieces are written as they come (tokens, for a streaming upstream); the bot's own
messages (`/status`, `/reset`, the stop and failure notices) each start on a line of their
own. The channel keeps track of whether the cursor is at the start of a line, so the CLI can
put its prompt on a fresh line after any answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from bridge.interfaces import InboundMessage, Piece, ReplyTarget, Sender, WebhookRejected

__all__ = ["TERMINAL_USER", "TerminalIM"]

TERMINAL_USER = Sender(id="terminal", name="you")


class TerminalIM:
    name = "terminal"
    max_chars = 1_000_000
    streams_tokens = True
    rate_limited = False  # a local terminal: no platform limits, no send budget

    def __init__(self, output: TextIO) -> None:
        self._output = output
        self._at_line_start = True

    def verify(self, headers: Mapping[str, str]) -> None:
        """Lines typed at the terminal need no signature."""

    def parse(self, body: bytes, headers: Mapping[str, str]) -> InboundMessage:
        raise WebhookRejected(400, "the terminal channel takes no webhooks")

    async def send(self, target: ReplyTarget, piece: Piece) -> None:
        if piece.kind == "notice":
            self.end_line()
            self.write(piece.text.strip("\n") + "\n")
        else:
            self.write(piece.text)

    def dedupes(self, target: ReplyTarget) -> bool:
        """A terminal prints what it is given: a piece sent again shows again."""
        return False

    # For the CLI around the channel

    def write(self, text: str) -> None:
        """Write and flush at once: a token shows the moment it arrives."""
        if not text:
            return
        try:
            self._output.write(text)
            self._output.flush()
        except (BrokenPipeError, OSError, ValueError):
            return  # the terminal went away (a closed pipe, a hung-up tty): nothing to show
        self._at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        """Move to the start of a line, unless already there."""
        if not self._at_line_start:
            self.write("\n")

    def typed_line(self) -> None:
        """The person pressed Enter: the terminal's echo moved the cursor to a new line."""
        self._at_line_start = True
