"""bridge/think.py under property tests: any chunking of an answer, tags cut anywhere,
replacements, and text that is not well formed.

Expected splits come from `reference_split`, the rule of SPEC §7 read on the whole text at
once, which shares nothing with the splitter's incremental states.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge.events import AgentSwitch, Done, Event, ReasoningDelta, TextDelta, TextReplace
from bridge.think import ThinkSplitter
from tests.fakes.base import chunked

OPEN, CLOSE = "<think>", "</think>"
PROPERTY = settings(max_examples=400, deadline=1000)


def reference_split(text: str) -> tuple[str, str]:
    """(reasoning, answer) of one answer part, read whole. The design, as SPEC §7 and
    bridge/think.py state it: only a *leading* block counts (after blank space, which goes
    with it); the first `</think>` closes it, so a nested `<think>` is reasoning and what
    follows the first close is answer, a second `</think>` included; the line breaks after
    the close are dropped; a block never closed is reasoning to the end; anything else,
    an unfinished `<thi` at the end included, is answer text as it came."""
    stripped = text.lstrip()
    if not stripped.startswith(OPEN):
        return "", text
    body = stripped[len(OPEN) :]
    end = body.find(CLOSE)
    if end < 0:
        return body, ""
    return body[:end], body[end + len(CLOSE) :].lstrip("\n")


def run(events: Iterable[Event]) -> list[Event]:
    splitter = ThinkSplitter()
    return [out for event in events for out in splitter.split(event)]


def reasoning_of(events: Iterable[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, ReasoningDelta))


def shown(events: Iterable[Event]) -> str:
    """The answer text a reader sees: deltas appended, a replacement sets it."""
    answer = ""
    for event in events:
        if isinstance(event, TextReplace):
            answer = event.text
        elif isinstance(event, TextDelta):
            answer += event.text
    return answer


# Texts made of the pieces that matter (tags whole and cut, blank space, line ends, a
# surrogate pair and its halves alone), and any text at all, lone surrogates included.
_PIECES = st.sampled_from(
    [
        OPEN,
        CLOSE,
        "<",
        "</",
        "<thi",
        "</thi",
        "<think",
        "</think",
        "nk>",
        "ink>",
        ">",
        "\n",
        "\r\n",
        " ",
        "\t",
        "\u3000",
        "a",
        "思",
        "\ud83d",
        "\ude00",
        "😀",
    ]
)
answers = st.one_of(
    st.lists(_PIECES, max_size=16).map("".join),
    st.text(st.characters(exclude_categories=()), max_size=30),
)
cut_points = st.lists(st.integers(min_value=0), max_size=10)


@PROPERTY
@given(text=answers, cuts=cut_points)
def test_any_chunking_gives_the_split_of_the_whole_text(text: str, cuts: list[int]) -> None:
    # nothing lost or repeated: reasoning and answer are the text less its tags, whatever
    # the deltas it came in, a tag cut across any of them
    out = run([*(TextDelta(piece) for piece in chunked(text, cuts)), Done()])
    assert (reasoning_of(out), shown(out)) == reference_split(text)
    assert out[-1] == Done()
    assert all(event.text for event in out if isinstance(event, ReasoningDelta))


@PROPERTY
@given(text=answers, cuts=cut_points)
def test_only_what_may_be_a_tag_is_held_back(text: str, cuts: list[int]) -> None:
    """After each delta, what came out is the split of the text so far, less at most the end
    of it that may still turn out to be a tag (or blank space that may precede one)."""
    splitter = ThinkSplitter()
    out: list[Event] = []
    so_far = ""
    for piece in chunked(text, cuts):
        so_far += piece
        out += splitter.feed(piece)
        reasoning, answer = reference_split(so_far)
        stripped = so_far.lstrip()
        if OPEN.startswith(stripped):  # blank space, or the start of `<think>`: all held
            assert out == []
        elif stripped.startswith(OPEN) and CLOSE not in stripped:  # thinking
            held = reasoning.removeprefix(reasoning_of(out))
            assert reasoning == reasoning_of(out) + held
            assert len(held) < len(CLOSE) and CLOSE.startswith(held)
            assert shown(out) == ""
        else:  # the answer has begun, or may begin after line breaks: nothing is held
            assert (reasoning_of(out), shown(out)) == (reasoning, answer)


@settings(max_examples=200, deadline=1000)
@given(parts=st.lists(answers, min_size=1, max_size=4), cuts=cut_points)
def test_each_agent_part_is_split_on_its_own(parts: list[str], cuts: list[int]) -> None:
    events: list[Event] = []
    for number, part in enumerate(parts):
        events += [AgentSwitch(f"agent-{number}"), *(TextDelta(p) for p in chunked(part, cuts))]
    out = run([*events, Done()])
    switches = [i for i, event in enumerate(out) if isinstance(event, AgentSwitch | Done)]
    for part, start, end in zip(parts, switches, switches[1:], strict=False):
        assert (reasoning_of(out[start:end]), shown(out[start:end])) == reference_split(part)


@PROPERTY
@given(text=answers, at=st.integers(min_value=0), cuts=cut_points)
# The old `replace` read a replacement on its own, and the deltas after it by its state:
# a close tag cut at its end lost the answer after it to the reasoning…
@example(text="<think>why</think>\n\nIt is.", at=14, cuts=[])
# …the line breaks after a closed block came out as answer text…
@example(text="<think>why</think>\n\nIt is.", at=18, cuts=[])
# …and an open tag cut at its end (or blank space) made the block answer text.
@example(text="<think>why</think>It is.", at=4, cuts=[])
@example(text=" <think>why</think>It is.", at=1, cuts=[])
def test_deltas_after_a_replacement_continue_it(text: str, at: int, cuts: list[int]) -> None:
    """A replacement (Dify `message_replace`) is the whole answer so far and the deltas that
    follow continue it: the reader sees the answer of the whole text, however it was cut.
    The replacement's reasoning repeats what was shown and is dropped: reasoning after it
    is the rest of the text's."""
    at %= len(text) + 1
    rest = chunked(text[at:], cuts)
    out = run([TextReplace(text[:at]), *(TextDelta(piece) for piece in rest), Done()])
    reasoning, answer = reference_split(text)
    assert shown(out) == answer
    assert reasoning.endswith(reasoning_of(out))
    assert isinstance(out[0], TextReplace)
