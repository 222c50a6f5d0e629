"""A fake Dify service API: `POST /v1/chat-messages` with `response_mode: streaming`.

The streams are written from chatgpt-dify-coze-web-compare.md and Dify's public event list:
`data: {json}` events, `event: ping` keep-alives without data, workflow and node events,
agent thoughts and TTS that repeat or surround the answer, `message_end` with usage, and the
`\\uXXXX`-escaped JSON older servers send.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.fakes.scripted import Script, ScriptedFake, guarded

API_KEY = "app-test-key"
CONVERSATION_ID = "a9de725e-f3c3-4bc6-9803-362ef76d3c49"
MESSAGE_ID = "3f61f0de-f759-4039-9d83-dcd3f4126c65"
PARTS = ("It looks like ", "you've typed \"333\". ", "数字有特别的含义吗？",
         "\n\n```py\nprint(1)\n```")
ANSWER = "".join(PARTS)
USAGE = {"prompt_tokens": 1, "prompt_unit_price": "0", "completion_tokens": 44,
         "total_tokens": 45, "total_price": "0.0000000", "currency": "USD",
         "latency": 2.9540078879799694}
PING = "event: ping\n\n"
PATH = "/v1/chat-messages"
TASK_ID = "438214f6-e4a7-4020-84ae-ec5b0c3bd511"  # of every answer the fake streams
STOP = f"{PATH}/{TASK_ID}/stop"


def event(kind: str, conversation_id: str = CONVERSATION_ID, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "conversation_id": conversation_id, "message_id": MESSAGE_ID,
            "created_at": 1718523378, "task_id": TASK_ID,
            "id": MESSAGE_ID, **fields}


def frame(payload: dict[str, Any], *, ascii_only: bool = False) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=ascii_only)}\n\n"


def render(items: list[dict[str, Any] | str], *, ascii_only: bool = False) -> bytes:
    """Events as SSE text; plain strings (pings) are sent as they are."""
    return "".join(item if isinstance(item, str) else frame(item, ascii_only=ascii_only)
                   for item in items).encode()


def end(conversation_id: str = CONVERSATION_ID) -> dict[str, Any]:
    return event("message_end", conversation_id, metadata={"usage": USAGE,
                                                           "retriever_resources": []})


def chatflow(conversation_id: str = CONVERSATION_ID) -> list[dict[str, Any] | str]:
    """An advanced-chat answer: workflow and node events around `message` events."""
    outputs = {"answer": ANSWER}
    return [
        PING,
        event("workflow_started", conversation_id, data={"id": "w1", "inputs": {}}),
        event("node_started", conversation_id, data={"node_id": "llm", "title": "LLM"}),
        event("message", conversation_id, answer=""),
        *(event("message", conversation_id, answer=part) for part in PARTS[:2]),
        PING,
        event("tts_message", conversation_id, audio="UklGRg=="),
        *(event("message", conversation_id, answer=part) for part in PARTS[2:]),
        event("node_finished", conversation_id, data={"node_id": "llm", "outputs": outputs}),
        event("workflow_finished", conversation_id, data={"outputs": outputs}),
        event("tts_message_end", conversation_id, audio=""),
        end(conversation_id),
    ]


def agent(conversation_id: str = CONVERSATION_ID) -> list[dict[str, Any] | str]:
    """An agent-app answer: `agent_message` text, with thoughts that repeat it."""
    return [
        event("agent_thought", conversation_id, position=1, thought="", tool="", observation=""),
        *(event("agent_message", conversation_id, answer=part) for part in PARTS),
        event("message_file", conversation_id, type="image", belongs_to="assistant",
              url="https://example.invalid/x.png"),
        event("agent_thought", conversation_id, position=1, thought=ANSWER, observation=""),
        end(conversation_id),
    ]


def replaced(replacement: str) -> list[dict[str, Any] | str]:
    """Output moderation: the answer so far is replaced as a whole."""
    return [
        *(event("message", answer=part) for part in PARTS[:2]),
        event("message_replace", answer=replacement),
        end(),
    ]


def failing() -> list[dict[str, Any] | str]:
    """Some text, then an `error` event (Dify ends the stream there)."""
    return [
        event("message", answer=PARTS[0]),
        event("error", status=400, code="completion_request_error",
              message="[openai_api_compatible] Server Unavailable Error"),
    ]


class DifyFake(ScriptedFake):
    """`POST /v1/chat-messages` streams `stream` (a `chatflow()` answer) to the right key;
    `DELETE /v1/conversations/{id}` answers 204 and `deleted` holds (id, user) pairs;
    `POST /v1/chat-messages/{task_id}/stop` answers `{"result": "success"}`, after
    `stop_delay_s` (a slow Dify)."""

    max_size = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = render(chatflow())
        self.deleted: list[tuple[str, str]] = []
        self.stop_delay_s = 0.0
        self.script = Script(self.answer())
        self.app.router.add_post(PATH, guarded(self.script.handle, self._refusal))
        self.app.router.add_delete("/v1/conversations/{conversation_id}",
                                   guarded(self._delete, self._refusal))
        self.app.router.add_post(PATH + "/{task_id}/stop", guarded(self._stop, self._refusal))

    @classmethod
    async def start(cls, seed: int = 0) -> DifyFake:
        return await cls(seed).serve()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {"BRIDGE_UPSTREAM": "dify", "BRIDGE_DIFY_BASE_URL": f"{url or self.url}/v1",
                "BRIDGE_DIFY_API_KEY": API_KEY, "BRIDGE_DIFY_INPUTS": '{"grade": "7"}',
                **overrides}

    @staticmethod
    def _refusal(request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {API_KEY}":
            return None
        body = {"code": "unauthorized", "message": "Access token is invalid", "status": 401}
        return web.json_response(body, status=401)

    async def _delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not body.get("user"):
            return web.json_response({"code": "invalid_param", "message": "user is required",
                                      "status": 400}, status=400)
        self.deleted.append((request.match_info["conversation_id"], body["user"]))
        return web.Response(status=204)

    async def _stop(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.stop_delay_s)
        return web.json_response({"result": "success"})
