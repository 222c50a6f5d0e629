"""bridge/sse.py: the WHATWG examples, every line end and split, limits, and a property test.

Expected events come from the standard's own examples or from `reference_events` below: a
plain, line-by-line reading of WHATWG HTML §9.2.6 on decoded text that shares no code or
approach with the decoder, so its byte-level fast path is checked against the standard, not
against itself.
"""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sse import DEFAULT_MAX_LINE_BYTES, SSEDecoder, SSEEvent, SSELineTooLong
from tests.fakes.base import FIXTURES, chunked

FIXTURE_FILES = sorted(FIXTURES.glob("*.sse"))


# -- the reference reading ----------------------------------------------------------------


def reference_events(stream: bytes) -> list[SSEEvent]:
    """WHATWG HTML §9.2.6, line by line; plus our leniency: a last event is dispatched at EOF."""
    text = stream.decode("utf-8", "replace")  # the UTF-8 decode algorithm…
    if text.startswith("\ufeff"):  # …strips one leading BOM
        text = text[1:]
    lines = re.split("\r\n|\r|\n", text)
    if lines[-1] == "":  # the stream ended with a line end: no unterminated last line
        lines.pop()
    events: list[SSEEvent] = []
    data_buffer, event_type, last_event_id, retry = "", "", "", None

    def dispatch() -> None:
        nonlocal data_buffer, event_type
        if data_buffer:
            events.append(SSEEvent(data_buffer.removesuffix("\n"), event_type or "message",
                                   last_event_id, retry))
        data_buffer, event_type = "", ""

    for line in lines:
        if line == "":
            dispatch()
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data_buffer += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_event_id = value
        elif field == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    dispatch()  # end of stream: our documented leniency
    return events


