"""A fake HiAgent web-chat proxy: the page that sets the CSRF cookies, and the chat API.

It checks what the real proxy checks (the `x-csrf-token` header equal to the cookie of the
same name, the `hiagent-csrf` cookie, an `app-visitor-key`) and serves the recorded
chat_query stream with its nested `data:data: {json}` framing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.base import FIXTURES, FakeServer
from tests.fakes.streaming import Script

APP_KEY = "test-app-key"
PAGE_PATH = f"/product/llm/chat/{APP_KEY}"
API = "/api/proxy/chat/v2"
APP_CONVERSATION_ID = "cuvgvpj65lasv2plslt0"
FIXTURE = FIXTURES / "hiagent-chat_query.sse"
FIXTURE_CONVERSATION_ID = "01JN17DFETEKT0B0HJWR9V2GZ2"  # the conversation_id inside FIXTURE


def nested_frame(inner: dict[str, Any]) -> str:
    """One outer SSE event whose data is the inner `data: {json}` and its blank lines."""
    return f"event:text\ndata:data: {json.dumps(inner, ensure_ascii=False)}\ndata:\ndata:\n\n"


def nested_stream(inners: list[dict[str, Any]]) -> bytes:
    return "".join(nested_frame(inner) for inner in inners).encode()


def message(answer: str, conversation_id: str = FIXTURE_CONVERSATION_ID) -> dict[str, Any]:
    return {"event": "message", "task_id": "t1", "id": "t1", "answer": answer,
            "created_at": 1740576835, "conversation_id": conversation_id}


@dataclass
class HiAgentFake:
    server: FakeServer
    script: Script
    stream: bytes = field(default_factory=FIXTURE.read_bytes)
    issued: int = 0  # CSRF tokens handed out so far
    accepted: str | None = None  # the one token the API takes now
    refuse_all: bool = False  # every API call answers 403, whatever the token

    @classmethod
    async def start(cls, seed: int = 0) -> HiAgentFake:
        app = web.Application()
        fake = cls(FakeServer(app), Script(seed=seed))
        app.router.add_get(PAGE_PATH, fake._page)
        app.router.add_post(f"{API}/create_conversation", fake._create)
        app.router.add_post(f"{API}/chat_query", fake._chat_query)
        app.router.add_post(f"{API}/delete_conversation", fake._delete)
        await fake.server.start()
        return fake

    async def close(self) -> None:
        self.script.release()
        await self.server.close()

    @property
    def url(self) -> str:
        return self.server.url

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

    def _csrf_ok(self, request: web.Request) -> bool:
        token = request.headers.get("x-csrf-token")
        return (
            not self.refuse_all
            and token is not None
            and token == self.accepted
            and request.cookies.get("x-csrf-token") == token
            and bool(request.cookies.get("hiagent-csrf"))
            and bool(request.headers.get("app-visitor-key"))
        )

    @staticmethod
    def _forbidden() -> web.Response:
        return web.json_response({"code": 403, "message": "invalid csrf token"}, status=403)

    async def _create(self, request: web.Request) -> web.Response:
        if not self._csrf_ok(request):
            return self._forbidden()
        conversation = {"AppConversationID": APP_CONVERSATION_ID, "ConversationName": "新的会话",
                        "CreateTime": "", "LastChatTime": "", "EmptyConversation": False}
        return web.json_response({"Conversation": conversation, "BaseResp": None})

    async def _chat_query(self, request: web.Request) -> web.StreamResponse:
        if not self._csrf_ok(request):
            return self._forbidden()
        return await self.script.serve(request, self.stream)

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._csrf_ok(request):
            return self._forbidden()
        return web.json_response({"BaseResp": None})
