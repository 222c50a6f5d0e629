"""The message as the inbox stores it: every field written, read back the same."""

from __future__ import annotations

import json

from bridge.interfaces import InboundMessage, Sender


def test_a_message_with_no_field_left_at_its_default_round_trips() -> None:
    message = InboundMessage(
        im_msg_id="m1",
        text="看图 \U0001f600",
        sender=Sender("u1", "Tester", "W1"),
        conversation_id="g1",
        is_direct=True,
        msg_type="image_text",
        image_urls=("https://example.com/a.png", "https://example.com/b.png"),
        reply_url="https://example.com/reply",
        created_at_ms=1_700_000_000_000,
        dedupe_key="id:m1",
    )
    stored = message.to_json()
    assert list(json.loads(stored)) == list(InboundMessage._fields)  # each field, in order
    assert json.loads(stored)["sender"] == {"id": "u1", "name": "Tester", "work_code": "W1"}
    assert InboundMessage.from_json(stored) == message
    assert "\\u" not in stored  # non-ASCII as is: stored compact, one form


def test_the_defaults_round_trip_too() -> None:
    message = InboundMessage("m2", "hi", Sender("u2"), "g2", False)
    assert InboundMessage.from_json(message.to_json()) == message
