"""A fake OpenAI-compatible chat-completions server that streams like real ones do: a
role-only first chunk, keep-alive comments, `null` content, a usage chunk with empty
`choices`, then `[DONE]` — re-chunked at random byte boundaries."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from tests.fakes.base import FakeServer, rechunk, stream_bytes
from tests.fakes.scripted import Script, ScriptedFake, guarded

Answerer = Callable[[dict[str, Any]], str]


class ChatCompletionsFake:
    """The life of a fake OpenAI-compatible server: `POST /v1/chat/completions` answered by
    the subclass's `_complete`, on loopback."""

    server: FakeServer

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> Self:
        self.server.app.router.add_post("/v1/chat/completions", self._complete)
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"


def echo_answer(body: dict[str, Any]) -> str:
    """Answers with what it was asked and how much history came with it."""
    messages = body["messages"]
    question = messages[-1]["content"]
    return f"You said: {question}. (history: {len(messages) - 1} messages)"


def chunks_for(answer: str, *, model: str = "fake-model", words_per_chunk: int = 1) -> bytes:
    def chunk(delta: dict[str, Any] | None, **extra: Any) -> str:
        choices = (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": extra.pop("finish", None)}]
        )
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": choices,
            **extra,
        }
        return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"

    words = answer.split(" ")
    parts = [
        " ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)
    ]
    out = [": keep-alive\n\n", chunk({"role": "assistant", "content": ""})]
    for index, part in enumerate(parts):
        out.append(chunk({"content": part if index == 0 else " " + part}))
    out.append(chunk({"content": None}, finish="stop"))
    out.append(
        chunk(
            None,
            usage={
                "prompt_tokens": 11,
                "completion_tokens": len(parts),
                "total_tokens": 11 + len(parts),
            },
        )
    )
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


@dataclass
class FakeOpenAI(ChatCompletionsFake):
    answer: Answerer = echo_answer
    delay_s: float = 0.001
    first_byte_delay_s: float = 0.0
    seed: int = 7
    statuses: list[int] = field(default_factory=list)  # answered first, in order, then streams
    server: FakeServer = field(default_factory=lambda: FakeServer(web.Application()))
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer sk-test-placeholder":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.statuses:
            status = self.statuses.pop(0)
            return web.json_response(
                {"error": {"message": f"fake {status}"}},
                status=status,
                headers={"Retry-After": "0"},
            )
        body = await request.json()
        self.bodies.append(body)
        if self.first_byte_delay_s:
            await asyncio.sleep(self.first_byte_delay_s)
        data = chunks_for(self.answer(body))
        return await stream_bytes(
            request, rechunk(data, random.Random(self.seed)), delay_s=self.delay_s
        )


API_KEY = "sk-test-placeholder"
SCRIPTED_ANSWER = " ".join(f"Sentence number {n} of the scripted answer." for n in range(1, 13))


class ScriptedOpenAI(ScriptedFake):
    """`POST /v1/chat/completions` as the other upstream fakes answer: from `script`, whose
    default streams `stream` (SCRIPTED_ANSWER, one word a chunk) to the right key."""

    max_size = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = chunks_for(SCRIPTED_ANSWER)
        self.script = Script(self.answer())
        self.app.router.add_post("/v1/chat/completions", guarded(self.script.handle, _refusal))

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {"BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_BASE_URL": f"{url or self.url}/v1",
                "BRIDGE_OPENAI_API_KEY": API_KEY, "BRIDGE_OPENAI_MODEL": "fake-model",
                **overrides}


def _refusal(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") == f"Bearer {API_KEY}":
        return None
    body = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                      "code": "invalid_api_key"}}
    return web.json_response(body, status=401)


MIDWAY_HEAD, MIDWAY_TAIL = "Alpha beta. Gamma", " delta."


def _delta_chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


class SilentMidway(ChatCompletionsFake):
    """Sends MIDWAY_HEAD, is silent until `release` is set, then MIDWAY_TAIL and the end."""

    def __init__(self) -> None:
        self.server = FakeServer(web.Application())
        self.release = asyncio.Event()

    async def close(self) -> None:
        self.release.set()  # a stream still waiting ends, so the server can stop
        await super().close()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_delta_chunk(MIDWAY_HEAD))
        await self.release.wait()
        await response.write(
            _delta_chunk(MIDWAY_TAIL) + _delta_chunk(None, "stop") + b"data: [DONE]\n\n"
        )
        return response


GATED_HEAD = [f"Head sentence number {n} of the answer." for n in range(1, 4)]
GATED_TAIL = [f"Tail sentence number {n} of the answer." for n in range(1, 6)]


class GatedOpenAI(ChatCompletionsFake):
    """Streams GATED_HEAD, waits for `gate`, then GATED_TAIL, one sentence per chunk (an
    answer cut in two at a moment the test chooses); counts the streams it started."""

    def __init__(self) -> None:
        self.server = FakeServer(web.Application())
        self.gate = asyncio.Event()
        self.started = 0

    async def close(self) -> None:
        self.gate.set()
        await super().close()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.started += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for sentence in GATED_HEAD:
            await response.write(_delta_chunk(sentence + " "))
            await asyncio.sleep(0.05)
        await self.gate.wait()
        for sentence in GATED_TAIL:
            await response.write(_delta_chunk(sentence + " "))
            await asyncio.sleep(0.05)
        await response.write(_delta_chunk(None, "stop") + b"data: [DONE]\n\n")
        return response
