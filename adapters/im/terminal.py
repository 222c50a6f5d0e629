"""The terminal channel of `chatbridge chat` and `demo`: answers on stdout as they arrive."""

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

    def __init__(self, output: TextIO) -> None:
        self._output = output

    def verify(self, headers: Mapping[str, str]) -> None:
        """Lines typed at the terminal need no signature."""

    def parse(self, body: bytes, headers: Mapping[str, str]) -> InboundMessage:
        raise WebhookRejected(400, "the terminal channel takes no webhooks")

    async def send(self, target: ReplyTarget, piece: Piece) -> None:
        if piece.kind == "notice":
            self._output.write(f"\n[{piece.text}]\n")
        else:
            self._output.write(piece.text)
        self._output.flush()
