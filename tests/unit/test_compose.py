"""The Composer: flush policy, rendering of reasoning, hand-offs, suggestions, corrections."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from bridge import compose as compose_module
from bridge.compose import Composer, FlushPolicy, Standalone, quote_block, split_text
from bridge.events import (
    AgentSwitch,
    Event,
    ReasoningDelta,
    Suggestions,
    TextDelta,
    TextReplace,
    Usage,
)

STREAM = FlushPolicy(mode="stream", min_chars=40, max_wait_s=1000.0)
FINAL = FlushPolicy(mode="final", min_chars=40, max_wait_s=1000.0)


def compose(policy: FlushPolicy, events: Iterable[Event], **options: object) -> list[str]:
    """Every message of a turn, fed at t=0 (no max-wait flushes)."""
    composer = Composer(policy, **options)  # type: ignore[arg-type]
    out: list[str] = []
    for event in events:
        out += composer.feed(event, 0.0)
    return out + composer.finish()


def chars(text: str) -> list[Event]:
    """The text as one delta per character: every possible cut point is offered."""
    return [TextDelta(ch) for ch in text]


def fences_balanced(piece: str) -> bool:
    return len(re.findall(r"^ {0,3}```", piece, re.MULTILINE)) % 2 == 0


# Stream mode: when a piece leaves


def test_nothing_leaves_before_min_chars_even_at_a_boundary() -> None:
    composer = Composer(STREAM)
    assert composer.feed(TextDelta("Short. Sentences. Here. "), 0.0) == []


def test_a_piece_leaves_at_the_first_boundary_past_min_chars() -> None:
    text = "This first sentence is quite short. But this one goes past forty. And on."
    pieces = compose(STREAM, chars(text))
    assert pieces == [
        "This first sentence is quite short. But this one goes past forty. ",
        "And on.",
    ]


def test_every_piece_but_the_last_holds_min_chars() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = compose(STREAM, chars(text))
    assert "".join(pieces) == text
    assert len(pieces) > 5
    assert all(len(piece) >= STREAM.min_chars for piece in pieces[:-1])
    assert all(piece.endswith(". ") for piece in pieces[:-1])


def test_a_paragraph_boundary_is_preferred_to_a_later_sentence_end() -> None:
    text = "A" * 45 + ".\n\n" + "B" * 10 + ". " + "C"
    composer = Composer(STREAM)
    assert composer.feed(TextDelta(text), 0.0) == ["A" * 45 + ".\n\n"]


@pytest.mark.parametrize("end", ["。", "！", "？", "……"])
def test_cjk_sentence_ends_are_boundaries(end: str) -> None:
    first = "这是一个很长的中文句子，用来测试分段是否正确"
    second = "后面还有一些内容需要继续输出才行"
    text = first + end + second + end
    pieces = compose(FlushPolicy(min_chars=20, max_wait_s=1000), chars(text))
    assert pieces[0].endswith(end)
    assert "".join(pieces) == text


def test_cjk_closing_quote_stays_with_its_sentence() -> None:
    text = "他说：“这是一个很长的句子，我们需要它超过二十个字。”然后继续说了下去。"
    pieces = compose(FlushPolicy(min_chars=20, max_wait_s=1000), chars(text))
    assert pieces[0].endswith("。”")


def test_no_cut_without_knowing_the_next_character() -> None:
    composer = Composer(FlushPolicy(min_chars=10, max_wait_s=1000))
    assert composer.feed(TextDelta("A sentence that is long.\n"), 0.0) == []
    assert composer.feed(TextDelta("Next"), 0.0) == ["A sentence that is long.\n"]


def test_a_sentence_end_whose_space_has_come_leaves_without_waiting_for_more() -> None:
    """A cut after ". " depends on nothing still to come: the piece leaves with that delta."""
    composer = Composer(FlushPolicy(min_chars=10, max_wait_s=1000))
    assert composer.feed(TextDelta("A sentence that is long. "), 0.0) == [
        "A sentence that is long. "
    ]


# Max wait


def test_max_wait_flushes_at_any_boundary_below_min_chars() -> None:
    composer = Composer(FlushPolicy(min_chars=300, max_wait_s=6.0), now=100.0)
    assert composer.feed(TextDelta("Short one. Another"), 101.0) == []
    assert composer.tick(105.9) == []
    assert composer.tick(106.0) == ["Short one. "]
    assert composer.feed(TextDelta(" sentence. And"), 107.0) == []  # 6 s since the last piece
    assert composer.tick(112.0) == ["Another sentence. "]


def test_max_wait_never_cuts_without_a_boundary() -> None:
    composer = Composer(FlushPolicy(min_chars=300, max_wait_s=1.0), now=0.0)
    composer.feed(TextDelta("no boundary anywhere in this text"), 0.5)
    assert composer.tick(10.0) == []


def test_max_wait_never_cuts_inside_an_open_fence() -> None:
    composer = Composer(FlushPolicy(min_chars=300, max_wait_s=1.0), now=0.0)
    composer.feed(TextDelta("Code:\n```python\nx = 1\n\ny = 2. Then\n"), 0.5)
    assert composer.tick(10.0) == ["Code:\n"]  # before the fence, never inside it
    assert composer.tick(20.0) == []
    closed = composer.feed(TextDelta("```\nDone"), 21.0)
    assert closed == ["```python\nx = 1\n\ny = 2. Then\n```\n"]


# Never inside a fence, a table, a list item, a word

FENCED = (
    "Here is the plan. We write a function first.\n\n"
    "```python\ndef f(x):\n    # one. two! three?\n\n    return x\n\n\nprint(f(1))\n```\n\n"
    "Then we test it. It works well. Finally we are done with it all."
)
TABLE = (
    "The results are in the table below, read them carefully.\n\n"
    "| name | value. ok |\n|---|---|\n| a | 1. first |\n| b | 2. second |\n| c | 3 |\n\n"
    "That is all for the table. Thanks for reading it."
)
LISTED = (
    "Steps to follow, in order, all of them:\n"
    "- first step. It has two sentences.\n"
    "  continued on a second line. Still the item.\n"
    "- second step: another. One more.\n"
    "  - nested item. With a sentence.\n"
    "- third step.\n\nAfter the list. More text here to flush."
)


@pytest.mark.parametrize("min_chars", [0, 1, 5, 20, 45])
def test_no_piece_ends_inside_a_code_fence(min_chars: int) -> None:
    pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000), chars(FENCED))
    assert "".join(pieces) == FENCED
    assert all(fences_balanced(piece) for piece in pieces)
    assert any("```python" in piece and piece.rstrip().endswith("```") for piece in pieces)


def test_a_line_opening_with_inline_code_in_triple_backticks_does_not_hold_the_stream() -> None:
    """```npm install``` at the start of a line is inline code (a backtick fence's info
    string holds no backtick): taken for a fence still open, it held every piece after it
    until the end of the turn."""
    text = "```npm install``` is the command. Next steps follow.\n\n" + "More prose. " * 20
    pieces = compose(STREAM, chars(text))
    assert "".join(pieces) == text
    assert len(pieces) > 3


def test_an_over_long_nested_fence_split_in_the_stream_still_ends_at_its_closer() -> None:
    """A fence of a nested list item (indented 6) longer than a message is closed and
    reopened at the margin; its closer, indented 6 as its code is, still ends it. Else the
    rest of the answer stayed an open fence: held until a message's worth had come, then
    sent as code, cut inside its words."""
    code = "".join(f"      print({i})  # line {i}\n" for i in range(12))
    prose = "After the code, some prose. More prose sentence here. " * 12
    text = "1. Step one\n   - nested item:\n\n      ```python\n" + code + "      ```\n\n" + prose
    policy = FlushPolicy(mode="stream", min_chars=40, max_wait_s=1000.0, max_chars=200)
    pieces = compose(policy, [TextDelta(text[i : i + 5]) for i in range(0, len(text), 5)])
    after = pieces[next(i for i, piece in enumerate(pieces) if "print(11)" in piece) + 1 :]
    assert len(after) > 3 and "```" not in "".join(after)
    assert all(piece.rstrip().endswith((".", "```")) for piece in after)


def test_dollars_in_inline_code_open_no_display_math() -> None:
    """`echo $$` (the shell's PID) is code, not the start of a `$$ … $$` block: taken for
    one still open, it held every piece after it until the end of the turn."""
    text = "In bash, `echo $$` prints the PID. Next steps follow.\n\n" + "More prose. " * 20
    pieces = compose(STREAM, chars(text))
    assert "".join(pieces) == text
    assert len(pieces) > 3


@pytest.mark.parametrize("min_chars", [0, 1, 10, 30])
def test_no_piece_ends_inside_a_table(min_chars: int) -> None:
    pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000), chars(TABLE))
    assert "".join(pieces) == TABLE
    table = [p for p in pieces if "|---|" in p]
    assert len(table) == 1 and "| c | 3 |" in table[0] and "| name |" in table[0]


PIPELESS_TABLE = "name | value\n--- | ---\na | 1. x\nb | 2. y\nc | 3. z\n"


@pytest.mark.parametrize("min_chars", [0, 1, 10, 30])
def test_no_piece_ends_inside_a_table_written_without_outer_pipes(min_chars: int) -> None:
    """GFM tables need no outer pipes (`a | b` over `--- | ---`): the next row is not known
    to be one before its `|` arrives. A cut before it broke the table in two, and the rows
    after it, read without their header, were then cut at any sentence end inside them."""
    head, rows = "Intro line here.\n" + PIPELESS_TABLE[:23], PIPELESS_TABLE[23:]
    pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000),
                     [TextDelta(head), *chars(rows + "\nAfter the table.")])
    assert "".join(pieces) == head + rows + "\nAfter the table."
    assert [p for p in pieces if PIPELESS_TABLE in p]


def _cuts(pieces: Sequence[str]) -> list[int]:
    """Where each piece but the last ends, in the joined text."""
    ends, position = [], 0
    for piece in pieces[:-1]:
        position += len(piece)
        ends.append(position)
    return ends


@pytest.mark.parametrize("table", [
    "name | value ok\n--- | :---:\na | 1. x\nb | 2. y\n",
    "name | value\n|:-- | --:|\na | 1. x\n",
], ids=["pipeless", "pipes-below-only"])  # fmt: skip
def test_a_pipeless_header_is_not_cut_from_its_delimiter_row_still_arriving(table: str) -> None:
    """`a | b` is a header only once its delimiter row shows: while that row arrives
    (`a | b` over `--`, or over nothing yet) the header stays with it, whatever the floor.
    (A cut at a sentence end in the row being written cannot wait: a first cell shows no
    `|` before it ends. Such a header is not used here.)"""
    intro, after = "Intro line here.\n", "\nAfter the table. More."
    text = intro + table + after
    for min_chars in range(len(intro) + len(table)):
        pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000), chars(text))
        assert "".join(pieces) == text
        inside = [cut for cut in _cuts(pieces) if len(intro) < cut < len(intro) + len(table)]
        assert inside == [], (min_chars, pieces)


@pytest.mark.parametrize("following", ["Then more words.", "- item one.", "--| so on."])
def test_a_line_with_a_pipe_goes_out_once_the_next_line_is_no_delimiter_row(following: str) -> None:
    """Prose with a `|` is held while the next line may still become a delimiter row, and
    goes out at the first character that shows it will not."""
    line = "cat x | grep y\n"
    composer = Composer(FlushPolicy(min_chars=1, max_wait_s=1000))
    sent = [(i, piece) for i, ch in enumerate(line + following)
            for piece in composer.feed(TextDelta(ch), 0.0)]  # fmt: skip
    shown = len(line) + next(i for i, ch in enumerate(following) if ch not in "-|: \t")
    assert sent[0] == (shown, line)


@pytest.mark.parametrize("min_chars", [0, 1, 10, 30])
def test_no_piece_ends_inside_a_list_item(min_chars: int) -> None:
    pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000), chars(LISTED))
    assert "".join(pieces) == LISTED
    for piece in pieces:
        # every piece ends with a whole item: never after "It has two sentences." alone
        assert not piece.endswith("sentences.\n")
        assert not piece.endswith("another. ")
    # every cut inside the list falls where an item (or what follows the list) begins
    list_start, list_end = LISTED.index("- first"), LISTED.index("\n\nAfter")
    cut = 0
    for piece in pieces[:-1]:
        cut += len(piece)
        if list_start < cut <= list_end:
            assert LISTED[cut:].lstrip(" ").startswith("- "), piece
        assert not piece.endswith("step: another. One more.\n")  # the nested item belongs


def test_no_piece_ends_inside_a_word() -> None:
    words = "internationalization extraordinarily " * 200
    for piece in compose(FlushPolicy(min_chars=1, max_wait_s=0), chars(words))[:-1]:
        assert piece.endswith(" ")


def test_never_cut_right_after_a_heading() -> None:
    text = "Intro sentence goes here.\n## Heading\n\nBody of the section. More text follows."
    pieces = compose(FlushPolicy(min_chars=1, max_wait_s=1000), chars(text))
    assert not any(piece.rstrip().endswith("## Heading") for piece in pieces)


def test_inline_code_and_display_math_are_not_cut() -> None:
    text = "Use `a. b` here please. Then $$x = 1. y = 2$$ done. And the end."
    pieces = compose(FlushPolicy(min_chars=1, max_wait_s=1000), chars(text))
    assert "".join(pieces) == text
    assert all(p.count("`") % 2 == 0 and p.count("$$") % 2 == 0 for p in pieces)


def test_a_fence_longer_than_a_message_is_closed_and_reopened() -> None:
    code = "```js\n" + "".join(f"line({i});\n" for i in range(200)) + "```\n"
    policy = FlushPolicy(min_chars=10, max_wait_s=1000, max_chars=500)
    pieces = compose(policy, chars(code))
    assert len(pieces) > 3
    assert all(len(piece) <= 500 for piece in pieces)
    assert all(fences_balanced(piece) for piece in pieces)
    assert all(piece.startswith("```js\n") for piece in pieces)
    body = "".join(p.removeprefix("```js\n").removesuffix("\n```").strip("\n") for p in pieces)
    assert body.replace("\n", "") == "".join(f"line({i});" for i in range(200)) + "```"


# Final mode


def test_final_mode_sends_one_message_at_the_end() -> None:
    text = " ".join(f"Sentence {i}." for i in range(200))
    composer = Composer(FINAL)
    assert all(composer.feed(event, 0.0) == [] for event in chars(text))
    assert composer.tick(10_000.0) == []
    assert composer.finish() == [text]


@pytest.mark.parametrize(("length", "messages"), [(5000, 1), (5001, 2)])
def test_final_mode_splits_only_above_5000_code_points(length: int, messages: int) -> None:
    text = ("这是一个句子。" * 1000)[:length]
    pieces = compose(FlushPolicy(mode="final"), [TextDelta(text)])
    assert len(pieces) == messages
    assert "".join(pieces) == text
    assert all(len(piece) <= 5000 for piece in pieces)


# Joined, the pieces are the answer

_ALPHABET = st.sampled_from(
    ["word", "字", " ", ". ", "。", "！", "\n", "\n\n", "```\n", "- ", "| a |", "1. ", ","]
)


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(_ALPHABET, min_size=1, max_size=120),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=40),
    min_chars=st.integers(0, 30),
)
def test_joined_pieces_are_the_answer(parts: list[str], sizes: list[int], min_chars: int) -> None:
    text = "".join(parts)
    if not text.strip():
        return
    deltas, i, k = [], 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)]
        deltas.append(TextDelta(text[i : i + size]))
        i, k = i + size, k + 1
    pieces = compose(FlushPolicy(min_chars=min_chars, max_wait_s=1000), deltas)
    assert "".join(pieces).strip() == text.strip()
    assert all(fences_balanced(piece) for piece in pieces[:-1])


# Rendering: reasoning


def test_reasoning_is_quoted_before_the_answer_with_quote() -> None:
    events = [ReasoningDelta("Let me think.\nYes."), TextDelta("The answer.")]
    assert "".join(compose(FINAL, events, show_reasoning=True)) == (
        "> Let me think.\n> Yes.\n\nThe answer."
    )


def test_reasoning_is_hidden_without_quote() -> None:
    events = [ReasoningDelta("Let me think."), TextDelta("The answer.")]
    assert compose(FINAL, events) == ["The answer."]


@pytest.mark.parametrize("policy", [STREAM, FINAL], ids=["stream", "final"])
@pytest.mark.parametrize("show", [False, True], ids=["off", "quote"])
def test_a_reasoning_only_turn_shows_its_reasoning_once_at_the_end(
    policy: FlushPolicy, show: bool
) -> None:
    events: list[Event] = [ReasoningDelta("Thinking about "), ReasoningDelta("it."), Usage(1)]
    pieces = compose(policy, events, show_reasoning=show)
    assert pieces == ["> Thinking about it."]


def test_quoted_reasoning_is_cut_only_between_its_lines() -> None:
    reasoning = "".join(f"Thought number {i}. It goes on. \n" for i in range(30))
    composer = Composer(FlushPolicy(min_chars=30, max_wait_s=1000), show_reasoning=True)
    out: list[str] = []
    out += composer.feed(ReasoningDelta(reasoning), 0.0)
    for event in chars("The answer is here. " * 5):
        out += composer.feed(event, 0.0)
    out += composer.finish()
    for piece in out:
        for line in piece.split("\n"):
            assert not line or line.startswith(">") or line.startswith("The answer")


# Rendering: agents, suggestions

AGENT_LINE = "→ 转由「{agent}」回答"


def agent_line(agent: str) -> str:
    return AGENT_LINE.format(agent=agent)


def test_the_first_agent_gets_no_line_and_each_switch_one() -> None:
    events: list[Event] = [
        AgentSwitch("router"),
        TextDelta("Routing you."),
        AgentSwitch("router"),  # the same agent again: nothing
        AgentSwitch("expert"),
        TextDelta("Expert answer."),
    ]
    joined = "".join(compose(FINAL, events, agent_line=agent_line))
    assert joined == "Routing you.\n\n→ 转由「expert」回答\n\nExpert answer."


def test_a_reasoning_only_part_shows_its_reasoning_where_the_part_ends() -> None:
    events: list[Event] = [
        AgentSwitch("router"),
        TextDelta("Handing over."),
        AgentSwitch("thinker"),
        ReasoningDelta("I need to handle this."),
        AgentSwitch("writer"),
        TextDelta("Done."),
    ]
    joined = "".join(compose(FINAL, events, agent_line=agent_line))
    assert joined == (
        "Handing over.\n\n→ 转由「thinker」回答\n\n> I need to handle this.\n\n"
        "→ 转由「writer」回答\n\nDone."
    )


def test_an_agent_line_after_a_sent_piece_starts_on_its_own_line() -> None:
    composer = Composer(FlushPolicy(min_chars=5, max_wait_s=1000), agent_line=agent_line)
    out = composer.feed(TextDelta("First agent says this. And"), 0.0)
    out += composer.feed(TextDelta(" more."), 0.0)
    out += composer.feed(AgentSwitch("b"), 0.0)
    out += composer.feed(AgentSwitch("c"), 0.0)
    out += composer.finish()
    assert out[0] == "First agent says this. "
    assert "".join(out) == (
        "First agent says this. And more.\n\n→ 转由「b」回答\n\n→ 转由「c」回答"
    )


def test_suggestions_come_as_a_short_list_after_the_answer() -> None:
    events: list[Event] = [
        TextDelta("The answer."),
        Suggestions(tuple(f"question {i}?" for i in range(8))),
    ]
    joined = "".join(compose(FINAL, events, suggestions_title="你还可以问："))
    listed = "\n".join(f"- question {i}?" for i in range(5))
    assert joined == f"The answer.\n\n你还可以问：\n{listed}"


# Rendering: replacements


def test_a_replacement_before_anything_was_sent_replaces_in_place() -> None:
    events: list[Event] = [TextDelta("Wrong answer."), TextReplace("Right answer.")]
    assert compose(FINAL, events) == ["Right answer."]
    assert compose(STREAM, events) == ["Right answer."]


def test_an_unchanged_replacement_sends_nothing_more() -> None:
    composer = Composer(FlushPolicy(min_chars=5, max_wait_s=1000))
    out = composer.feed(TextDelta("Sentence one. Next"), 0.0)
    assert out == ["Sentence one. "]
    assert composer.feed(TextReplace("Sentence one. Next"), 0.0) == []
    assert composer.finish() == ["Next"]


def test_a_different_replacement_after_a_piece_left_is_one_correction() -> None:
    composer = Composer(FlushPolicy(min_chars=5, max_wait_s=1000), correction_title="更正：")
    sent = composer.feed(TextDelta("Sentence one. Unsent rest"), 0.0)
    assert sent == ["Sentence one. "]
    correction = composer.feed(TextReplace("内容已更正。"), 0.0)
    assert correction == ["更正：\n内容已更正。"]
    assert isinstance(correction[0], Standalone)
    assert composer.feed(TextReplace("内容已更正。"), 0.0) == []  # the same one again
    assert composer.finish() == []
    assert composer.answer == "内容已更正。"


def test_a_replacement_after_an_over_long_piece_was_cut_hard_is_a_correction() -> None:
    """Text with no boundary longer than a message leaves cut at the limit: it was sent,
    so a replacement that contradicts it must come as a correction, not replace in place."""
    composer = Composer(FlushPolicy(min_chars=5, max_wait_s=1000, max_chars=30))
    assert composer.feed(TextDelta("x" * 40), 0.0) == ["x" * 30]
    assert composer.feed(TextReplace("Other."), 0.0) == ["Correction:\nOther."]


def test_a_replacement_that_comes_first_is_the_answer() -> None:
    assert compose(STREAM, [TextReplace("Full answer.")]) == ["Full answer."]


def test_reasoning_after_the_answer_stays_hidden_without_quote() -> None:
    assert compose(FINAL, [TextDelta("Answer."), ReasoningDelta("late thought")]) == ["Answer."]


def test_a_second_agent_before_any_text_gets_its_line() -> None:
    assert compose(FINAL, [AgentSwitch("A"), AgentSwitch("B"), TextDelta("hi")]) == ["→ B\n\nhi"]


def test_one_blank_line_before_suggestions_after_an_answer_ending_in_one() -> None:
    events = [*chars("Answer.\n\n"), Suggestions(("Q?",))]
    assert compose(FINAL, events) == ["Answer.\n\nYou could also ask:\n- Q?"]


def test_no_piece_ends_inside_a_list_item_after_other_lines_in_the_buffer() -> None:
    text = "Intro line here.\n- item one is long. Still item one.\n- two.\n\nEnd."
    pieces = compose(FlushPolicy(min_chars=25, max_wait_s=1000), chars(text))
    assert pieces[0] == "Intro line here.\n- item one is long. Still item one.\n"


def test_only_a_closer_of_the_same_kind_and_at_least_the_length_ends_a_fence() -> None:
    """CommonMark: a shorter run, the other marker, or a run with an info string is code."""
    fence = "````\na. b\n```\nc. d\n~~~~~\ne. f\n```` x\ng. h\n````\n"
    pieces = compose(FlushPolicy(min_chars=1, max_wait_s=1000),
                     chars("Intro.\n\n" + fence + "\nAfter. Done"))
    assert pieces[1] == fence + "\n"


def test_no_piece_ends_inside_a_quoted_line_or_inline_code() -> None:
    policy = FlushPolicy(min_chars=5, max_wait_s=1000)
    quoted = "> First sentence. Second sentence.\n> more\n\nAfter. Done"
    assert compose(policy, chars(quoted))[0] == "> First sentence. Second sentence.\n"
    code = "Use `a. b. c` here. More text. End"
    assert compose(policy, chars(code))[0] == "Use `a. b. c` here. "


def test_only_text_that_is_not_blank_counts_as_rendered() -> None:
    composer = Composer(STREAM)
    composer.feed(TextDelta(" \n\n "), 0.0)
    assert not composer.rendered
    composer.feed(TextDelta("Hi"), 0.0)
    assert composer.rendered


def test_a_replacement_that_extends_what_was_sent_is_just_more_text() -> None:
    composer = Composer(FlushPolicy(min_chars=5, max_wait_s=1000))
    out = composer.feed(TextDelta("Sentence one. Two"), 0.0)
    out += composer.feed(TextReplace("Sentence one. Two and three."), 0.0)
    out += composer.finish()
    assert out == ["Sentence one. ", "Two and three."]
    assert not any(isinstance(piece, Standalone) for piece in out)


def test_every_delta_sends_each_delta_and_corrects_after() -> None:
    composer = Composer(FlushPolicy(every_delta=True), correction_title="Correction:")
    assert composer.feed(TextDelta("Hel"), 0.0) == ["Hel"]
    assert composer.feed(TextDelta("lo"), 0.0) == ["lo"]
    assert composer.feed(TextReplace("Bye"), 0.0) == ["Correction:\nBye"]


def test_the_answer_for_history_is_the_answer_text_alone() -> None:
    composer = Composer(FINAL, show_reasoning=True, agent_line=agent_line)
    for event in [
        ReasoningDelta("hmm"),
        AgentSwitch("a"),
        TextDelta("One."),
        AgentSwitch("b"),
        TextDelta("Two."),
    ]:
        composer.feed(event, 0.0)
    composer.finish()
    assert composer.answer == "One.\n\nTwo."


def test_quote_block() -> None:
    assert quote_block("a\n\nb\n") == "> a\n>\n> b"


def _pieces_of(events: Sequence[Event], policy: FlushPolicy) -> list[str]:
    return compose(policy, events)


def test_a_streamed_piece_cut_in_mid_line_does_not_start_with_a_list_marker() -> None:
    """Where what follows a sentence's end has arrived, a "- " there is no place to cut.
    (Where it has not, the sentence goes at once: waiting for the next token to see whether
    it opens a block would hold every streamed sentence back a token.)"""
    deltas = ["Step one is done and the check passed ", "too. - and this", " dash is no item."]
    pieces = compose(STREAM, [TextDelta(delta) for delta in deltas])
    assert "".join(pieces) == "".join(deltas)
    assert not any(piece.startswith("- ") for piece in pieces), pieces


@pytest.mark.parametrize(
    "deltas",
    [
        ["Step one is done and the check passed ", "too. 1", ". and this is no item."],
        ["Step one is done and the check passed ", "too. `", "``python is no fence."],
    ],
)
def test_a_block_opener_begun_at_the_buffers_end_is_no_place_to_cut(deltas: list[str]) -> None:
    """"too. 1" may yet be "too. 1. ": the cut before the "1" waits for what comes next."""
    pieces = compose(STREAM, [TextDelta(delta) for delta in deltas])
    assert "".join(pieces) == "".join(deltas)
    assert not any(piece.startswith(("1.", "```")) for piece in pieces), pieces


def test_whitespace_only_pieces_are_not_sent() -> None:
    assert _pieces_of([TextDelta("   \n\n  ")], FINAL) == []


# The cut search: the same cut as a scan of the whole text with every span


def _reference_cut(text: str, limit: int, patterns: Sequence[re.Pattern[str]],
                   floor: int, lookahead: bool) -> int:
    """`_best_cut` as first written: every match from the start, the spans always, and no
    cut that leaves a block opener at the start of a message."""
    spans = compose_module._protected(text)
    floor = max(floor, len(text) - len(text.lstrip()) + 1)
    for pattern in patterns:
        best = 0
        for match in pattern.finditer(text, 0, limit):
            position = match.end()
            if position < floor or position > limit or any(
                span.start < position < span.end for span in spans
            ):
                continue
            if lookahead and not compose_module._known_end(text, position, match):
                continue
            if _reference_opener(text, position, lookahead):
                continue
            best = position
        if best:
            return best
    return 0


def _reference_opener(text: str, position: int, lookahead: bool) -> bool:
    """Whether a cut at `position`, inside a line, would leave a block opener at the start
    of a message (or, in a stream, what may yet become one), case by case."""
    if position >= len(text) or text[position - 1] == "\n":
        return False
    rest = text[position:]
    body = rest.lstrip(" ")
    if len(rest) - len(body) > 3:
        return False

    def ends_marker(at: int) -> bool:  # the marker is followed by a blank, or by nothing yet
        return at == len(body) or body[at] in " \t\n"

    digits = len(body) - len(body.lstrip("0123456789"))
    hashes = len(body) - len(body.lstrip("#"))
    if body[:1] in ("-", "*", "+") and ends_marker(1):
        return True
    if 1 <= hashes <= 6 and ends_marker(hashes):
        return True
    if 1 <= digits <= 9 and body[digits : digits + 1] in (".", ")") and ends_marker(digits + 1):
        return True
    if body[:1] in (">", "|") or body.startswith(("```", "~~~")):
        return True
    begun = body in ("", "`", "``", "~", "~~") or (digits == len(body) and digits <= 9)
    return lookahead and begun


_CUT_ALPHABET = st.sampled_from(
    ["a", "word", "字", " ", "\t", ".", "!", "?", "\"", "'", ")", "]", "”", "’", "。", "！",
     "…", "」", ";", ":", ",", "、", "\n", "\n\n", "```\n", "`", "$$", "- ", "| a |", "# ",
     "> ", "1. ", "1", "-", "~~", "#", "  "]
)


@settings(max_examples=400, deadline=None)
@example(parts=["word", ".", " ", "1"], floor=1, limit=300, lookahead=True, split=False)
@example(parts=["word", ".", " ", "-", "\n", "a"], floor=1, limit=300, lookahead=False, split=True)
@given(parts=st.lists(_CUT_ALPHABET, min_size=1, max_size=80), floor=st.integers(1, 200),
       limit=st.integers(1, 300), lookahead=st.booleans(), split=st.booleans())
def test_cut_search_finds_the_reference_cut(parts: list[str], floor: int, limit: int,
                                            lookahead: bool, split: bool) -> None:
    text = "".join(parts)
    patterns = compose_module._SPLIT_BOUNDARIES if split else compose_module._STREAM_BOUNDARIES
    limit = min(limit, len(text))
    spans = compose_module._protected(text)
    expected = _reference_cut(text, limit, patterns, floor, lookahead)
    assert compose_module._best_cut(text, limit, patterns, spans, floor=floor,
                                    lookahead=lookahead) == expected
    ignoring_spans = compose_module._best_cut(text, limit, patterns, (), floor=floor,
                                              lookahead=lookahead)
    assert ignoring_spans or not expected  # no cut ignoring the spans: none with them


# A long code block or table is not searched again for every token

_BLOCKS = st.sampled_from(
    ["x = 1", " ", "\n", "\n\n", ". ", "```", "```py\n", "\n```\n", "~~~\n", "````", "`", "~",
     "| a |", "|---|", "|", "\n|", "| b. c |\n", "```|", "- ", "# h\n", "> ", "$$", "word", "。"]
)


@settings(max_examples=600, deadline=None)
@given(
    parts=st.lists(_BLOCKS, min_size=1, max_size=150),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=20),
    min_chars=st.integers(0, 40),
    max_chars=st.integers(30, 200),
)
# an opening line that a later backtick turns into inline code: no fence after all
@example(parts=["```", ". ", "`", "\n```\n"], sizes=[1], min_chars=0, max_chars=30)
# a fence's opening line with a `|` is no header over the line after its fence (read across
# the fence, it was one while that line could still become a delimiter row: the look stood)
@example(parts=["```|", "\n```\n", "| a |"], sizes=[1], min_chars=0, max_chars=30)
def test_the_shortcuts_cut_where_a_full_search_cuts(
    parts: list[str], sizes: list[int], min_chars: int, max_chars: int
) -> None:
    text = "".join(parts)
    policy = FlushPolicy(min_chars=min_chars, max_wait_s=3.0, max_chars=max_chars)
    fast, full = Composer(policy), Composer(policy)
    i = k = 0
    while i < len(text):  # a second per delta: the max-wait flush lowers the floor at times
        delta = TextDelta(text[i : i + sizes[k % len(sizes)]])
        full._stuck = full._scanned = None  # the reference searches in full every time
        assert fast.feed(delta, float(k)) == full.feed(delta, float(k))
        i, k = i + len(delta.text), k + 1
    assert fast.finish() == full.finish()


_CODE_LINES = "".join(f"x{i} = f(x{i - 1})  # step {i}.\n" for i in range(1, 150))
_TABLE_ROWS = "".join(f"| {i} | {i * i} | fine. |\n" for i in range(150))


def _measured_calls(
    monkeypatch: pytest.MonkeyPatch, name: str, measure: Callable[..., int]
) -> list[int]:
    """Calls of `compose.<name>` go on as before, each measured into the returned list."""
    real = getattr(compose_module, name)
    measured: list[int] = []

    def measuring(*args: Any, **kwargs: Any) -> Any:
        measured.append(measure(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(compose_module, name, measuring)
    return measured


@pytest.mark.parametrize("text", [
    f"Here is the code:\n\n```python\n{_CODE_LINES}```\n\nThat is all.",
    f"Results:\n\n| n | square | note |\n|---|---|---|\n{_TABLE_ROWS}\nThat is all.",
], ids=["code", "table"])  # fmt: skip
def test_a_long_block_is_not_searched_again_for_every_token(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    searches = _measured_calls(monkeypatch, "_protected", lambda pending: 1)
    assert "".join(compose(STREAM, chars(text))) == text
    assert len(searches) < 20  # a full search per line of the block would be ~150


@pytest.mark.parametrize("text", [
    "see https://example.com/" + "a1b2c3/" * 1200 + " for the rest. Done.",
    "这是一段没有任何标点符号的很长的中文文本" * 400 + "。结束。",
], ids=["url", "cjk"])  # fmt: skip
def test_text_without_a_boundary_is_not_scanned_again_for_every_token(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    def scanned(pending: str, limit: int, *args: Any, floor: int = 1, **kwargs: Any) -> int:
        return max(limit - floor, 0)

    scans = _measured_calls(monkeypatch, "_best_cut", scanned)
    pieces = compose(STREAM, chars(text))
    assert "".join(pieces) == text
    assert all(len(piece) <= 5000 for piece in pieces)
    # a split at 5,000 characters scans its message a few times; a scan from the floor for
    # every token would be ~len(text)² / 8 (millions here)
    assert sum(scans) < 10 * len(text)


def test_text_before_an_open_fence_still_goes_out_when_it_has_waited() -> None:
    policy = FlushPolicy(min_chars=40, max_wait_s=5.0)
    composer = Composer(policy)
    head = "Intro.\n\n"
    code = "```py\n" + "".join(f"x{i} = {i}\n" for i in range(12))
    assert [p for ch in chars(head + code) for p in composer.feed(ch, 0.0)] == []
    assert composer.feed(TextDelta("y = 0\n"), 6.0) == [head]  # waited: the floor drops to 1


@pytest.mark.parametrize("opening", ["```", "```" + "j" * 6000])
@pytest.mark.parametrize(
    "code", ["x" * 12000, "a = 1\n" + "y" * 12000, "\n".join(["z" * 100] * 150)]
)
def test_code_lines_longer_than_a_message_are_split_and_splitting_ends(
    opening: str, code: str
) -> None:
    pieces = split_text(f"Look:\n\n{opening}\n{code}\n```\n\nDone.", 5000)
    assert all(len(piece) <= 5000 for piece in pieces)
    assert all(fences_balanced(piece) for piece in pieces)
    joined = "".join(pieces)
    assert all(joined.count(ch) == code.count(ch) for ch in "xyz")  # no code lost or doubled
    assert joined.endswith("Done.")


def test_a_blank_head_of_a_split_is_not_sent() -> None:
    """A stream split whose head is only blank space (a blank line before a fence whose
    marker is too long to close and reopen) sent a blank message."""
    text = "`" * 19 + "\n\n" + "`" * 40
    pieces = compose(FlushPolicy(min_chars=0, max_chars=20, max_wait_s=1000.0), chars(text))
    assert all(piece.strip() for piece in pieces)
    assert "".join(pieces) == text


def test_a_fence_arriving_after_a_table_longer_than_a_message_is_not_cut_in_its_opening_line(
) -> None:
    """The table left no cut, and the fence's opening line was still arriving at the limit:
    it was cut there, closed (an empty block, its language `p`) and reopened whole, its code
    beginning with the rest of that line (`y`)."""
    table = "| a | b |\n" * 499
    code = "````py\n" + "print(1)\n" * 3 + "````\n\nDone."
    assert compose(FlushPolicy(), chars(table + code)) == [table, code]


# Any answer, any policy: every turn ends, and its pieces fit and join to the answer

_FRAGMENTS = st.sampled_from(
    ["```", "````", "~~~", "```py", "`" * 12, "  ", "    ", "\t", "`x`", "`", "| a | b |",
     "a | b", "|---|---|", "--|--", "|", "- ", "1. ", "  - ", "$$", "# ", "\n", "\n\n", "\r\n",
     "字", "😀", "word", "x" * 90, ". ", "。", "> ", ", ", " ", "<think>", "</think>"]
)


class _Reopened:
    """Records what `_split_fence` added around its cuts (a closer at the head's end, an
    opening line at the rest's start), to take it away again from the pieces."""

    def __init__(self) -> None:
        self.heads: dict[int, tuple[str, int]] = {}  # id(head) → (the text cut, opener size)
        self._split_fence = compose_module._split_fence

    def __call__(self, text: str, fence: Any, max_chars: int) -> tuple[str, str]:
        head, rest = self._split_fence(text, fence, max_chars)
        if head + rest != text:
            added = rest.index("\n") + 1
            self.heads[id(head)] = (text[: len(text) - len(rest) + added], added)
        return head, rest

    def removed(self, pieces: list[str]) -> list[str]:
        out, stripped = [], 0  # stripped: the opening line added to this piece
        for piece in pieces:
            cut, added = self.heads.get(id(piece), (piece, 0))
            out.append(cut[stripped:])
            stripped = added
        return out


@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """A turn that never ends fails the test instead of hanging the suite."""

    def hang(*_: object) -> None:
        raise AssertionError(f"no end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(_FRAGMENTS, min_size=1, max_size=80),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    waits=st.lists(st.sampled_from([0.0, 0.5, 7.0]), min_size=1, max_size=4),
    min_chars=st.integers(0, 500),
    max_chars=st.one_of(st.integers(20, 200), st.just(5000)),
    mode=st.sampled_from(["stream", "final"]),
)
# a blank line before a fence too long to close and reopen: a blank message
@example(parts=["`" * 12, "````", "```", "\n\n", *["`" * 12] * 3, "````"], sizes=[1],
         waits=[0.0], min_chars=0, max_chars=20, mode="stream")
def test_every_turn_ends_and_its_pieces_fit_and_join_to_the_answer(
    parts: list[str], sizes: list[int], waits: list[float], min_chars: int, max_chars: int,
    mode: str,
) -> None:
    text = "".join(parts)
    # (a blank run as long as a message may not reach one: no message is blank)
    assume(text.strip() and not re.search(rf"[ \t\r\n]{{{max_chars // 2},}}", text))
    composer = Composer(FlushPolicy(mode, min_chars, max_wait_s=6.0, max_chars=max_chars))
    reopened, pieces, now, i, k = _Reopened(), [], 0.0, 0, 0
    with pytest.MonkeyPatch.context() as patch, _within(5.0):
        patch.setattr(compose_module, "_split_fence", reopened)
        while i < len(text):
            delta = text[i : i + sizes[k % len(sizes)]]
            now += waits[k % len(waits)]
            pieces += composer.feed(TextDelta(delta), now) + composer.tick(now + 0.25)
            i, k = i + len(delta), k + 1
        pieces += composer.finish()
    assert all(piece.strip() and len(piece) <= max_chars for piece in pieces)
    assert "".join(reopened.removed(pieces)).strip() == text.strip()


_STREAM_ALPHABET = st.sampled_from(
    ["a", "word", "字", " ", ".", "!", "?", "\"", ")", "。", "\n", "\n\n", "```\n", "`", "``",
     "- ", "-", "*", "+", "#", "1", "1.", "12", ".5", "x", "~", "~~", "> ", "| a |", "  ", "$$"]
)


def _pieces_fed(deltas: list[str], times: list[float], policy: FlushPolicy,
                *, cached: bool) -> list[list[str]]:
    composer = Composer(policy)
    out = []
    for delta, now in zip(deltas, times, strict=True):
        if not cached:
            composer._scanned = composer._stuck = None
        out.append(composer.feed(TextDelta(delta), now))
    return [*out, composer.finish()]


@settings(max_examples=300, deadline=None)
@example(deltas=["The first step is complete now.", " *", "Note*: the rest waits"],
         gaps=[0.0, 0.0, 0.0], min_chars=20)  # a cut lost behind a "*" that was no opener
@given(deltas=st.lists(_STREAM_ALPHABET, min_size=1, max_size=60),
       gaps=st.lists(st.sampled_from([0.0, 0.0, 1.0, 7.0]), min_size=60, max_size=60),
       min_chars=st.integers(1, 40))
def test_the_scan_caches_change_no_piece(deltas: list[str], gaps: list[float],
                                         min_chars: int) -> None:
    """The composer's caches (`_Scanned`, `_Stuck`) save looks, never a cut: the same stream
    gives the same pieces, at the same deltas, with the caches cleared before every delta."""
    times = [sum(gaps[: i + 1]) for i in range(len(deltas))]
    policy = FlushPolicy(min_chars=min_chars, max_wait_s=6.0)
    assert _pieces_fed(deltas, times, policy, cached=True) == _pieces_fed(
        deltas, times, policy, cached=False
    )
