"""UTF-16 surrogates in upstream text, made into characters (SPEC §4: nothing cut mid-character).

JSON escapes text as `\\uXXXX`, a character outside the BMP (an emoji) as a surrogate pair,
and an upstream that streams UTF-16 strings (Java, JavaScript) may cut a pair between two
events: `"\\ud83d"` ends one delta, `"\\ude00"` begins the next. Decoded alone, each half is
a lone surrogate, which UTF-8 cannot hold: the piece could be neither journalled nor sent.
Here a pair split across deltas is joined into its character, and a surrogate that has no
partner becomes U+FFFD (one still held when the stream ends, half a character, is dropped).
"""

from __future__ import annotations

import re

from bridge.events import AgentSwitch, Event, ReasoningDelta, Suggestions, TextDelta, TextReplace

__all__ = ["SurrogateJoiner", "whole_characters"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_HIGH_FIRST, _HIGH_LAST = "\ud800", "\udbff"


def whole_characters(text: str) -> str:
    """`text` with surrogate pairs joined into their characters; a lone one becomes U+FFFD."""
    if text.isascii() or _SURROGATE.search(text) is None:  # (nearly every text)
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class SurrogateJoiner:
    """One turn's events with whole characters: a high surrogate that ends a delta is held
    for the next delta of its kind (answer, reasoning), whose low surrogate completes it."""

    def __init__(self) -> None:
        self._held: dict[type[TextDelta | ReasoningDelta], str] = {}

    def join(self, event: Event) -> Event:
        if isinstance(event, TextDelta | ReasoningDelta):
            held = self._held.pop(type(event), "") if self._held else ""
            text = held + event.text
            if not held and (text.isascii() or _SURROGATE.search(text) is None):
                return event
            if text and _HIGH_FIRST <= text[-1] <= _HIGH_LAST:
                self._held[type(event)], text = text[-1], text[:-1]
            return type(event)(whole_characters(text))
        if isinstance(event, TextReplace):
            return TextReplace(whole_characters(event.text))
        if isinstance(event, AgentSwitch):
            return AgentSwitch(whole_characters(event.agent))
        if isinstance(event, Suggestions):
            return Suggestions(tuple(whole_characters(item) for item in event.items))
        return event
