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


def test_the_line_breaks_after_the_block_may_come_in_deltas_of_their_own() -> None:
    events = [TextDelta("<think>x</think>"), TextDelta("\n"), TextDelta("\nIt"), Done()]
    assert split_all(events) == [ReasoningDelta("x"), TextDelta("It"), Done()]


def test_reasoning_passes_as_it_comes_holding_back_only_a_possible_end_tag() -> None:
    splitter = ThinkSplitter()
    assert splitter.split(TextDelta("<think>abc")) == [ReasoningDelta("abc")]
    assert splitter.split(TextDelta("def</")) == [ReasoningDelta("def")]
    assert splitter.split(TextDelta("b>")) == [ReasoningDelta("</b>")]


def test_each_agent_part_may_open_with_a_think_block_of_its_own() -> None:
    events = [TextDelta("First."), AgentSwitch("b"), TextDelta("<think>y</think>Second."), Done()]
    assert split_all(events) == [
        TextDelta("First."), AgentSwitch("b"), ReasoningDelta("y"), TextDelta("Second."), Done(),
    ]


def test_a_part_that_is_only_a_think_block_or_a_plain_replacement_ends_clean() -> None:
    assert split_all([TextDelta("<think>x</think>"), Done()]) == [ReasoningDelta("x"), Done()]
    assert split_all([TextReplace("Plain."), Done()]) == [TextReplace("Plain."), Done()]


def test_a_think_block_never_closed_is_reasoning_to_its_end() -> None:
    assert split_all([TextDelta("<think>abc</thi"), Done()]) == [
        ReasoningDelta("abc"), ReasoningDelta("</thi"), Done(),
    ]
    assert split_all([TextReplace("<think>a"), TextDelta("b</th"), Done()]) == [
        TextReplace(""), ReasoningDelta("b"), ReasoningDelta("</th"), Done(),
    ]


def test_deltas_after_a_plain_replacement_are_answer_text() -> None:
    assert split_all([TextReplace("Plain."), TextDelta(" More.")]) == [
        TextReplace("Plain."), TextDelta(" More."),
    ]


def test_an_end_tag_cut_after_its_first_or_before_its_last_character() -> None:
    events = [TextDelta("<think>abc</think"), TextDelta(">It"), Done()]
    assert split_all(events) == [ReasoningDelta("abc"), TextDelta("It"), Done()]
    events = [TextDelta("<think>abc<"), TextDelta("/think>It"), Done()]
    assert split_all(events) == [ReasoningDelta("abc"), TextDelta("It"), Done()]


def test_a_replacement_with_a_closed_think_block_then_the_end() -> None:
    assert split_all([TextReplace("<think>a</think>\nB"), Done()]) == [TextReplace("B"), Done()]
