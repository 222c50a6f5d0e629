"""The replay upstream: recordings through the real SSE decoder and parsers, paced."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from adapters.upstream import replay
from adapters.upstream.replay import (
    FORMATS,
    Recording,
    ReplayUpstream,
    demo_recordings,
    parser_for,
)
from bridge.config import REPLAY_FORMATS, load_settings
from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from bridge.http import UpstreamBroken, UpstreamHTTP, UpstreamProtocolError
from bridge.interfaces import Sender, Turn
from bridge.sse import SSEEvent
from tests.fakes.aimaster import recorded
from tests.fakes.scripted import MemoryKV

RECORDINGS = Path(replay.__file__).resolve().parents[2] / "bridge" / "recordings"
AIMASTER = RECORDINGS / "aimaster-scenario.sse"

OPENAI_RECORDING = (
    ": keep-alive\n\n"
    'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    'data: {"id":"c1","choices":[{"index":0,"delta":{"reasoning_content":"想一想"}}]}\n\n'
    'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"你好"}}]}\r\n\r\n'
    'data: {"id":"c1","choices":[{"index":0,"delta":{"content":null}}]}\n\n'
    'data: {"id":"c1","choices":[{"index":0,"delta":{"content":",世界"},'
    '"finish_reason":"stop"}]}\n\n'
    'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,'
    '"total_tokens":7}}\n\n'
    "data: [DONE]"
).encode()


class FakeTime:
    """A clock that moves only when the replay sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


def turn(conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text="anything", sender=Sender("u"), chat_session_id="term:u",
                conversation=conversation)


async def collect(upstream: ReplayUpstream, conversation: dict[str, str] | None = None,
                  into: list[Event] | None = None) -> list[Event]:
    events = [] if into is None else into
    async for event in upstream.stream(turn(conversation)):
        events.append(event)
    return events


async def test_aimaster_recording_plays_exactly() -> None:
    text, reasoning, agents, _ = recorded(AIMASTER)
    upstream = ReplayUpstream([Recording.load(AIMASTER, "aimaster")])
    events = await collect(upstream)
    assert isinstance(events[0], ConversationRef)
    assert set(events[0].ref) == {"replay_session"}
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == text
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    assert [e.agent for e in events if isinstance(e, AgentSwitch)] == agents
    assert isinstance(events[-2], Usage)
    assert events[-1] == Done()


async def test_openai_recording_plays_exactly() -> None:
    upstream = ReplayUpstream([Recording("o.sse", "openai", OPENAI_RECORDING)])
    events = await collect(upstream, {"replay_session": "kept"})
    assert events == [
        ReasoningDelta("想一想"),
        TextDelta("你好"),
        TextDelta(",世界"),
        Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        Done(),
    ]


async def test_session_reference_is_made_once() -> None:
    upstream = ReplayUpstream([Recording("o.sse", "openai", OPENAI_RECORDING)])
    first = await collect(upstream)
    ref = first[0]
    assert isinstance(ref, ConversationRef)
    second = await collect(upstream, dict(ref.ref))
    assert not any(isinstance(e, ConversationRef) for e in second)


async def test_recordings_play_in_turn() -> None:
    upstream = ReplayUpstream([
        Recording("o.sse", "openai", OPENAI_RECORDING),
        Recording.load(AIMASTER, "aimaster"),
    ])
    kinds = []
    for _ in range(3):
        events = await collect(upstream, {"replay_session": "s"})
        kinds.append(any(isinstance(e, AgentSwitch) for e in events))
    assert kinds == [False, True, False]


async def test_pacing_by_characters_per_second() -> None:
    fake = FakeTime()
    upstream = ReplayUpstream([Recording.load(AIMASTER, "aimaster")], cps=50,
                              clock=fake.clock, sleep=fake.sleep)
    events = await collect(upstream)
    chars = sum(len(e.text) for e in events if isinstance(e, TextDelta | ReasoningDelta))
    assert fake.now == pytest.approx(chars / 50)
    assert len(fake.sleeps) == sum(
        1 for e in events if isinstance(e, TextDelta | ReasoningDelta) and e.text
    )


async def test_zero_cps_never_sleeps() -> None:
    fake = FakeTime()
    upstream = ReplayUpstream([Recording.load(AIMASTER, "aimaster")], cps=0,
                              clock=fake.clock, sleep=fake.sleep)
    assert (await collect(upstream))[-1] == Done()
    assert fake.sleeps == []


