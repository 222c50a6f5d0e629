"""Replays recorded `.sse` streams through the named format's parser (demo, tests, benchmarks).

The bytes go through the real `SSEDecoder` and then through the same pure parser the live
adapter uses, so a recording plays exactly as the upstream would have streamed it. Text is
paced at `BRIDGE_REPLAY_CPS` characters per second (0 = as fast as possible), counting answer
and reasoning text. Each session gets a fake `replay_session` reference so sessions behave
as with a real upstream (conversation ids inside a recording are dropped). A recording that
ends without its format's end marker is a broken stream, as it would be live.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Protocol

from adapters.upstream._common import relay
from adapters.upstream.aimaster import AimasterParser
from adapters.upstream.coze import CozeParser
from adapters.upstream.dify import DifyParser
from adapters.upstream.hiagent import HiAgentParser
from adapters.upstream.openai import OpenAIParser
from bridge.config import Settings, recording_format
from bridge.events import (
    ConversationRef,
    Event,
    ReasoningDelta,
    TextDelta,
)
from bridge.http import UpstreamHTTP, feed_sse
from bridge.interfaces import KeyValue, Turn
from bridge.sse import SSEDecoder, SSEEvent

__all__ = [
    "FORMATS",
    "FrameParser",
    "Recording",
    "ReplayUpstream",
    "create",
    "demo_recordings",
    "parser_for",
    "recordings_in",
]

READ_CHUNK_BYTES = 4096  # fed to the decoder piece by piece, as a socket would deliver it


class FrameParser(Protocol):
    """One answer's parser: SSE messages in, events out; `Done` or `UpstreamError` ends it."""

    def feed(self, message: SSEEvent) -> list[Event]: ...


# Format name → factory of a fresh parser per answer. Each parser lives in its adapter module.
FORMATS: dict[str, Callable[[], FrameParser]] = {
    "openai": OpenAIParser,
    "aimaster": AimasterParser,
    "hiagent": HiAgentParser,
    "coze": CozeParser,
    "dify": DifyParser,
}


def parser_for(fmt: str) -> FrameParser:
    """A fresh parser for one answer in format `fmt`; ValueError for an unknown format."""
    factory = FORMATS.get(fmt)
    if factory is None:
        raise ValueError(f"unknown replay format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    return factory()


@dataclass(frozen=True, slots=True)
class Recording:
    name: str
    format: str
    data: bytes

    def __post_init__(self) -> None:
        parser_for(self.format)  # fail at start-up, not at the first turn

    @classmethod
    def load(cls, path: Path, fmt: str) -> Recording:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read replay file {str(path)!r}: {exc.strerror}") from exc
        return cls(path.name, fmt, data)


def recordings_in(folder: Traversable) -> list[Recording]:
    """The `.sse` recordings of a folder, in name order, each in the format its name starts
    with (`aimaster-scenario.sse` → `aimaster`); files of no known format (and folders) are
    left out."""
    recordings = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        fmt = recording_format(entry.name)
        if fmt is not None and entry.is_file():
            recordings.append(Recording(entry.name, fmt, entry.read_bytes()))
    return recordings


def demo_recordings() -> list[Recording]:
    """The recordings shipped in `bridge/recordings/`, for `chatbridge demo`."""
    return recordings_in(importlib.resources.files("bridge").joinpath("recordings"))


def _paced_chars(event: Event) -> int:
    return len(event.text) if isinstance(event, TextDelta | ReasoningDelta) else 0


class ReplayUpstream:
    """Plays its recordings in turn, one per turn, whatever is asked."""

    name = "replay"
    keeps_history = True

    def __init__(
        self,
        recordings: Sequence[Recording],
        cps: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not recordings:
            raise ValueError("nothing to replay")
        self._recordings = list(recordings)
        self._next = 0
        self._cps = cps
        self._clock = clock
        self._sleep = sleep

    async def stream(self, turn: Turn) -> AsyncIterator[Event]:
        recording = self._recordings[self._next % len(self._recordings)]
        self._next += 1
        if not (turn.conversation or {}).get("replay_session"):
            yield ConversationRef({"replay_session": uuid.uuid4().hex})
        started, chars = self._clock(), 0
        # The live adapters' own loop: a keep-alive `data:` line is skipped, a recording that
        # ends inside a message or before its end marker is a broken stream.
        events = relay(
            _messages(recording.data), parser_for(recording.format),
            upstream=f"recording {recording.name}",
        )
        async with aclosing(events):
            async for event in events:
                if isinstance(event, ConversationRef):
                    continue  # the recorded upstream's ids are not this session's
                chars += _paced_chars(event)
                if self._cps > 0:
                    delay = started + chars / self._cps - self._clock()
                    if delay > 0:
                        await self._sleep(delay)
                yield event

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Nothing to forget: a recording has no memory."""

    async def aclose(self) -> None:
        """Nothing is held open."""


async def _messages(data: bytes) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    for start in range(0, len(data), READ_CHUNK_BYTES):
        for message in feed_sse(decoder, data[start : start + READ_CHUNK_BYTES]):
            yield message
    for message in decoder.close():
        yield message


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> ReplayUpstream:
    """One recording (BRIDGE_REPLAY_FILE in BRIDGE_REPLAY_FORMAT), or every recording of a
    folder in turn (the format taken from each file's name)."""
    if settings.replay_file is None:
        raise ValueError("BRIDGE_REPLAY_FILE is required for replay")
    if settings.replay_file.is_dir():
        return ReplayUpstream(recordings_in(settings.replay_file), settings.replay_cps)
    if settings.replay_format is None:
        raise ValueError("BRIDGE_REPLAY_FORMAT is required when BRIDGE_REPLAY_FILE is a file")
    recording = Recording.load(settings.replay_file, settings.replay_format)
    return ReplayUpstream([recording], settings.replay_cps)
