"""A fake Coze open API: `POST /v3/chat` streaming, and `DELETE /v1/conversations/{id}`.

The stream is written from coze-v3-chat.md, the web capture in
chatgpt-dify-coze-web-compare.md and Coze's public event list: `event:` names without a
space, JSON data, `verbose` and `follow_up` messages, `completed` messages that repeat the
answer, usage in `conversation.chat.completed`, and `event:done` with `data:"[DONE]"`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.fakes.scripted import Script, ScriptedFake, guarded

TOKEN = "pat_test-token"
BOT_ID = "7424459244357173302"
CONVERSATION_ID = "7366503630755315712"
CHAT_ID = "7381002802132156435"
# Two answer messages in one chat (as multi-step bots send): joined with a blank line.
ANSWER_MESSAGES = (
    ("7381002802132221971", ["当然", "知道，", "薛之谦是", "中国内地男歌手", "。"]),
    ("7381002802132221999", ["他的代表作有", "《演员》", "和《丑八怪》。"]),
)
ANSWER = "当然知道，薛之谦是中国内地男歌手。\n\n他的代表作有《演员》和《丑八怪》。"
FOLLOW_UPS = ("薛之谦的代表作有哪些?", "薛之谦最近有什么新歌?")
USAGE = {"token_count": 2662, "output_count": 44, "input_count": 2618}


def frame(event: str, data: Any) -> str:
    return f"event:{event}\ndata:{json.dumps(data, ensure_ascii=False)}\n\n"


def chat(status: str, conversation_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": CHAT_ID, "conversation_id": conversation_id, "bot_id": BOT_ID,
            "created_at": 1718523636, "last_error": {"code": 0, "msg": ""}, "status": status,
            **extra}


def msg(kind: str, content: str, message_id: str, conversation_id: str,
        **extra: Any) -> dict[str, Any]:
    return {"id": message_id, "conversation_id": conversation_id, "bot_id": BOT_ID,
            "chat_id": CHAT_ID, "role": "assistant", "type": kind, "content": content,
            "content_type": "text", **extra}


def verbose(name: str, message_id: str, conversation_id: str) -> str:
    content = json.dumps({"msg_type": name, "data": "", "from_module": None, "from_unit": None})
    return frame("conversation.message.completed", msg("verbose", content, message_id,
                                                       conversation_id))


def answer_frames(conversation_id: str) -> list[str]:
    frames = []
    for message_id, parts in ANSWER_MESSAGES:
        for part in parts:
            frames.append(frame("conversation.message.delta",
                                msg("answer", part, message_id, conversation_id)))
        frames.append(frame("conversation.message.completed",
                            msg("answer", "".join(parts), message_id, conversation_id)))
    return frames


def chat_frames(conversation_id: str = CONVERSATION_ID) -> list[str]:
    """A whole chat: created, in progress, two answers, verbose, follow-ups, usage, done."""
    return [
        frame("conversation.chat.created", chat("created", conversation_id)),
        frame("conversation.chat.in_progress", chat("in_progress", conversation_id)),
        verbose("time_capsule_recall", "7381002802132172819", conversation_id),
        *answer_frames(conversation_id),
        verbose("generate_answer_finish", "7381002802132353043", conversation_id),
        *(frame("conversation.message.completed",
                msg("follow_up", text, f"74000000000000000{i}", conversation_id))
          for i, text in enumerate(FOLLOW_UPS)),
        frame("conversation.chat.completed",
              chat("completed", conversation_id, completed_at=1718523640, usage=USAGE)),
        'event:done\ndata:"[DONE]"\n\n',
    ]


def error_frames(conversation_id: str = CONVERSATION_ID) -> list[str]:
    """The chat starts answering, then the stream reports an error."""
    return [
        *chat_frames(conversation_id)[:5],
        frame("error", {"code": 4000, "msg": "Request parameter error"}),
    ]


def failed_frames(conversation_id: str = CONVERSATION_ID) -> list[str]:
    """The chat fails: `conversation.chat.failed` with `last_error`, then `done`."""
    last_error = {"code": 5000, "msg": "model is overloaded"}
    return [
        *chat_frames(conversation_id)[:4],
        frame("conversation.chat.failed", chat("failed", conversation_id, last_error=last_error)),
        'event:done\ndata:"[DONE]"\n\n',
    ]


def missing(resource: str) -> dict[str, Any]:
    """Coze's error for an id it does not have (code 4200, the resource named in `msg`)."""
    return {"code": 4200, "msg": f"Requested resource {resource} does not exist. "
                                 "Ensure you are the correct resource identifier."}


def gone_frames(conversation_id: str) -> list[str]:
    """The chat fails at once: the conversation it was asked in is not there (any more)."""
    last_error = missing(f"conversation_id={conversation_id}")
    failed = chat("failed", conversation_id, last_error=last_error)
    return [
        frame("conversation.chat.created", chat("created", conversation_id)),
        frame("conversation.chat.failed", failed),
        'event:done\ndata:"[DONE]"\n\n',
    ]


class CozeFake(ScriptedFake):
    """`POST /v3/chat` streams `stream` (`chat_frames()`) to the right token; `deleted` holds
    the conversations deleted."""

    max_size = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = "".join(chat_frames()).encode()
        self.deleted: list[str] = []
        self.script = Script(self.answer())
        self.app.router.add_post("/v3/chat", guarded(self.script.handle, self._refusal))
        self.app.router.add_delete("/v1/conversations/{conversation_id}",
                                   guarded(self._delete, self._refusal))

    @classmethod
    async def start(cls, seed: int = 0) -> CozeFake:
        return await cls(seed).serve()

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {"BRIDGE_UPSTREAM": "coze", "BRIDGE_COZE_BASE_URL": url or self.url,
                "BRIDGE_COZE_TOKEN": TOKEN, "BRIDGE_COZE_BOT_ID": BOT_ID, **overrides}

    @staticmethod
    def _refusal(request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {TOKEN}":
            return None
        return web.json_response({"code": 4100, "msg": "authentication is invalid"}, status=401)

    async def _delete(self, request: web.Request) -> web.Response:
        self.deleted.append(request.match_info["conversation_id"])
        return web.json_response({"code": 0, "msg": "", "data": {}})
