"""A fake HiAgent web-chat proxy: the page that sets the CSRF cookies, and the chat API.

It checks what the real proxy checks (the `x-csrf-token` header equal to the cookie of the
same name, the `hiagent-csrf` cookie, an `app-visitor-key`) and serves the recorded
chat_query stream with its nested `data:data: {json}` framing.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.fakes.base import FIXTURES
from tests.fakes.scripted import Script, ScriptedFake, guarded

APP_KEY = "test-app-key"
PAGE_PATH = f"/product/llm/chat/{APP_KEY}"
API = "/api/proxy/chat/v2"
CHAT_QUERY = f"{API}/chat_query"
CREATE = f"{API}/create_conversation"
DELETE = f"{API}/delete_conversation"
APP_CONVERSATION_ID = "cuvgvpj65lasv2plslt0"
FIXTURE = FIXTURES / "hiagent-chat_query.sse"
FIXTURE_CONVERSATION_ID = "01JN17DFETEKT0B0HJWR9V2GZ2"  # the conversation_id inside FIXTURE


def recorded_answer() -> str:
    """The fixture's answer, read without the adapter: every `message` event's `answer`."""
    answer = ""
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if line.startswith("data:data:"):
            inner = json.loads(line.removeprefix("data:data:"))
            if inner["event"] == "message":
                answer += inner["answer"]
    return answer


def nested_frame(inner: dict[str, Any]) -> str:
    """One outer SSE event whose data is the inner `data: {json}` and its blank lines."""
    return f"event:text\ndata:data: {json.dumps(inner, ensure_ascii=False)}\ndata:\ndata:\n\n"


def nested_stream(inners: list[dict[str, Any]]) -> bytes:
    return "".join(nested_frame(inner) for inner in inners).encode()


def message(answer: str, conversation_id: str = FIXTURE_CONVERSATION_ID) -> dict[str, Any]:
    return {"event": "message", "task_id": "t1", "id": "t1", "answer": answer,
            "created_at": 1740576835, "conversation_id": conversation_id}


class HiAgentFake(ScriptedFake):
    """The page hands out CSRF cookies; `chat_query` streams `stream` (the fixture)."""

    max_size = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = FIXTURE.read_bytes()
        self.issued = 0  # CSRF tokens handed out so far
        self.accepted: str | None = None  # the one token the API takes now
        self.refuse_all = False  # every API call answers 403, whatever the token
        self.script = Script(self.answer())
        self.app.router.add_get(PAGE_PATH, self._page)
        self.app.router.add_post(CREATE, guarded(self._create, self._refusal))
        self.app.router.add_post(CHAT_QUERY, guarded(self.script.handle, self._refusal))
        self.app.router.add_post(DELETE, guarded(self._delete, self._refusal))

    @classmethod
    async def start(cls, seed: int = 0) -> HiAgentFake:
        return await cls(seed).serve()

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {"BRIDGE_UPSTREAM": "hiagent", "BRIDGE_HIAGENT_BASE_URL": url or self.url,
                "BRIDGE_HIAGENT_APP_KEY": APP_KEY, **overrides}

    def expire_csrf(self) -> None:
        """The token handed out is no longer taken; the page gives a new one."""
        self.accepted = None

    async def _page(self, request: web.Request) -> web.Response:
        self.issued += 1
        # '/' and '=' make the cookie quoted on the wire: it must come back exactly so.
        self.accepted = f"csrf/token+{self.issued}=="
        response = web.Response(text="<html>chat</html>", content_type="text/html")
        response.set_cookie("hiagent-csrf", f"hiagent-csrf-{self.issued}", httponly=True)
        response.set_cookie("x-csrf-token", self.accepted)
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        token = request.headers.get("x-csrf-token")
        if (
            not self.refuse_all
            and token is not None
            and token == self.accepted
            and request.cookies.get("x-csrf-token") == token
            and request.cookies.get("hiagent-csrf")
            and request.headers.get("app-visitor-key")
        ):
            return None
        return web.json_response({"code": 403, "message": "invalid csrf token"}, status=403)

    async def _create(self, request: web.Request) -> web.Response:
        conversation = {"AppConversationID": APP_CONVERSATION_ID, "ConversationName": "新的会话",
                        "CreateTime": "", "LastChatTime": "", "EmptyConversation": False}
        return web.json_response({"Conversation": conversation, "BaseResp": None})

    async def _delete(self, request: web.Request) -> web.Response:
        return web.json_response({"BaseResp": None})