async def test_real_pacing_is_roughly_right() -> None:
    upstream = ReplayUpstream([Recording("o.sse", "openai", OPENAI_RECORDING)], cps=100)
    started = time.monotonic()
    await collect(upstream)
    assert 0.07 <= time.monotonic() - started < 1.0  # 8 characters at 100/s


async def test_recording_without_end_marker_is_broken() -> None:
    data = OPENAI_RECORDING.replace(b"data: [DONE]", b"")
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(ReplayUpstream([Recording("o.sse", "openai", data)]), into=events)
    assert TextDelta(",世界") in events


async def test_a_line_over_the_limit_is_a_protocol_error_as_live() -> None:
    # (a bare SSELineTooLong before: a traceback, the entry left to be asked again)
    data = OPENAI_RECORDING.replace(b"data: [DONE]", b"data: " + b"x" * (1 << 20) + b"\n\n")
    events: list[Event] = []
    with pytest.raises(UpstreamProtocolError, match="line longer than"):
        await collect(ReplayUpstream([Recording("o.sse", "openai", data)]), into=events)
    assert TextDelta(",世界") in events


async def test_keep_alive_data_line_plays_as_it_would_live() -> None:
    # A proxy's `data:` alone is no message in any protocol: the live adapters skip it.
    data = OPENAI_RECORDING.replace(b": keep-alive\n\n", b"data:\n\n")
    events = await collect(ReplayUpstream([Recording("o.sse", "openai", data)]))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["你好", ",世界"]
    assert events[-1] == Done()


async def test_recording_cut_inside_a_message_is_broken() -> None:
    data = OPENAI_RECORDING[: OPENAI_RECORDING.index(b"finish_reason")]
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(ReplayUpstream([Recording("o.sse", "openai", data)]), into=events)
    assert TextDelta("你好") in events


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown replay format"):
        parser_for("telnet")


def test_registry_has_a_parser_per_replay_format() -> None:
    # the formats BRIDGE_REPLAY_FORMAT accepts and recordings are named for, each playable
    assert set(FORMATS) == set(REPLAY_FORMATS) == {"openai", "aimaster", "hiagent", "coze", "dify"}


def test_demo_plays_every_shipped_recording() -> None:
    recordings = demo_recordings()
    assert [r.name for r in recordings] == sorted(p.name for p in RECORDINGS.glob("*.sse"))
    assert {r.format for r in recordings} == {"aimaster", "hiagent"}


async def test_demo_answers_are_the_recorded_answers_in_turn() -> None:
    upstream = ReplayUpstream(demo_recordings())
    answers = []
    for _ in range(3):
        events = await collect(upstream)
        answers.append("".join(e.text for e in events if isinstance(e, TextDelta)))
    assert answers[0] == recorded(AIMASTER).text
    assert answers[1].startswith("OpenStack") and answers[2] == answers[0]


async def test_create_from_settings() -> None:
    settings = load_settings({
        "BRIDGE_UPSTREAM": "replay",
        "BRIDGE_REPLAY_FILE": str(AIMASTER),
        "BRIDGE_REPLAY_FORMAT": "aimaster",
        "BRIDGE_REPLAY_CPS": "0",
    }, command="demo")
    async with aiohttp.ClientSession() as session:
        upstream = replay.create(settings, UpstreamHTTP(session), MemoryKV())
        assert (await collect(upstream))[-1] == Done()


def test_create_with_a_file_gone_since_the_settings_were_read(tmp_path: Path) -> None:
    recording = tmp_path / "gone.sse"
    recording.write_text("data: [DONE]\n\n")
    settings = load_settings({
        "BRIDGE_REPLAY_FILE": str(recording),
        "BRIDGE_REPLAY_FORMAT": "openai",
    }, command="demo")
    recording.unlink()
    with pytest.raises(ValueError, match="cannot read replay file"):
        replay.create(settings, None, MemoryKV())  # type: ignore[arg-type]


class RefParser:
    """A format whose stream names the recorded upstream's own conversation."""

    def feed(self, message: SSEEvent) -> list[Event]:
        if message.data == "end":
            return [Done()]
        return [ConversationRef({"conversation_id": "recorded"}), TextDelta(message.data)]


async def test_recorded_conversation_ids_are_not_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(FORMATS, "refs", RefParser)
    upstream = ReplayUpstream([Recording("r.sse", "refs", b"data: hi\n\ndata: end\n\n")])
    events = await collect(upstream, {"replay_session": "s"})
    assert events == [TextDelta("hi"), Done()]
