"""What becomes of an inbound message, decided before it is stored: its session, and
whether it is ignored, a command, a notice or a turn. Pure functions."""

from __future__ import annotations

import enum
import re
import unicodedata
from typing import NamedTuple

from bridge.config import Settings
from bridge.inbox import EntryKind
from bridge.interfaces import InboundMessage

__all__ = ["Command", "Verdict", "chat_session_id", "judge", "parse_command"]


class Command(enum.StrEnum):
    HELP = "help"
    RESET = "reset"
    STOP = "stop"
    STATUS = "status"


_ALIASES = {
    "/help": Command.HELP, "帮助": Command.HELP,
    "/reset": Command.RESET, "/new": Command.RESET, "重置": Command.RESET,
    "新对话": Command.RESET,
    "/stop": Command.STOP, "停止": Command.STOP,
    "/status": Command.STATUS, "状态": Command.STATUS,
}  # fmt: skip
# The help text puts each alias beside its slash form (`/reset（重置…）`): `/重置` is meant too.
_ALIASES |= {f"/{alias}": command for alias, command in _ALIASES.items() if alias[0] != "/"}
# After NFKC, which makes fullwidth forms plain (`！？～` `／ｈｅｌｐ`); `。` has no plain form.
_TRAILING_PUNCTUATION = re.compile(r"[\s。.!?~]+$")
# What a command's first character can be (before lower-casing and the fullwidth slash), or
# a mention's before it (`@张三 /stop`: the adapter strips only the first, the bot's).
_COMMAND_STARTS = frozenset({alias[0] for alias in _ALIASES} | {"／", "@", "＠"})
# A mention, after NFKC (`＠` is `@`; U+3000, NBSP and U+2005 are spaces): `@` and a name up
# to the next space. People type the command and pick the bot's mention after it
# (`/stop @小助手`, `/stop@小助手`), so mentions around a command word leave the command.
# A name with a space (`@My Bot`) is not one mention: its second word is text, and
# `/stop @My Bot` a question. The bot's name is not known (SPEC gives no field for it), and
# reading every word after a mention as part of a name would make `/reset @张三 看看这个` a
# reset (the conversation lost) instead of a question; the leading mention is read the same.
_MENTION = re.compile(r"@\S*")
# Message types that carry neither text nor an image we can read, whatever their fields say.
UNSUPPORTED_TYPES = frozenset({"voice", "audio", "file", "video", "location", "sticker"})


def parse_command(text: str) -> Command | None:
    """The command a message is, if it is one (`/stop`, `停止？`, ` ／Reset `, `/stop @小助手` …);
    a command word with any other text (`/stop the music`) is a question."""
    stripped = text.strip()
    if stripped[:1] not in _COMMAND_STARTS:  # most messages: no regex to run
        return None
    plain = unicodedata.normalize("NFKC", stripped)
    if "@" in plain:
        plain = _MENTION.sub(" ", plain).strip()
    word = _TRAILING_PUNCTUATION.sub("", plain).lower()
    return _ALIASES.get(word)


def chat_session_id(message: InboundMessage, scope: str) -> str:
    """`yach:<scope key>` (SPEC §5); direct chats are always per user."""
    if message.is_direct or scope == "user":
        return f"yach:u:{message.sender.id}"
    if scope == "group":
        return f"yach:g:{message.conversation_id}"
    return f"yach:g:{message.conversation_id}:u:{message.sender.id}"


class Verdict(NamedTuple):  # one per webhook: a frozen dataclass costs three times as much
    kind: EntryKind | None  # None: ignored (not allowed here); acknowledged, never answered
    chat_session_id: str
    notice: str = ""  # for EntryKind.NOTICE: the catalogue key of the answer


def _allowed(message: InboundMessage, settings: Settings) -> bool:
    users = settings.allow_users
    user_ok = (
        not users
        or message.sender.id in users
        or (bool(message.sender.work_code) and message.sender.work_code in users)
    )
    if message.is_direct:
        return user_ok
    groups = settings.allow_groups
    return user_ok and (not groups or message.conversation_id in groups)


def judge(message: InboundMessage, settings: Settings) -> Verdict:
    session = chat_session_id(message, settings.session_scope)
    if not _allowed(message, settings):
        return Verdict(None, session)
    if parse_command(message.text) is not None and not message.image_urls:
        return Verdict(EntryKind.COMMAND, session)
    unreadable = message.msg_type.lower() in UNSUPPORTED_TYPES
    if unreadable or (not message.text.strip() and not message.image_urls):
        return Verdict(EntryKind.NOTICE, session, "unsupported_type")
    if len(message.text) > settings.max_input_chars:
        return Verdict(EntryKind.NOTICE, session, "input_too_long")
    return Verdict(EntryKind.TURN, session)
