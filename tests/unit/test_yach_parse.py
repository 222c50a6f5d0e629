"""The Yach adapter's pure parts: body decoding, field aliases, mentions, images, rendering."""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.im.yach import decode_body, extract_images, parse_payload, render, strip_mention
from adapters.yach_api import robot_sign, verify_sign
from bridge.interfaces import Piece, ReplyTarget, Sender

BASE: dict[str, Any] = {
    "msgId": "m1",
    "msgtype": "text",
    "text": {"content": "@bot hello"},
    "senderId": "u1",
    "senderNick": "Tester",
    "senderStaffId": "W001",
    "conversationId": "g1",
    "conversationType": "2",
}


def test_json_body() -> None:
    assert decode_body(json.dumps(BASE).encode()) == BASE


def test_a_byte_order_mark_before_the_body_is_ignored_and_only_there() -> None:
    bom = "\ufeff".encode()
    assert decode_body(bom + json.dumps(BASE).encode()) == BASE
    assert decode_body(bom + b"msgId=m1&senderId=u1") == {"msgId": "m1", "senderId": "u1"}
    with pytest.raises(ValueError):  # a second one is no whitespace: the body is no JSON
        decode_body(bom + bom + json.dumps(BASE).encode())


def test_form_body() -> None:
    body = urlencode({"msgId": "m1", "content": "hi", "senderId": "u1"}).encode()
    assert decode_body(body) == {"msgId": "m1", "content": "hi", "senderId": "u1"}


def test_form_whose_single_field_holds_the_json() -> None:
    body = urlencode({"data": json.dumps(BASE, ensure_ascii=False)}).encode()
    assert decode_body(body) == BASE


