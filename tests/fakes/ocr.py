"""A fake OCR service: an OpenAI-compatible vision model behind `/v1/chat/completions`,
answering as math-graph-external-apis.md shows (non-streaming `chat.completion`).

The transcript of an image made by `tests.fakes.images.png(label)` is `transcripts[label]`,
else `"transcript of <label>"`. Every request body is kept for the tests to inspect.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.images import label_of
from tests.fakes.openai import ChatCompletionsFake

API_KEY = "sk-ocr-placeholder"
MODEL = "qwen-vl"


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-08cc11398014472fa86bd8cbdb2ded8b",
        "object": "chat.completion",
        "created": 1764146440,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "tool_calls": [], "reasoning_content": None},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 841, "total_tokens": 972, "completion_tokens": 131},
    }


def image_of(body: dict[str, Any]) -> bytes:
    """The bytes of the data URL in an OCR request."""
    parts = body["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    header, _, data = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header
    return base64.b64decode(data)


@dataclass
class FakeOCR(ChatCompletionsFake):
    transcripts: dict[str, str] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)  # answered first, in order
    server: FakeServer = field(default_factory=lambda: FakeServer(web.Application()))
    bodies: list[dict[str, Any]] = field(default_factory=list)


    def labels(self) -> list[str]:
        """The labels of the images transcribed, in the order they were asked."""
        return [label_of(image_of(body)) for body in self.bodies]

    async def _complete(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.statuses:
            status = self.statuses.pop(0)
            return web.json_response({"error": {"message": f"fake {status}"}}, status=status)
        body = await request.json()
        self.bodies.append(body)
        label = label_of(image_of(body))
        return web.json_response(completion(self.transcripts.get(label,
                                                                 f"transcript of {label}")))