def decode(chunks: Iterable[bytes], **kwargs: int) -> list[SSEEvent]:
    decoder = SSEDecoder(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def fed(*chunks: bytes) -> tuple[list[SSEEvent], list[SSEEvent]]:
    """What `feed` returned over all chunks, and what `close` returned after them."""
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events, decoder.close()


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


# -- the WHATWG examples ------------------------------------------------------------------


def test_whatwg_three_messages() -> None:
    stream = (b"data: This is the first message.\n\n"
              b"data: This is the second message, it\n"
              b"data: has two lines.\n\n"
              b"data: This is the third message.\n\n")
    assert fed(stream) == ([
        SSEEvent("This is the first message."),
        SSEEvent("This is the second message, it\nhas two lines."),
        SSEEvent("This is the third message."),
    ], [])


def test_whatwg_event_types() -> None:
    stream = (b"event: add\ndata: 73857293\n\n"
              b"event: remove\ndata: 2153\n\n"
              b"event: add\ndata: 113411\n\n")
    assert fed(stream)[0] == [SSEEvent("73857293", "add"), SSEEvent("2153", "remove"),
                              SSEEvent("113411", "add")]


def test_whatwg_stock_ticker_multiline_data() -> None:
    assert fed(b"data: YHOO\ndata: +2\ndata: 10\n\n") == ([SSEEvent("YHOO\n+2\n10")], [])


def test_whatwg_comment_and_last_event_id() -> None:
    stream = (b": test stream\n\n"
              b"data: first event\nid: 1\n\n"
              b"data:second event\nid\n\n"
              b"data:  third event\n")
    events, at_close = fed(stream)
    # the comment block fires nothing; `id` with no value resets the last event ID
    assert events == [SSEEvent("first event", id="1"), SSEEvent("second event", id="")]
    # WHATWG drops the last block (no blank line); we dispatch it at close, one space kept
    assert at_close == [SSEEvent(" third event")]


def test_whatwg_empty_data_fields() -> None:
    events, at_close = fed(b"data\n\ndata\ndata\n\ndata:")
    assert events == [SSEEvent(""), SSEEvent("\n")]
    assert at_close == [SSEEvent("")]  # the standard would discard it: our leniency


def test_whatwg_space_after_colon() -> None:
    assert fed(b"data:test\n\ndata: test\n\n") == ([SSEEvent("test"), SSEEvent("test")], [])


# -- line ends ------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_line_ends(eol: bytes) -> None:
    stream = eol.join([b"event: add", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    expected = [SSEEvent("a\nb", "add"), SSEEvent("c")]
    assert fed(stream) == (expected, [])
    assert decode(bytewise(stream)) == expected


def test_mixed_line_ends() -> None:
    assert fed(b"data: a\rdata: b\r\ndata: c\n\r\n") == ([SSEEvent("a\nb\nc")], [])


def test_crlf_split_across_two_feeds() -> None:
    # the LF after a CR that ended the last read belongs to that CR: it is no blank line
    assert fed(b"data: a\r", b"\ndata: b\r\n\r\n") == ([SSEEvent("a\nb")], [])
    assert fed(b"data: a\r", b"\n", b"\r", b"\n") == ([SSEEvent("a")], [])


def test_lf_after_a_cr_and_more_text_is_a_line_end() -> None:
    # found by the property test: the read ended with "\r:" — its LF was not the CR's
    assert fed(b"data: a\r:", b"\ndata:\ndata: b\n\n") == ([SSEEvent("a\n\nb")], [])


def test_cr_ends_a_line_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == [SSEEvent("a")]  # no waiting for a possible LF
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [SSEEvent("b")]


def test_lf_alone_after_cr_dispatches_nothing_extra() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [SSEEvent("a")]
    assert decoder.feed(b"\n") == []  # a blank line, but the data buffer is empty
    assert decoder.feed(b"data: b\n\n") == [SSEEvent("b")]


# -- fields ---------------------------------------------------------------------------------


def test_data_loses_exactly_one_optional_space() -> None:
    events, _ = fed(b"data:x\n\ndata: x\n\ndata:  x\n\ndata:\tx\n\ndata: \n\n")
    assert [e.data for e in events] == ["x", "x", " x", "\tx", ""]


def test_multiline_data_joined_with_lf() -> None:
    events, _ = fed(b"data: a\ndata:\ndata:  b\ndata\ndata: c\n\n")
    assert events == [SSEEvent("a\n\n b\n\nc")]
    events, _ = fed(b"data:a\ndata: b\ndata:  c\n\ndata:{\ndata:}\n\n"
                    b"event: e\ndata:  x\ndata:y\n\n")
    assert events == [SSEEvent("a\nb\n c"), SSEEvent("{\n}"), SSEEvent(" x\ny", "e")]


def test_event_type_resets_after_each_dispatch() -> None:
    events, _ = fed(b"event: x\ndata: 1\n\ndata: 2\n\n"
                    b"event:\ndata: 3\n\nevent: a\nevent: b\ndata: 4\n\n")
    assert [e.event for e in events] == ["x", "message", "message", "b"]


def test_many_event_types_keep_memory_bounded() -> None:
    decoder = SSEDecoder()
    stream = b"".join(b"event: type-%d\ndata: %d\n\n" % (i, i) for i in range(1000))
    events = decoder.feed(stream)
    assert [e.event for e in events] == [f"type-{i}" for i in range(1000)]
    assert len(decoder._event_names) <= 32  # the fast path's cache of event names is capped


def test_event_type_without_data_is_forgotten() -> None:
    assert fed(b"event: x\n\ndata: 1\n\n")[0] == [SSEEvent("1")]


def test_id_persists_across_events() -> None:
    events, _ = fed(b"id: 7\ndata: a\n\ndata: b\n\nid: 8\ndata: c\n\n")
    assert [e.id for e in events] == ["7", "7", "8"]


def test_id_with_nul_is_ignored() -> None:
    events, _ = fed(b"id: 1\n\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [e.id for e in events] == ["1", "1"]


def test_id_without_data_dispatches_nothing_but_is_kept() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 5\n\n") == []  # empty data buffer: nothing, even after `id:`
    assert decoder.feed(b"id: 6\n\n\n") == []
    assert decoder.close() == []
    assert fed(b"id: 5\n\ndata: x\n\n")[0] == [SSEEvent("x", id="5")]


@pytest.mark.parametrize(("value", "expected"), [
    (b"3000", 3000), (b"0", 0), (b"007", 7),
    (b"", None), (b" 10", None), (b"10 ", None), (b"-1", None), (b"1.5", None), (b"1e3", None),
    ("١٢٣".encode(), None),  # Arabic-Indic digits: digits, but not ASCII digits
    ("１２".encode(), None),  # fullwidth digits
])
def test_retry_accepts_ascii_digits_only(value: bytes, expected: int | None) -> None:
    events, _ = fed(b"retry: " + value + b"\ndata: x\n\n")
    assert events == [SSEEvent("x", retry=expected)]


def test_retry_persists_and_a_bad_one_keeps_the_last_good() -> None:
    events, _ = fed(b"retry: 100\ndata: a\n\nretry: soon\ndata: b\n\nretry\ndata: c\n\n")
    assert [e.retry for e in events] == [100, 100, 100]


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": keep-alive\n\n:\ndata: a\n: between\nfoo: bar\nDATA: b\ndata : c\n\n"
    assert fed(stream) == ([SSEEvent("a")], [])


def test_field_without_colon_has_an_empty_value() -> None:
    assert fed(b"data\nevent\n\n")[0] == [SSEEvent("")]


# -- BOM and UTF-8 --------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def test_leading_bom_is_stripped() -> None:
    assert fed(BOM + b"data: x\n\n") == ([SSEEvent("x")], [])
    assert fed(BOM[:1], BOM[1:2], BOM[2:] + b"data: x\n", b"\n") == ([SSEEvent("x")], [])
    assert fed(BOM + b"\n" + b"data: x\n\n") == ([SSEEvent("x")], [])


def test_bom_is_stripped_once_only() -> None:
    # a second BOM is part of the field name "\ufeffdata", which is ignored
    assert fed(BOM + BOM + b"data: x\n\n") == ([], [])
    assert fed(b"data: a\n\n" + BOM + b"data: b\n\n") == ([SSEEvent("a")], [])


def test_bom_is_stripped_once_only_also_when_a_later_read_begins_with_one() -> None:
    # U+FEFF inside data (a zero-width no-break space), at the start of a read
    assert fed(b"data: a\n\n", BOM + b"data: b\n\n") == ([SSEEvent("a")], [])
    assert fed(b"data: a", BOM + b"b\n\n") == ([SSEEvent("a\ufeffb")], [])


def test_bom_at_end_of_stream() -> None:
    assert fed(BOM) == ([], [])
    assert fed(BOM + b"data: x") == ([], [SSEEvent("x")])


def test_utf8_character_split_across_feeds() -> None:
    stream = "data: 你好, 🌍\n\n".encode()
    for cut in range(len(stream) + 1):
        assert decode([stream[:cut], stream[cut:]]) == [SSEEvent("你好, 🌍")], cut
    assert decode(bytewise(stream)) == [SSEEvent("你好, 🌍")]


def test_invalid_utf8_is_replaced_as_a_whole_stream_decode_would() -> None:
    stream = b"data: a\xff\xe4\xb8\nevent: \xc3\nid: \xe4\x00\ndata: \xf0\x9f\x8c\n\n"
    assert decode([stream]) == reference_events(stream)
    assert decode(bytewise(stream)) == reference_events(stream)
    assert decode([stream])[0].data == "a\ufffd\ufffd\n\ufffd"


# -- line length limit ----------------------------------------------------------------------


def test_line_at_the_limit_is_accepted() -> None:
    line = b"data: " + b"x" * 58  # 64 bytes
    assert decode([line + b"\r\n\r\n"], max_line_bytes=64) == [SSEEvent("x" * 58)]
    assert decode(bytewise(line + b"\n\n"), max_line_bytes=64) == [SSEEvent("x" * 58)]
    assert decode([line], max_line_bytes=64) == [SSEEvent("x" * 58)]


def test_complete_line_too_long() -> None:
    long_line = b"data: " + b"x" * 59  # 65 bytes
    with pytest.raises(SSELineTooLong):
        SSEDecoder(max_line_bytes=64).feed(long_line + b"\n\n")
    with pytest.raises(SSELineTooLong):  # among short lines, in one read bigger than the limit
        SSEDecoder(max_line_bytes=64).feed(b"data: a\n\n" * 10 + long_line + b"\n\ndata: b\n\n")


def test_partial_line_too_long() -> None:
    decoder = SSEDecoder(max_line_bytes=64)
    assert decoder.feed(b"data: a\n\ndata: " + b"x" * 50) == [SSEEvent("a")]
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"x" * 10)  # 66 bytes and no line end yet: refused before the end


def test_endless_line_is_refused_without_memory_growth() -> None:
    chunk = b"x" * (64 << 10)
    decoder = SSEDecoder()
    tracemalloc.start()
    fed_bytes = 0
    try:
        with pytest.raises(SSELineTooLong):
            for _ in range(1600):  # 100 MiB, if it were all taken in
                decoder.feed(chunk)
                fed_bytes += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed_bytes <= DEFAULT_MAX_LINE_BYTES
    assert peak < 4 * DEFAULT_MAX_LINE_BYTES


# -- end of stream --------------------------------------------------------------------------


def test_end_of_stream_without_blank_line_dispatches_at_close() -> None:
    assert fed(b"data: [DONE]") == ([], [SSEEvent("[DONE]")])
    assert fed(b"data: [DONE]\n") == ([], [SSEEvent("[DONE]")])
    assert fed(b"data: [DONE]\r") == ([], [SSEEvent("[DONE]")])
    assert fed(b"data: a\n\ndata: [DONE]\n\n") == ([SSEEvent("a"), SSEEvent("[DONE]")], [])
    assert fed(b"event: x\nid: 3\nretry: 5") == ([], [])
    assert fed() == ([], [])


def test_empty_chunks_change_nothing() -> None:
    assert fed(b"", b"data: a\r", b"", b"\n", b"", b"\n", b"") == ([SSEEvent("a")], [])


# -- recorded fixtures: every split -------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_every_split_offset(path: Path) -> None:
    stream = path.read_bytes()
    whole = decode([stream])
    assert whole == reference_events(stream)
    assert len(whole) > 10
    for cut in range(1, len(stream)):
        assert decode([stream[:cut], stream[cut:]]) == whole, f"split at {cut}"


@pytest.mark.parametrize("eol", [b"\r", b"\r\n"], ids=["CR", "CRLF"])
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_with_other_line_ends(path: Path, eol: bytes) -> None:
    lf = path.read_bytes()
    stream = lf.replace(b"\n", eol)
    assert decode([stream]) == decode([lf])
    assert decode(stream[i : i + 7] for i in range(0, len(stream), 7)) == decode([lf])


def test_fixtures_exist() -> None:
    assert {p.name for p in FIXTURE_FILES} >= {"aimaster-scenario.sse", "hiagent-chat_query.sse"}


# -- property: any re-chunking yields the same events ----------------------------------------

_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                max_size=12)
_value = st.one_of(_text, st.sampled_from(["", " ", "  x", "data: x", ":", "\0", "[DONE]"]))
_line = st.one_of(
    st.builds(lambda v: f"data:{v}", _value),
    st.builds(lambda v: f"data: {v}", _value),
    st.just("data"),
    st.builds(lambda v: f"event:{v}", _value),
    st.builds(lambda v: f"event: {v}", st.sampled_from(["add", "message", "", "text"])),
    st.builds(lambda v: f"id: {v}", _value),
    st.just("id"),
    st.builds(lambda v: f"retry: {v}", st.one_of(st.integers(0, 10**6).map(str), _value)),
    st.builds(lambda v: f":{v}", _value),
    st.builds(lambda n, v: f"{n}:{v}", st.sampled_from(["foo", "Data", "data ", "\ufeffdata"]),
              _value),
    st.just(""),
    st.just(""),
)


@st.composite
def _event_block(draw: st.DrawFn) -> list[str]:
    """The shapes the decoder's fast path takes: data lines, perhaps after one event line."""
    head = draw(st.lists(st.builds(lambda sp, v: f"event:{sp}{v}", st.sampled_from(["", " "]),
                                   _value), max_size=1))
    data = draw(st.lists(st.builds(lambda sp, v: f"data{sp}{v}",
                                   st.sampled_from([":", ": ", ":  ", ""]), _value),
                         min_size=1, max_size=4))
    return [*head, *data, *[""] * draw(st.integers(1, 2))]


_lines = st.one_of(
    st.lists(_line, max_size=30),
    st.lists(_event_block(), max_size=6).map(lambda blocks: [ln for b in blocks for ln in b]),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(_lines)
    ends = draw(st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=len(lines),
                         max_size=len(lines)))
    text = "".join(line + end for line, end in zip(lines, ends, strict=True))
    if draw(st.booleans()):  # no line end after the last line
        text = text.rstrip("\r\n")
    raw = text.encode()
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    if draw(st.integers(0, 9)) == 0:  # now and then, bytes that are not UTF-8
        raw += draw(st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
    return raw


@settings(max_examples=250, deadline=None)
@given(stream=sse_streams(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_property_any_rechunking_gives_the_reference_events(stream: bytes,
                                                            cuts: list[int]) -> None:
    expected = reference_events(stream)
    assert decode([stream]) == expected
    assert decode(chunked(stream, cuts)) == expected


@settings(max_examples=60, deadline=None)
@given(stream=sse_streams())
def test_property_byte_by_byte_gives_the_reference_events(stream: bytes) -> None:
    assert decode(bytewise(stream)) == reference_events(stream)


# -- the whole-read fast paths ------------------------------------------------------------
# A read made only of single-line `data: ` blocks, or of blocks of data lines (each perhaps
# after the same event line), is taken apart at once; anything else in the read sends it, or
# the stretches of it that do not fit, the slow way. These check both sides of that line.


def test_token_run_with_the_next_block_still_waiting() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n\ndata: c\n") == [SSEEvent("a"), SSEEvent("b")]
    assert decoder.feed(b"\ndata: d\n\n") == [SSEEvent("c"), SSEEvent("d")]
    assert decoder.feed(b"data: e\n") == []
    assert decoder.close() == [SSEEvent("e")]


@pytest.mark.parametrize("tail", [
    b"data: z\n\n\n", b"data: z\n\n\n\n", b"data: z\ndata: y\n", b"data: z\ndata: y\n\n",
    b"data: z\n\ndata: y\ndata: x\n", b"data: z\n\n: c\n", b"data: z\n\nid: 1\n\n", b"data: \n",
    b"data: \n\n", b"data: \n\n\n",
])
def test_token_run_ending_in_other_line_ends(tail: bytes) -> None:
    # the run's proof rests on where its last line ends are: each read ends just after `tail`
    stream = b"data: a\n\ndata: b\n\n" + tail
    after = b"data: c\n\n"
    assert decode([stream, after]) == reference_events(stream + after)
    assert decode([stream]) == reference_events(stream)


def test_token_run_keeps_values_exact() -> None:
    stream = b"data: \n\ndata:  two spaces\n\ndata: data: x\n\ndata: event: y\n\ndata: :\n\n"
    assert fed(stream) == ([SSEEvent(""), SSEEvent(" two spaces"), SSEEvent("data: x"),
                            SSEEvent("event: y"), SSEEvent(":")], [])


@pytest.mark.parametrize("odd_one", [
    b": keep-alive\n\n", b"data:no space\n\n", b"id: 9\ndata: x\n\n", b"retry: 10\n\n",
    b"data: x\ndata: y\n\n", b"event: e\ndata: x\n\n", b"\n\n", b"data: x\n\n\n",
    b"foo: bar\n\n", b"data\n\n",
])
def test_runs_with_an_odd_block_in_the_middle(odd_one: bytes) -> None:
    for block in (b"data: a\n\n", b"event:text\ndata:data: {}\ndata:\n\n", b"data:a\ndata:b\n\n"):
        stream = block * 5 + odd_one + block * 5
        assert fed(stream)[0] == reference_events(stream), (block, odd_one)
        assert decode([stream[:40], stream[40:]]) == reference_events(stream)


def test_event_run_exact_on_values_that_look_like_lines() -> None:
    # after an empty data line, a data line whose value is the event line: not a block start
    stream = (b"event:text\ndata:a\ndata:\ndata:event:text\ndata:b\n\n"
              b"event:text\ndata: data:\ndata:  x\n\n"
              b"event:text\ndata:\n\n")
    assert fed(stream) == ([SSEEvent("a\n\nevent:text\nb", "text"),
                            SSEEvent("data:\n x", "text"), SSEEvent("", "text")], [])


def test_event_run_with_an_event_line_and_no_data() -> None:
    # the block with no data line dispatches nothing, and its type does not carry over
    stream = b"event:text\ndata:a\n\nevent:text\n\nevent:text\ndata:b\n\ndata:c\n\n"
    assert fed(stream)[0] == [SSEEvent("a", "text"), SSEEvent("b", "text"), SSEEvent("c")]


def test_runs_of_changing_event_types() -> None:
    stream = b"".join(b"event:%s\ndata:%d\n\n" % (b"ab"[i // 3 % 2 : i // 3 % 2 + 1], i)
                      for i in range(12))
    expected = [SSEEvent(str(i), "ab"[i // 3 % 2]) for i in range(12)]
    assert fed(stream) == (expected, [])
    assert decode(stream[i : i + 50] for i in range(0, len(stream), 50)) == expected


def test_unfinished_block_interpreted_when_its_blank_line_comes() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\nid: 7\ndata: b\nretry: 5\n") == [SSEEvent("a")]
    assert decoder.feed(b"data: c\n") == []
    assert decoder.feed(b"\n") == [SSEEvent("b\nc", id="7", retry=5)]
    # an event type waiting with its block
    assert decoder.feed(b"event:text\n") == []
    assert decoder.feed(b"data:x\n\n") == [SSEEvent("x", "text", "7", 5)]


@pytest.mark.parametrize("line", [b"data: " + b"x" * 100 + b"\n", b"data:\n", b"data: \r\n"])
def test_endless_event_of_short_lines_is_refused_without_memory_growth(line: bytes) -> None:
    """Short data lines that no blank line ever ends (a proxy that drops blank lines, a
    server gone wrong): no line is over the limit, but the event's data is held whole until
    it ends. Past the limit it is refused too, not taken in until memory runs out."""
    limit = 1 << 14
    chunk = line * ((128 << 10) // len(line))
    decoder = SSEDecoder(max_line_bytes=limit)
    fed_bytes = 0
    with pytest.raises(SSELineTooLong, match="event data longer than"):
        for _ in range(100):  # 12.5 MiB, if it were all taken in
            fed_bytes += len(chunk)
            decoder.feed(chunk)
    assert fed_bytes <= 2 * len(chunk) + 8 * limit  # (a line of "data:" adds one byte)


def test_long_unfinished_block_is_interpreted_as_it_comes() -> None:
    # more than the kept-raw bound: its lines are interpreted read by read, not copied again
    # (and its data, just under the limit, is taken)
    line = b"data: " + b"x" * 100 + b"\n"
    decoder = SSEDecoder()
    events = []
    for _ in range(2000):  # 214 KB in one block
        events += decoder.feed(line * 5)
    assert events == []
    assert decoder.feed(b"\n") == [SSEEvent("\n".join(["x" * 100] * 10000))]


def test_a_long_unfinished_block_goes_on_in_a_read_that_begins_with_data() -> None:
    # its event type and data lines, interpreted already, are not dropped by the token path
    decoder = SSEDecoder()
    assert decoder.feed(b"event: big\n" + b"data: " + b"x" * 100 + b"\n" * 1) == []
    for _ in range(700):  # more than the kept-raw bound, in one block
        assert decoder.feed(b"data: " + b"x" * 100 + b"\n") == []
    [event] = decoder.feed(b"data: end\n\n")
    assert event.event == "big"
    assert event.data == "\n".join(["x" * 100] * 701 + ["end"])


def test_the_lines_kept_for_their_block_are_no_part_of_the_unfinished_line() -> None:
    decoder = SSEDecoder(max_line_bytes=12)
    assert decoder.feed(b"data: 123456\n") == []
    assert decoder.feed(b"data") == []  # 18 bytes held, but no line of them is too long
    assert decoder.feed(b": 7\n\n") == [SSEEvent("123456\n7")]


def test_invalid_utf8_in_fast_paths() -> None:
    for stream in (b"data: a\xff\n\ndata: \xe4\xb8\n\ndata: ok\n\n",
                   b"event:t\xc3\ndata:\xf0\x9f\ndata:\xe4\n\nevent:t\xc3\ndata:\xff\n\n",
                   b"data:a\xff\ndata:\xe4\xb8\n\ndata:\xc3\n\n"):
        expected = reference_events(stream)
        assert decode([stream]) == expected
        for cut in range(len(stream) + 1):
            assert decode([stream[:cut], stream[cut:]]) == expected, (stream, cut)


def test_bom_before_a_run() -> None:
    assert fed(BOM + b"data: a\n\ndata: b\n\n") == ([SSEEvent("a"), SSEEvent("b")], [])
    assert fed(BOM + b"event:t\ndata:a\n\nevent:t\ndata:b\n\n")[0] == [SSEEvent("a", "t"),
                                                                        SSEEvent("b", "t")]


def test_line_limit_holds_in_runs() -> None:
    ok = b"data: " + b"x" * 58 + b"\n\n"  # lines of 64 bytes
    assert decode([ok * 20], max_line_bytes=64) == [SSEEvent("x" * 58)] * 20
    with pytest.raises(SSELineTooLong):
        SSEDecoder(max_line_bytes=64).feed(ok * 20 + b"data: " + b"x" * 59 + b"\n\n" + ok)


_run_value = st.one_of(
    st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=6),
    st.sampled_from(["", " ", " x", "data:", "data: x", "event:text", ":", "[DONE]"]),
)
_run_block = st.one_of(
    st.builds(lambda v: [f"data: {v}"], _run_value),  # the token streams' shape
    st.builds(lambda vs, sp: ["event:text", *(f"data:{sp}{v}" for v in vs)],  # one event type
              st.lists(_run_value, min_size=1, max_size=3), st.sampled_from(["", " "])),
    st.builds(lambda vs: [f"data:{v}" for v in vs], st.lists(_run_value, min_size=1, max_size=3)),
)
_odd_block = st.one_of(
    st.builds(lambda line: [line], st.sampled_from([": ping", "id: 3", "id", "retry: 7", "event:x",
                                                    "event:text", "data", "data:x"])),
    st.just([]),  # an extra blank line
    st.builds(lambda v: ["event:other", f"data:{v}"], _run_value),
    st.builds(lambda v: [f"data: {v}", "id: 5"], _run_value),
)


@st.composite
def run_streams(draw: st.DrawFn) -> bytes:
    """Long runs of the fast paths' shapes, now and then an odd block, any line ends."""
    blocks = draw(st.lists(st.one_of(_run_block, _run_block, _run_block, _odd_block),
                           min_size=1, max_size=25))
    lines = [line for block in blocks for line in [*block, ""]]
    ends = draw(st.lists(st.sampled_from(["\n", "\n", "\n", "\r", "\r\n"]),
                         min_size=len(lines), max_size=len(lines)))
    raw = "".join(line + end for line, end in zip(lines, ends, strict=True)).encode()
    if draw(st.integers(0, 5)) == 0:
        raw = raw.replace(b"x", b"\xff", 1)  # now and then, a byte that is not UTF-8
    return raw[: draw(st.integers(len(raw) // 2, len(raw)))]  # perhaps cut short


@settings(max_examples=300, deadline=None)
@given(stream=run_streams(), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_property_runs_give_the_reference_events(stream: bytes, cuts: list[int]) -> None:
    expected = reference_events(stream)
    assert decode([stream]) == expected
    assert decode(chunked(stream, cuts)) == expected


def test_one_recording_handing_over_to_another() -> None:
    # reads that end one shape and begin another are cut where the second begins
    stream = b"".join(path.read_bytes() for path in FIXTURE_FILES) * 2
    expected = reference_events(stream)
    for size in (700, 1500, 4096):
        assert decode(stream[i : i + size] for i in range(0, len(stream), size)) == expected


# -- third pass: whole reads with their unfinished tail, hand-overs, data-only runs ---------


@pytest.mark.parametrize("after", [
    b"event:text\ndata:c\ndata:\n\nevent:text\ndata:d\n\n", b": ping\n\ndata: c\n\n",
    b"id: 4\ndata: c\n\n", b"\n\ndata: c\n\n", b"data: c\ndata: d\n\n", b"data:c\n\n",
    b"retry: 9\n\nevent:x\ndata: c\n", b"event:text\ndata:c",
])
def test_token_read_hands_over_to_another_shape(after: bytes) -> None:
    # token blocks, then another shape in the same read: the token read takes the blocks
    # before it, the other paths the rest; every cut into two reads gives the same events
    stream = b"data: a\n\ndata: b\n\n" + after
    expected = reference_events(stream)
    assert decode([stream]) == expected
    for cut in range(len(stream) + 1):
        assert decode([stream[:cut], stream[cut:]]) == expected, (after, cut)


def test_token_read_keeps_its_unfinished_tail() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n\nda") == [SSEEvent("a"), SSEEvent("b")]
    assert decoder.feed(b"ta: c\n") == []  # its line is complete, its blank line is not
    assert decoder.feed(b"\ndata: d") == [SSEEvent("c")]
    assert decoder.feed(b"\n\n") == [SSEEvent("d")]
    assert decoder.close() == []


def test_data_only_runs_take_the_fast_path() -> None:
    # blocks of data lines with no event line are cut apart at their marked blank lines; a
    # run of a single block (small reads) is taken too
    run = b"data:a\ndata:\n\ndata: b\ndata:c\n\ndata:\n\ndata:data:\ndata:  e\n\n"
    events: list[SSEEvent] = []
    assert SSEDecoder()._data_run(run, events)
    assert events == reference_events(run) == [SSEEvent("a\n"), SSEEvent("b\nc"), SSEEvent(""),
                                                 SSEEvent("data:\n e")]
    for block in (b"data:a\ndata:b\n\n", b"event:text\ndata:a\ndata:\n\n"):  # runs of one block
        events = []
        assert SSEDecoder()._data_run(block, events)
        assert events == reference_events(block)
    for stream in (run * 20, run.replace(b"\n", b"\r\n") * 20, (run + b": c\n\n") * 20):
        expected = reference_events(stream)
        assert decode([stream]) == expected
        assert decode(stream[i : i + 97] for i in range(0, len(stream), 97)) == expected


@settings(max_examples=200, deadline=None)
@given(stream=run_streams(), cuts=st.lists(st.integers(min_value=0), min_size=5, max_size=40))
def test_property_runs_in_many_reads_give_the_reference_events(stream: bytes,
                                                               cuts: list[int]) -> None:
    # many reads: what each read leaves pending (lines of an unfinished block, an unfinished
    # line) is read again with the next, through whichever path that read takes
    assert decode(chunked(stream, cuts)) == reference_events(stream)