def test_a_single_form_field_or_a_nested_brace_that_is_no_json_stays_text() -> None:
    assert decode_body(urlencode({"content": "{not json"}).encode()) == {"content": "{not json"}
    body = json.dumps({**BASE, "text": "{not json"}).encode()
    assert parse_payload(decode_body(body)).text == "{not json"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"msgId": "m1", "text": {"content": "a lone \\udc00 surrogate"}}',  # Redis: no UTF-8
        urlencode({"data": '{"content": "\\uD800"}'}).encode(),
        b"msgId=m1&senderId=u1&stray",  # a part that is no field: no form
    ],
)
def test_undecodable_bodies(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_body(body)


def test_a_surrogate_pair_is_one_character() -> None:
    body = b'{"text": {"content": "\\ud83d\\ude00"}}'
    assert decode_body(body) == {"text": {"content": "\U0001f600"}}


@pytest.mark.parametrize(
    "number",
    ["123456789012345678901234567890", "18446744073709551616", "-9223372036854775809"],
)
def test_a_numeric_message_id_beyond_64_bits_is_read_exactly(number: str) -> None:
    body = f'{{"msgId": {number}, "senderId": "u1", "conversationId": "g1"}}'.encode()
    assert parse_payload(decode_body(body)).im_msg_id == number


def test_what_only_the_standard_library_reads_is_read_as_before() -> None:
    body = b'{"msgId": "m1", "score": NaN, "text": {"content": "hi", "w": 1e999}}'
    assert repr(decode_body(body)) == repr(json.loads(body))


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    _containers,
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(payload=st.dictionaries(_TEXT, _JSON, max_size=5), ascii_only=st.booleans())
def test_json_bodies_are_read_as_the_standard_library_reads_them(
    payload: dict[str, Any], ascii_only: bool
) -> None:
    body = json.dumps(payload, ensure_ascii=ascii_only).encode()
    assert repr(decode_body(body)) == repr(json.loads(body))  # repr: 2**70 is not 2.0**70


def test_a_creation_time_beyond_milliseconds_is_no_time() -> None:
    assert parse_payload({**BASE, "createAt": "1" * 19}).created_at_ms is None
    assert parse_payload({**BASE, "createAt": "１７６４４０００００"}).created_at_ms is None
    message = parse_payload({**BASE, "createAt": "9" * 30})
    assert message.created_at_ms is None
    assert message.to_json()  # storable


@pytest.mark.parametrize(
    ("created", "ms"),
    [("1764400000123", 1764400000123), (1764400000123, 1764400000123),
     ("1764400000", 1764400000000), (1764400000, 1764400000000),
     ("99999999999", 99999999999000), ("100000000000", 100000000000), ("9" * 18, int("9" * 18))],
    ids=["ms-text", "ms-number", "seconds-text", "seconds-number", "seconds-last",
         "ms-first", "ms-longest"],
)
def test_the_creation_time_in_milliseconds_or_seconds(created: object, ms: int) -> None:
    assert parse_payload({**BASE, "createAt": created}).created_at_ms == ms


def test_a_group_message() -> None:
    message = parse_payload(BASE)
    assert message.im_msg_id == "m1"
    assert message.text == "hello"
    assert message.sender == Sender("u1", "Tester", "W001")
    assert (message.conversation_id, message.is_direct) == ("g1", False)
    assert message.dedupe_key == "id:m1"


@pytest.mark.parametrize(
    "aliases",
    [
        {"msg_id": "m1", "content": "@bot hello", "sender_id": "u1", "groupId": "g1"},
        {"message_id": "m1", "text": "@bot hello", "fromUserId": "u1", "group_id": "g1"},
    ],
)
def test_field_aliases(aliases: dict[str, str]) -> None:
    message = parse_payload(aliases)
    assert (message.im_msg_id, message.text, message.sender.id, message.conversation_id) == (
        "m1",
        "hello",
        "u1",
        "g1",
    )


def test_nested_field_names_written_flat_in_a_form() -> None:
    """SPEC names `text.content` and `image.url`: a form (which cannot nest) writes them as
    flat field names, and they are read where the nested field would be."""
    body = urlencode({"msgId": "m1", "msgtype": "image_text", "text.content": "@bot 看图",
                      "image.url": "https://img.example/a.png", "senderId": "u1",
                      "conversationId": "g1"}).encode()
    message = parse_payload(decode_body(body))
    assert (message.text, message.image_urls) == ("看图", ("https://img.example/a.png",))


def test_a_markdown_message_is_read_from_its_markdown_text() -> None:
    payload = {k: v for k, v in BASE.items() if k != "text"}
    payload |= {"msgtype": "markdown", "markdown": {"title": "t", "text": "@bot **粗体** 问题"}}
    message = parse_payload(payload)
    assert (message.msg_type, message.text) == ("markdown", "**粗体** 问题")
    # SPEC's own names come first
    assert parse_payload({**payload, "text": {"content": "@bot own"}}).text == "own"


def test_the_nested_field_wins_over_the_later_aliases() -> None:
    payload = {**BASE, "content": "@bot second", "text": {"content": "@bot first"}}
    assert parse_payload(payload).text == "first"


def test_a_direct_message_is_answered_to_its_sender() -> None:
    payload = {**BASE, "conversationType": 1}
    del payload["conversationId"]
    message = parse_payload(payload)
    assert message.is_direct
    assert message.conversation_id == "u1"
    assert message.target.is_direct


def test_a_direct_message_in_snake_case() -> None:
    message = parse_payload({"msg_id": "m1", "content": "hi", "sender_id": "u1",
                             "conversation_type": 1})
    assert (message.is_direct, message.conversation_id) == (True, "u1")


@pytest.mark.parametrize("missing", ["senderId", "conversationId"])
def test_a_message_without_sender_or_group_is_refused(missing: str) -> None:
    payload = dict(BASE)
    del payload[missing]
    with pytest.raises(ValueError):
        parse_payload(payload)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("@bot hello", "hello"),
        ("@机器人\u2005你好", "你好"),
        ("  @bot   /stop ", "/stop"),
        ("no mention", "no mention"),
    ],
)
def test_the_leading_mention_is_stripped(raw: str, text: str) -> None:
    assert strip_mention(raw) == text


