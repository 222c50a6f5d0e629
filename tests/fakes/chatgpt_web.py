"""A fake ChatGPT web backend-api: `/conversation` answered as SSE or through a WebSocket.

The stream is written from the seed (chatgpt-dify-coze-web-compare.md): the new conversation
of its first request, cumulative assistant `parts`, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Callable
from typing import Any, Unpack

from aiohttp import WSCloseCode, web

from tests.fakes.scripted import Breaks, Reply, Script, ScriptedFake, free_port, sse_payloads

BASE = "/backend-api"
CONVERSATION = BASE + "/conversation"
STOP = BASE + "/stop_conversation"
WS = "/client/hubs/conversations"
MOVED_WS = "/client/hubs/moved"
CONVERSATION_ID = "4744527e-da3d-4ae8-ba71-c16904fb36fe"
ACCESS_TOKEN = "chatgpt-test-access-token"
QUESTION = "为 TikTok 帐户创建一个用于评估房地产楼盘的内容日历。"
PIECES = [
    "当然可以", "!下面是一个为期一周的", "房地产楼盘评估内容日历:\n\n",
    "1. 周一:楼盘外观与周边环境 🏙️\n", "2. 周二:户型与采光实拍\n",
    "3. 周三:价格与贷款方案解析。",
]
ANSWER = "".join(PIECES)


def assistant_message(message_id: str, text: str, *, final: bool = False) -> dict[str, Any]:
    return {
        "id": message_id,
        "author": {"role": "assistant", "name": None, "metadata": {}},
        "create_time": 1718523636.76,
        "update_time": None,
        "content": {"content_type": "text", "parts": [text]},
        "status": "finished_successfully" if final else "in_progress",
        "end_turn": True if final else None,
        "weight": 1.0,
        "metadata": {"model_slug": "gpt-4o", "default_model_slug": "auto"},
        "recipient": "all",
    }


def answer_payloads(conversation_id: str, user_message: dict[str, Any], assistant_id: str,
                    pieces: list[str] = PIECES) -> list[Any]:
    """The messages of one answer as the backend streams them (cumulative `parts`)."""
    echoed = {**user_message, "status": "finished_successfully", "end_turn": None,
              "recipient": "all", "weight": 1.0}
    payloads: list[Any] = [
        {"message": echoed, "conversation_id": conversation_id, "error": None},
        {"type": "title_generation", "title": "房地产内容日历", "conversation_id": conversation_id},
    ]
    text = ""
    for piece in pieces:
        text += piece
        payloads.append({"message": assistant_message(assistant_id, text),
                         "conversation_id": conversation_id, "error": None})
    payloads.append({"message": assistant_message(assistant_id, text, final=True),
                     "conversation_id": conversation_id, "error": None})
    payloads.append("[DONE]")
    return payloads


def hub_frame(request_id: str, body: bytes) -> str:
    """A frame in the hub envelope real servers use: base64 SSE bytes of one request."""
    return json.dumps({
        "type": "http.response.body", "websocket_request_id": request_id,
        "body": base64.b64encode(body).decode(), "more_body": True,
    })


class FakeChatGPT(ScriptedFake):
    """`/conversation` answers as `answer_mode` says: `sse`, or `ws` (JSON naming sockets).

    `ws_mode`: `done` (all frames), `close` (frames without an end marker, then a normal
    close), `drop` (some frames, then the TCP connection is cut), `stall` (some frames, then
    silence until the client closes), `hub` (frames in the base64 `http.response.body`
    envelope). `wss_target`: `ok`, or `dead` (the `wss_url` refuses connections, only
    `fallback_wss_url` works), `all_dead` (both refuse), `all_gone` (both answer the
    handshake 404), `inside` (the `wss_url` is the good socket named through `localhost`,
    a loopback host that is not the configured one; the fallback is the good one),
    `all_inside` (both are), `moved` (the `wss_url`, on the configured host, redirects to
    `moved_to`; the fallback is the good one). `edit_frames`, when set, changes the text
    frames the socket sends (after any envelope).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.answer_mode = "sse"
        self.ws_mode = "done"
        self.wss_target = "ok"
        self.moved_to = ""
        self.pieces = PIECES
        self.edit_frames: Callable[[list[str]], list[str]] | None = None
        self.payloads_by_request: dict[str, list[Any]] = {}
        self._ids = itertools.count(1)
        self.script = Script(self._answer)
        self.app.router.add_post(CONVERSATION, self.script.handle)
        self.app.router.add_post(STOP, self._stop)
        self.app.router.add_get(WS, self._socket)
        self.app.router.add_get(MOVED_WS, self._moved)

    @property
    def base_url(self) -> str:
        return self.server.url + BASE

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {
            "BRIDGE_UPSTREAM": "chatgpt-web",
            "BRIDGE_CHATGPT_BASE_URL": (url or self.url) + BASE,
            "BRIDGE_CHATGPT_ACCESS_TOKEN": ACCESS_TOKEN,
            "BRIDGE_CHATGPT_MODEL": "gpt-4o",
            **overrides,
        }

    def answer(self, *, upto: int | None = None, edit: Callable[[bytes], bytes] | None = None,
               **breaks: Unpack[Breaks]) -> Reply:
        """The answer to the request as SSE; only its first `upto` messages, if given, and
        its bytes changed by `edit`, if given."""

        async def reply(request: web.Request) -> web.StreamResponse:
            data = sse_payloads(self._payloads(await request.json())[:upto])
            return await self.sse(edit(data) if edit else data, **breaks)(request)

        return reply

    def _payloads(self, body: dict[str, Any]) -> list[Any]:
        conversation_id = body.get("conversation_id") or CONVERSATION_ID
        assistant_id = f"a5515fa1-0000-4000-8000-{next(self._ids):012d}"
        return answer_payloads(conversation_id, body["messages"][0], assistant_id, self.pieces)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        payloads = self._payloads(body)
        if self.answer_mode == "sse":
            return await self.sse(sse_payloads(payloads))(request)
        request_id = body["websocket_request_id"]
        self.payloads_by_request[request_id] = payloads
        own = self.server.url.replace("http://", "ws://")
        good = f"{own}{WS}?access_token=jwt&rid={request_id}"
        dead = f"ws://127.0.0.1:{free_port()}{WS}?access_token=jwt"
        gone = f"{own}/expired-socket"  # answers the handshake 404: expired
        inside = good.replace("//127.0.0.1:", "//localhost:")
        wss_url, fallback_wss_url = {
            "ok": (good, good),
            "dead": (dead, good),
            "all_dead": (dead, dead),
            "all_gone": (gone, gone),
            "inside": (inside, good),
            "all_inside": (inside, inside),
            "moved": (good.replace(WS, MOVED_WS), good),
        }[self.wss_target]
        return web.json_response({
            "wss_url": wss_url,
            "fallback_wss_url": fallback_wss_url,
            "expires_at": "2024-06-16T08:09:39.172404+00:00",
            "conversation_id": body.get("conversation_id") or CONVERSATION_ID,
            "response_id": "8948f9bac9347964-NRT",
            "websocket_request_id": request_id,
        })

    async def _moved(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"{self.moved_to}?{request.query_string}")

    async def _stop(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        request_id = request.query["rid"]
        payloads = self.payloads_by_request[request_id]
        if self.ws_mode == "close":
            payloads = payloads[:-2]  # neither the final message nor [DONE]
        if self.ws_mode in ("drop", "stall"):
            payloads = payloads[:4]
        frames = []
        for payload in payloads:
            text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            if self.ws_mode == "hub":
                text = hub_frame(request_id, f"data: {text}\n\n".encode())
            frames.append(text)
        for text in self.edit_frames(frames) if self.edit_frames else frames:
            await ws.send_str(text)
            await asyncio.sleep(0.002)
        if self.ws_mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            return ws
        if self.ws_mode == "stall":
            async for _ in ws:  # until the client closes; aiohttp answers its close frame
                pass
            return ws
        await ws.close(code=WSCloseCode.OK)
        return ws
