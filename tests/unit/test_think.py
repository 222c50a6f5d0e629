"""A leading <think> block is reasoning (bridge/think.py)."""

from __future__ import annotations

from bridge.events import AgentSwitch, Done, Event, ReasoningDelta, TextDelta, TextReplace, Usage
from bridge.think import ThinkSplitter


def split_all(events: list[Event]) -> list[Event]:
    splitter = ThinkSplitter()
    return [out for event in events for out in splitter.split(event)]


def test_think_block_across_deltas() -> None:
    events = [TextDelta(" <thi"), TextDelta("nk>why"), TextDelta(" so</th"), TextDelta("ink>\nIt"),
              TextDelta(" is."), Done()]
    assert split_all(events) == [
        ReasoningDelta("why"), ReasoningDelta(" so"), TextDelta("It"), TextDelta(" is."), Done(),
    ]


def test_answer_deltas_pass_as_they_are() -> None:
    delta = TextDelta(" more")
    splitter = ThinkSplitter()
    assert splitter.split(TextDelta("Plain")) == [TextDelta("Plain")]
    assert splitter.split(delta)[0] is delta
    usage = Usage(1, 2, 3)
    assert splitter.split(usage) == (usage,)


def test_each_part_starts_afresh_and_held_text_is_flushed() -> None:
    events = [TextDelta("<th"), AgentSwitch("b"), TextDelta("<think>x"), Done()]
    assert split_all(events) == [
        TextDelta("<th"), AgentSwitch("b"), ReasoningDelta("x"), Done(),
    ]


def test_a_replacement_repeating_the_think_block_replaces_the_answer_alone() -> None:
    splitter = ThinkSplitter()
    assert splitter.split(TextDelta("<think>why</think>\n\nIt is.")) == [
        ReasoningDelta("why"), TextDelta("It is."),
    ]
    assert splitter.split(TextReplace(" <think>why</think>\n\nIt is so.")) == [
        TextReplace("It is so."),
    ]
    assert splitter.split(TextDelta(" More.")) == (TextDelta(" More."),)
    thinking = ThinkSplitter()
    assert thinking.split(TextReplace("<think>still wei")) == [TextReplace("")]
    assert thinking.split(TextDelta("ghing</think>Done.")) == [
        ReasoningDelta("ghing"), TextDelta("Done."),
    ]
    assert ThinkSplitter().split(TextReplace("Plain.")) == [TextReplace("Plain.")]
    kept = "Plain <think>not leading: answer text</think>"
    assert ThinkSplitter().split(TextReplace(kept)) == [TextReplace(kept)]
