"""What becomes of an inbound message: its session, and ignored / command / notice / turn."""

from __future__ import annotations

import pytest

from bridge.config import load_settings
from bridge.inbox import EntryKind
from bridge.intake import Command, chat_session_id, judge, parse_command
from bridge.interfaces import InboundMessage, Sender


def message(
    text: str = "hello",
    *,
    sender: str = "u1",
    work_code: str = "W001",
    group: str = "g1",
    direct: bool = False,
    msg_type: str = "text",
    images: tuple[str, ...] = (),
) -> InboundMessage:
    return InboundMessage(
        im_msg_id="m1",
        text=text,
        sender=Sender(sender, "Tester", work_code),
        conversation_id=sender if direct else group,
        is_direct=direct,
        msg_type=msg_type,
        image_urls=images,
    )


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings({f"BRIDGE_{k.upper()}": v for k, v in env.items()}, command="demo")


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/help", Command.HELP),
        ("帮助", Command.HELP),
        ("/reset", Command.RESET),
        ("/new", Command.RESET),
        ("重置", Command.RESET),
        ("新对话", Command.RESET),
        ("/stop", Command.STOP),
        ("停止", Command.STOP),
        ("/status", Command.STATUS),
        ("状态", Command.STATUS),
        ("  /STOP  ", Command.STOP),
        ("/stop!", Command.STOP),
        ("停止。", Command.STOP),
        ("／reset", Command.RESET),
        ("帮助？", Command.HELP),
        ("／ＳＴＯＰ！", Command.STOP),
        ("/status?", Command.STATUS),
        ("新对话～", Command.RESET),
        ("/重置", Command.RESET),  # the help text writes `/reset（重置、新对话）`
        ("／停止", Command.STOP),
        ("/帮助", Command.HELP),
    ],
)
def test_commands_and_their_chinese_aliases(text: str, command: Command) -> None:
    assert parse_command(text) is command


@pytest.mark.parametrize("text", ["/stop the music", "please /help", "stop", "/unknown", ""])
def test_other_text_is_not_a_command(text: str) -> None:
    assert parse_command(text) is None


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/stop @小助手", Command.STOP),  # the command typed first, the bot picked after
        ("/stop@小助手\u2005", Command.STOP),  # the picker writes right after the cursor
        ("/reset\u3000@小助手", Command.RESET),
        ("停止\xa0@小助手", Command.STOP),
        ("/help ＠小助手", Command.HELP),
        ("/status @小助手 @张三", Command.STATUS),
        ("@张三 /stop @小助手", Command.STOP),  # the bot's leading mention already stripped
        ("@张三\u2005停止？", Command.STOP),
        ("/stop! @小助手", Command.STOP),
        ("\u3000／ＳＴＯＰ\u3000＠小助手\u3000", Command.STOP),
    ],
)
def test_a_command_with_only_mentions_around_it_is_the_command(text: str, command: Command) -> None:
    assert parse_command(text) is command


@pytest.mark.parametrize(
    "text",
    [
        "/reset please",  # other text after a command: a question, as without a mention
        "/reset @小助手 please",
        "/reset @张三 看看这个",
        "/stop @小助手 /reset",
        "@张三 你好",
        "@小助手",
        # A name with a space is not known to be one: its second word is text. Guessing
        # it is a name would make `/reset @张三 看看` a reset, the conversation lost.
        "/stop @My Bot",
        "/stop a@小助手",
    ],
)
def test_mentions_with_other_text_are_not_a_command(text: str) -> None:
    assert parse_command(text) is None


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("group", "yach:g:g1"), ("user", "yach:u:u1"), ("group_user", "yach:g:g1:u:u1")],
)
def test_session_scopes(scope: str, expected: str) -> None:
    assert chat_session_id(message(), scope) == expected


@pytest.mark.parametrize("scope", ["group", "user", "group_user"])
def test_direct_chats_are_always_per_user(scope: str) -> None:
    assert chat_session_id(message(direct=True), scope) == "yach:u:u1"


def test_a_question_is_a_turn() -> None:
    verdict = judge(message(), settings())
    assert verdict.kind is EntryKind.TURN
    assert verdict.chat_session_id == "yach:g:g1:u:u1"


def test_a_command_is_a_command() -> None:
    assert judge(message("停止"), settings()).kind is EntryKind.COMMAND


def test_a_command_word_with_an_image_is_a_question() -> None:
    verdict = judge(message("/help", images=("https://x/y.png",)), settings())
    assert verdict.kind is EntryKind.TURN


def test_an_image_alone_is_a_turn() -> None:
    assert judge(message("", images=("https://x/y.png",)), settings()).kind is EntryKind.TURN


@pytest.mark.parametrize(
    ("text", "msg_type"), [("", "text"), ("  ", "text"), ("", "file"), ("voice.amr", "voice")]
)
def test_no_text_nor_image_is_the_unsupported_notice(text: str, msg_type: str) -> None:
    verdict = judge(message(text, msg_type=msg_type), settings())
    assert (verdict.kind, verdict.notice) == (EntryKind.NOTICE, "unsupported_type")


def test_input_too_long_is_a_notice_above_the_limit_only() -> None:
    config = settings(max_input_chars="10")
    assert judge(message("字" * 10), config).kind is EntryKind.TURN
    verdict = judge(message("字" * 11), config)
    assert (verdict.kind, verdict.notice) == (EntryKind.NOTICE, "input_too_long")


@pytest.mark.parametrize(
    ("env", "msg", "allowed"),
    [
        ({"allow_groups": "g1,g2"}, message(group="g2"), True),
        ({"allow_groups": "g1,g2"}, message(group="g3"), False),
        ({"allow_users": "u9, W001"}, message(), True),  # by work code
        ({"allow_users": "u1"}, message(work_code=""), True),  # by user id
        ({"allow_users": "u9"}, message(), False),
        ({"allow_groups": "g1", "allow_users": "u1"}, message(group="g9"), False),
        ({"allow_groups": "g1", "allow_users": "u9"}, message(), False),
        ({"allow_groups": "g1"}, message(direct=True), True),  # direct: users only
        ({"allow_users": "u9"}, message(direct=True), False),
    ],
)
def test_allow_lists(env: dict[str, str], msg: InboundMessage, allowed: bool) -> None:
    verdict = judge(msg, settings(**env))
    assert (verdict.kind is not None) is allowed


def test_not_allowed_commands_are_ignored_too() -> None:
    assert judge(message("/help", group="g9"), settings(allow_groups="g1")).kind is None
