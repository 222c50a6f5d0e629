"""A fake Yach open platform for the agent API: `/gettoken`, the chat POST and the stream GET.

The POST answer is the one of yach-agent-chat.md; the stream frames follow the platform's
"数字伙伴会话结果获取" document (SPEC §7): `think` frames, then answer frames, `is_finished`.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from aiohttp import web

from tests.fakes.scripted import Script, ScriptedFake, sse_payloads
from tests.fakes.yach import Shown

CHAT = "/openapi/v2/agent/chat"
GETTOKEN = "/gettoken"
CUSTOM_STREAM = "/custom/agent/stream"  # for BRIDGE_YACH_AGENT_STREAM_URL
STREAM_ID = "78b59994d2085412f3d0bcfc39e7014c_5dbf893073f363f979fb31fd9d246f40_mfswsDTLzz"
THINK = [" ", "\n", "Th", "e user asks who I am", "."]
ANSWER_PIECES = [
    "我是", "知音楼数字伙伴", ",可以帮你", "查询制度、", "解答问题。\n\n", "- 有什么需要?",
]
ANSWER = "".join(ANSWER_PIECES)
INVALID_TOKEN = {"code": 40014, "msg": "access_token无效或已过期", "obj": None}
INPUTS = {"var1": "value1", "年级": "高一"}


def frame(kind: str, content: str, *, finished: bool = False, reason: str = "") -> dict[str, Any]:
    return {"msg_id": STREAM_ID, "is_finished": finished, "finish_reason": reason,
            "type": kind, "content": {"type": kind, "content": content}}


def answer_frames(pieces: list[str] = ANSWER_PIECES) -> list[dict[str, Any]]:
    frames = [frame("think", piece) for piece in THINK]
    frames += [frame("markdown", piece) for piece in pieces]
    frames.append(frame("markdown", "", finished=True, reason="stop"))
    return frames


class FakeYachAgent(ScriptedFake):
    """Tokens are `tok-1`, `tok-2`, …; `expire_tokens()` makes every issued one invalid.

    Scripts: `gettoken`, `chat` (the POST) and `script` (the stream read, which serves
    `stream`, the frames of `answer_frames()`). One host serves the agent API and the app-API
    sends, as in production (they share the app access token): a bridge whose upstream is
    this fake sends its replies here, and `shown` holds them (any token is taken).
    """

    max_size = 80

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.valid_tokens: set[str] = set()
        self._token_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self.stream = sse_payloads(answer_frames())
        self.shown: list[Shown] = []
        self.gettoken = Script(self._gettoken)
        self.chat = Script(self._chat)
        self.script = Script(self._stream)
        self.app.router.add_get(GETTOKEN, self.gettoken.handle)
        self.app.router.add_post(CHAT, self.chat.handle)
        self.app.router.add_get(CHAT, self.script.handle)
        self.app.router.add_get(CUSTOM_STREAM, self.script.handle)
        self.app.router.add_post("/group/robot/message/send", self._send)
        self.app.router.add_post("/v1/single/message/send", self._send)

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {
            "BRIDGE_UPSTREAM": "yach-agent",
            "BRIDGE_YACH_API_BASE": url or self.url,
            "BRIDGE_YACH_APP_KEY": "app-key",
            "BRIDGE_YACH_APP_SECRET": "app-secret",
            "BRIDGE_YACH_AGENT_BIZ_ID": "000000",
            "BRIDGE_YACH_AGENT_INPUTS": json.dumps(INPUTS, ensure_ascii=False),
            **overrides,
        }

    def expire_tokens(self) -> None:
        self.valid_tokens.clear()

    def texts(self) -> list[str]:
        return [shown.text for shown in self.shown]

    async def _send(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        message_id = body.get("message_id")
        if all(shown.message_id != message_id for shown in self.shown):  # shown once, by id
            to = body.get("group_id") or body.get("to_user_id") or ""
            self.shown.append(Shown("app", to, json.loads(body["message"]), message_id))
        return web.json_response({"code": 200, "msg": "ok"})

    async def _gettoken(self, request: web.Request) -> web.StreamResponse:
        token = f"tok-{next(self._token_ids)}"
        self.valid_tokens.add(token)
        return web.json_response({"code": 200, "msg": "",
                                  "obj": {"access_token": token, "expired_time": 7200}})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("access_token") not in self.valid_tokens:
            return web.json_response(INVALID_TOKEN)
        session_id = body.get("chat_session_id") or f"cs-{next(self._session_ids)}"
        return web.json_response({"code": 200, "msg": "",
                                  "obj": {"stream_id": STREAM_ID, "chat_session_id": session_id}})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("access_token") not in self.valid_tokens:
            return web.json_response(INVALID_TOKEN)
        return await self.answer()(request)
