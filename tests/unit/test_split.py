"""split_text: messages of at most N code points, cut at the best boundary (SPEC §4)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge import compose as compose_module
from bridge.compose import _split_once, split_text

LIMIT = 5000


def test_text_within_the_limit_is_one_message() -> None:
    text = "字" * LIMIT
    assert split_text(text, LIMIT) == [text]


def test_the_limit_counts_code_points_not_bytes_or_utf16_units() -> None:
    text = "😀" * LIMIT  # 4 UTF-8 bytes, 2 UTF-16 units each
    assert split_text(text, LIMIT) == [text]
    assert len(split_text(text + "😀", LIMIT)) == 2


def test_split_at_a_paragraph_before_a_sentence() -> None:
    first = "Sentence. " * 300 + "\n\n"
    second = "Another sentence. " * 200
    assert split_text(first + second, LIMIT) == [first, second]


def test_split_at_a_sentence_when_there_is_no_paragraph() -> None:
    text = "This is one sentence. " * 400
    pieces = split_text(text, LIMIT)
    assert "".join(pieces) == text
    assert all(len(piece) <= LIMIT for piece in pieces)
    assert pieces[0].endswith("sentence. ")


def test_cjk_sentences_split_after_their_end_mark() -> None:
    text = "这是第一句话，内容很长。" * 600
    pieces = split_text(text, LIMIT)
    assert "".join(pieces) == text
    assert pieces[0].endswith("。")


def test_never_inside_a_word() -> None:
    text = "extraordinary " * 500
    pieces = split_text(text, 1000)
    assert "".join(pieces) == text
    assert all(piece.endswith(" ") for piece in pieces[:-1])


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    text = "x" * 120
    assert split_text(text, 50) == ["x" * 50, "x" * 50, "x" * 20]


def test_a_fence_that_fits_is_never_split() -> None:
    code = "```python\n" + "print('hello. world')\n\n" * 100 + "```\n"
    text = "Intro. " * 500 + "\n\n" + code + "\nOutro."
    pieces = split_text(text, LIMIT)
    assert "".join(pieces) == text
    assert any(piece.startswith("```python") and "```\n" in piece[9:] for piece in pieces)
    assert all(len(re.findall(r"^```", piece, re.MULTILINE)) % 2 == 0 for piece in pieces)


def test_a_fence_nested_in_a_list_item_that_fits_is_never_split() -> None:
    """A fence inside a nested list item is indented four spaces or more (CommonMark counts
    the indentation from the item's content): it is a code fence all the same, and one that
    fits in a message is never cut, not at a blank line of its code either."""
    code = "\n".join(f"    x{i} = compute({i})" for i in range(30))
    fence = "    ```python\n" + code + "\n\n" + code + "\n    ```\n"
    text = ("Intro sentence here. " * 200 + "\n\n- Install the tool first:\n"
            "  - On Linux, run:\n" + fence + "\nDone. That is all.\n")
    pieces = split_text(text, LIMIT)
    assert "".join(pieces) == text
    assert any(fence in piece for piece in pieces), [piece[-200:] for piece in pieces]


def test_an_over_long_nested_fence_is_closed_where_it_was_opened() -> None:
    """Closed at the opener's indentation (a closer at the margin would end the list item
    and open a fence of its own); reopened at the margin, where the next message begins."""
    code = "".join(f"    SELECT {i};\n" for i in range(600))
    text = "- Query:\n  - run:\n    ```sql\n" + code + "    ```\n"
    pieces = split_text(text, LIMIT)
    assert len(pieces) >= 2 and all(len(piece) <= LIMIT for piece in pieces)
    assert pieces[0].endswith("\n    ```")
    assert all(piece.startswith("```sql\n") for piece in pieces[1:])
    assert all(piece.rstrip("\n").endswith("```") for piece in pieces)
    assert "".join(pieces).count("SELECT") == 600


def test_prose_after_an_over_long_nested_fence_is_no_code() -> None:
    """The fence, reopened at the margin, keeps its code and its closer as deep as its list
    item has them: that closer still ends it. Taken for code, the prose after it was closed
    and reopened as code, message after message, and cut inside its words."""
    code = "".join(f"      print({i})  # line {i}\n" for i in range(12))
    prose = "After the code, some prose. More prose sentence here. " * 12
    text = "1. Step one\n   - nested item:\n\n      ```python\n" + code + "      ```\n\n" + prose
    pieces = split_text(text, 200)
    assert all(len(piece) <= 200 for piece in pieces)
    after = pieces[next(i for i, piece in enumerate(pieces) if "print(11)" in piece) + 1 :]
    assert after and "```" not in "".join(after)
    assert all(piece.rstrip().endswith((".", "```")) for piece in after)


def test_a_line_opening_with_inline_code_in_triple_backticks_is_no_fence() -> None:
    """CommonMark: a backtick fence's info string holds no backtick, so a line that opens
    with ```npm install``` is inline code. Taken for a fence left open, it had the prose
    after it closed and reopened as code, and that line said twice."""
    text = ("```npm install``` is the command. Next steps follow.\n\n"
            + ("Some prose sentence here. " * 60 + "\n\n") * 5)
    pieces = split_text(text, LIMIT)
    assert "".join(pieces) == text
    assert all(len(piece) <= LIMIT for piece in pieces)


def test_an_over_long_fence_is_closed_and_reopened() -> None:
    code = "~~~sql\n" + "".join(f"SELECT {i};\n" for i in range(1000)) + "~~~\n"
    pieces = split_text(code, LIMIT)
    assert len(pieces) >= 3
    assert all(len(piece) <= LIMIT for piece in pieces)
    assert all(piece.startswith("~~~sql\n") for piece in pieces)
    assert all(piece.rstrip("\n").endswith("~~~") for piece in pieces)
    statements = "".join(pieces).count("SELECT")
    assert statements == 1000


def test_a_table_longer_than_a_message_is_cut_between_rows() -> None:
    table = "| a | b |\n|---|---|\n" + "".join(f"| {i} | row. {i} |\n" for i in range(500))
    pieces = split_text(table, 1000)
    assert "".join(pieces) == table
    assert all(piece.endswith("|\n") for piece in pieces[:-1])


def test_no_piece_is_blank() -> None:
    text = "a" * 30 + "\n" + "b" * 29
    assert split_text(text, 30) == ["a" * 30, "\n" + "b" * 29]
    # blank space at the end: with the piece before it while it fits, else left out
    assert split_text("a" * 11 + "\n\n", 12) == ["a" * 11 + "\n"]
    assert split_text("a" * 9 + "\n" + "b" * 11 + "\n", 12) == ["a" * 9 + "\n", "b" * 11 + "\n"]
    # a text that begins blank is not cut right after its blank head
    assert split_text("  " + "y" * 30, 20) == ["  " + "y" * 18, "y" * 12]
    assert split_text("\n\n" + "y" * 30, 20) == ["\n\n" + "y" * 18, "y" * 12]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab字 .。\n`|-#>$")),
        min_size=0,
        max_size=600,
    ),
    limit=st.integers(20, 200),
)
def test_pieces_fit_and_join_to_the_text_without_fences(text: str, limit: int) -> None:
    text = text.replace("`", "'")  # no fences: the joined pieces are exactly the text
    pieces = split_text(text, limit)
    joined = "".join(pieces)  # but for blank space at its end that no piece had room for
    assert joined == text or (joined == text[: len(joined)] and not text[len(joined) :].strip())
    assert all(0 < len(piece) <= limit for piece in pieces)
    assert len(pieces) == 1 or all(piece.strip() for piece in pieces)


@pytest.mark.parametrize("limit", [50, 200, 5000])
def test_pieces_never_exceed_the_limit_with_fences(limit: int) -> None:
    text = ("Words and more words. " * 30 + "\n```\n" + "code line\n" * 80 + "```\n") * 5
    assert all(len(piece) <= limit for piece in split_text(text, limit))


def test_text_without_a_boundary_is_cut_before_a_word_not_inside_it() -> None:
    assert split_text("x" * 30 + "-" + "y" * 30, 40) == ["x" * 30 + "-", "y" * 30]


def test_a_paragraph_end_in_the_first_half_gives_way_to_a_later_boundary() -> None:
    """Pieces of at least half the limit are preferred to an early paragraph end."""
    pieces = split_text("Short.\n\n" + "word " * 20, 40)
    assert pieces[0] == "Short.\n\n" + "word " * 6
    assert "".join(pieces) == "Short.\n\n" + "word " * 20


def test_an_over_long_fence_keeps_every_code_line_once() -> None:
    code = "".join(f"line {i}\n" for i in range(10))
    pieces = split_text("```py\n" + code + "```", 40)
    assert all(piece.startswith("```py\n") and piece.endswith("\n```") for piece in pieces)
    assert "".join(piece[len("```py\n") : -len("```")] for piece in pieces) == code


def test_a_fence_whose_opening_line_is_longer_than_a_message_ends_the_split() -> None:
    """Cut inside an opening line that did not fit (here 3,000 backticks, after a table row)
    and reopened, the rest came out longer than the text: splitting never ended, and the
    event loop hung with it."""
    text = "| a | b |\n" + "`" * 3000 + "x\n" + "code\n" * 400
    head, rest = _split_once(text, LIMIT)
    assert (head, len(rest)) == ("| a | b |\n", len(text) - len(head))  # cut before the fence
    assert "".join(split_text(text, LIMIT)) == text
    assert "".join(split_text("`" * 6000, LIMIT)) == "`" * 6000  # the fence first: plain cuts


_FRAGMENTS = ["| a | b |\n", "|-|-|\n", "`" * 3, "`" * 12, "~" * 4, "- item", "> ", "x", "y. ",
              " ", "\n", "code\n"]


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=60).map("".join),
    limit=st.integers(6, 80),
)
@example(text="```\n" + "x" * 100, limit=8)  # the fence's marker lines as long as a message
@example(text="`" * 12 + "| a | b |\n" * 3, limit=6)  # its closer alone longer than a message
def test_every_split_leaves_less_to_split(text: str, limit: int) -> None:
    """Termination: each cut's head fits, and what is left is shorter than what was cut
    (fences closed and reopened included); else `split_text` loops for ever."""
    if len(text) <= limit:
        return
    head, rest = _split_once(text, limit)
    assert 0 < len(head) <= limit
    assert len(rest) < len(text)


def test_blank_space_before_an_over_long_fence_is_no_message_of_its_own() -> None:
    """A fence whose marker is too long to close and reopen was cut before when only blank
    space preceded it: that blank line came out as a message of its own (sent blank in stream
    mode, dropped from the joined text in final mode)."""
    text = "`" * 19 + "\n\n" + "`" * 40
    pieces = split_text(text, 20)
    assert all(piece.strip() for piece in pieces)
    assert "".join(pieces) == text


def test_a_fence_that_fits_is_cut_before_when_what_precedes_it_cannot_be_cut() -> None:
    """An unclosed `$$` before the fence left no cut outside a span: the fence, which fits in
    one message, was closed and reopened (an empty block, a blank line added to its code)."""
    math = "$$\n" + "x = y + z\n" * 10
    text = math + "```\nprint(1)\n```\nDone."
    assert split_text(text, 110) == [math, "```\nprint(1)\n```\nDone."]


def _answer(units: int) -> str:
    unit = ("Intro. " * 20 + "\n\n| a | b |\n|---|---|\n" + "| 1 | 2 |\n" * 30
            + "\n- one\n- two\n\n```py\n" + "x = 1\n" * 40 + "```\n\n$$x^2$$\n\n" + "句子。" * 30)
    return "\n\n".join([unit] * units)


def test_finding_the_spans_of_a_long_answer_costs_its_length_not_its_square() -> None:
    """Final mode splits the whole answer, and each split looks at every line and `$$`
    against every fence: 2.5 s of the event loop for a 200,000-character answer with code."""

    def cost(text: str) -> float:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            compose_module._protected(text)
            timings.append(time.perf_counter() - started)
        return min(timings)

    # 8× as long: linear, 8× the cost (12× measured); quadratic, 64× (41× measured)
    assert cost(_answer(400)) < 24 * cost(_answer(50))


def test_an_over_long_fence_is_not_cut_inside_its_opening_line() -> None:
    """After a table that left no cut, the limit fell inside the fence's opening line: it was
    closed there (an empty block, its language `p`) and reopened whole, its code beginning
    with the rest of that line (`y`)."""
    table = "| a | b |\n" * 499
    fence = "````py\n" + "print(1)\n" * 700 + "````"
    pieces = split_text(table + fence, LIMIT)
    assert pieces[0] == table
    assert pieces[1].startswith("````py\nprint(1)\n")


@pytest.mark.parametrize(
    "rest", ["- then that", "# not a heading", "> not a quote", "| not a row |", "1) not an item"]
)
def test_a_cut_in_mid_line_leaves_no_block_opener_at_the_start_of_a_message(rest: str) -> None:
    """Cut after "Do this. ", the next message began "- then that", shown as a list item
    (a heading, a quote, a table): a cut inside a line is made elsewhere."""
    text = "x" * 60 + " Do this. " + rest + " and some more words after it."
    pieces = split_text(text, 80)
    assert "".join(pieces) == text
    assert not any(piece.startswith(rest[:2]) for piece in pieces[1:]), pieces


def test_a_line_may_still_start_a_message_with_its_own_list_item() -> None:
    text = "x" * 60 + " Intro.\n- the first item of the list, a long one\n- the second"
    assert split_text(text, 80)[1].startswith("- the first")