@pytest.mark.parametrize(
    "image",
    [
        {"image": {"url": "https://img.example/a.png"}},
        {"picUrl": "https://img.example/a.png"},
        {"image_url": "https://img.example/a.png"},
    ],
)
def test_an_image_message(image: dict[str, Any]) -> None:
    payload = {**BASE, "msgtype": "image", "text": {"content": "@bot"}, **image}
    message = parse_payload(payload)
    assert message.msg_type == "image"
    assert message.image_urls == ("https://img.example/a.png",)
    assert message.text == ""


def test_image_text_markers() -> None:
    raw = "这道题怎么做 image::https://a.example/1.png:: 和 image::https://a.example/2.jpg::"
    text, images = extract_images(raw)
    assert text == "这道题怎么做  和"
    assert images == ("https://a.example/1.png", "https://a.example/2.jpg")


def test_an_image_text_message_with_both_an_image_field_and_markers() -> None:
    payload = {
        **BASE,
        "msgtype": "image_text",
        "text": {"content": "@bot 看看 image::https://a.example/2.png::"},
        "picUrl": "https://a.example/1.png",
    }
    message = parse_payload(payload)
    assert message.text == "看看"
    assert message.image_urls == ("https://a.example/1.png", "https://a.example/2.png")


def test_dedupe_without_a_message_id_uses_the_creation_time() -> None:
    payload = {k: v for k, v in BASE.items() if k != "msgId"}
    assert parse_payload(payload).dedupe_key is None
    stamped = parse_payload({**payload, "createAt": "1700000000000"})
    again = parse_payload({**payload, "createAt": "1700000000000"})
    assert stamped.dedupe_key is not None and stamped.dedupe_key == again.dedupe_key
    # Each of sender, conversation, creation time and text tells two messages apart (SPEC §4).
    for other in ({"senderId": "u2"}, {"conversationId": "g2"}, {"createAt": "1700000000001"},
                  {"text": {"content": "@bot another question"}}):  # fmt: skip
        assert parse_payload({**payload, "createAt": "1700000000000", **other}).dedupe_key not in (
            None, stamped.dedupe_key
        ), other


TARGET = ReplyTarget("g1", False, Sender("u1", "Tester", "W001"))


def test_markdown_rendering_with_the_mention() -> None:
    rendered = render(Piece("# Title\nBody", "id", mention=True), TARGET, "markdown")
    assert rendered == {
        "msgtype": "markdown",
        "markdown": {"title": "# Title Body", "text": "# Title\nBody"},
        "at": {"atWorkCodes": ["W001"]},
    }


def test_text_rendering_without_the_mention() -> None:
    rendered = render(Piece("plain", "id"), TARGET, "text")
    assert rendered == {"msgtype": "text", "text": {"content": "plain"}}


def test_no_mention_without_a_work_code() -> None:
    target = ReplyTarget("g1", False, Sender("u1"))
    assert "at" not in render(Piece("x", "id", mention=True), target, "markdown")


@pytest.mark.parametrize(
    "encode",
    [
        lambda sign: sign,
        lambda sign: quote(sign, safe=""),
        quote,  # `/` left as it is (the default `safe`)
        lambda sign: re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), quote(sign, safe="")),
    ],
    ids=["plain", "encoded", "encoded-keeping-slash", "lower-case-escapes"],
)
def test_inbound_sign_in_any_url_encoded_form_verifies(encode: Callable[[str], str]) -> None:
    signs = {ts: robot_sign("SEC-x", ts) for ts in (str(1_700_000_000_000 + i) for i in range(64))}
    assert any("/" in s for s in signs.values()) and any("+" in s for s in signs.values())
    for timestamp, sign in signs.items():
        assert verify_sign("SEC-x", timestamp, encode(sign))
        assert not verify_sign("SEC-y", timestamp, encode(sign))


def test_the_sign_is_the_hmac_of_the_timestamp_and_the_secret() -> None:
    """SPEC §4: base64(HMAC_SHA256(key=secret, msg=f"{timestamp}\\n{secret}")). A vector
    worked out apart from `robot_sign`, which the harness and the fake Yach sign with too:
    their agreement alone would not notice a wrong formula."""
    secret, timestamp = "SEC-test-secret", "1700000000000"
    expected = "Mrhy389nC5p7fqYHgciQpNWFiBNjbTx4Rn5BqEH45jY="
    assert robot_sign(secret, timestamp) == expected
    assert verify_sign(secret, timestamp, expected)
    assert not verify_sign(secret, "1700000000001", expected)


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 200])
def test_the_sign_is_the_standard_hmac_for_a_secret_of_any_length(length: int) -> None:
    """`robot_sign` keeps the key's hashes from one signature to the next (RFC 2104's
    padded key fed in once); a secret longer than SHA-256's 64-byte block is hashed first.
    Each length, in ASCII and in three-byte characters, against the standard library."""
    for secret in ("k" * length, "密" * length):
        for timestamp in ("1700000000000", "1700000000001"):  # the kept hashes copied, not spent
            message = f"{timestamp}\n{secret}".encode()
            digest = hmac.digest(secret.encode(), message, "sha256")
            assert robot_sign(secret, timestamp) == base64.b64encode(digest).decode()


@pytest.mark.parametrize("sign", ["é", "%C3%A9", "\udcff", "%zz"])
def test_a_sign_that_is_not_base64_is_refused_not_an_error(sign: str) -> None:
    assert not verify_sign("SEC-x", "1700000000000", sign)


def test_an_empty_field_gives_way_to_the_next_alias() -> None:
    payload = {**BASE, "msgId": "", "msg_id": "m2", "senderId": "", "sender_id": "u2"}
    message = parse_payload(payload)
    assert (message.im_msg_id, message.sender.id) == ("m2", "u2")


def test_an_object_where_text_was_expected_is_no_text() -> None:
    """An image message may carry an empty (or unknown) `text` object: its text is empty,
    not the object's Python repr sent on to the upstream."""
    payload = {**BASE, "msgtype": "image", "text": {}, "picUrl": "https://img.example/a.png"}
    message = parse_payload(payload)
    assert message.text == ""
    assert parse_payload({**BASE, "text": ["a"], "markdown": {"text": "@bot hi"}}).text == "hi"


def test_a_form_that_is_the_json_alone_is_unpacked() -> None:
    """The JSON URL-encoded as the whole form (a field name with no `=` and no value)."""
    assert decode_body(quote(json.dumps(BASE)).encode()) == BASE


def test_a_message_id_beyond_64_bits_alone_in_the_body_is_read_exactly() -> None:
    number = "123456789012345678901234567890"
    assert decode_body(f'{{"msgId": {number}}}'.encode()) == {"msgId": int(number)}
    assert repr(decode_body(f'{{"ids": [{number}, 1.5]}}'.encode())) == repr(
        {"ids": [int(number), 1.5]}
    )
    assert decode_body(f'{{"m": "x", "text": {{"id": {number}}}}}'.encode()) == {
        "m": "x", "text": {"id": int(number)}
    }


def test_a_form_field_holding_a_json_object_is_read_inside() -> None:
    """A form cannot nest: the platform's form sends `text` as the JSON of its object."""
    body = urlencode({"msgId": "m1", "text": json.dumps({"content": "@bot 你好"}),
                      "senderId": "u1", "conversationId": "g1"}).encode()
    assert parse_payload(decode_body(body)).text == "你好"


def test_a_message_without_a_type_is_text() -> None:
    payload = {key: value for key, value in BASE.items() if key != "msgtype"}
    assert parse_payload(payload).msg_type == "text"
