"""The floor under the relay bench: the hops SPEC requires of any bridge, and nothing else.

Run by `bench_relay.py` as `python bench/_common.py floor '{"redis": …, "upstream": …,
"yach": …}'`, on uvloop like the bridge, with the same libraries (aiohttp server and client,
redis-py with hiredis). Per webhook: one Redis write before the 200 (SPEC §4: stored before
the answer; a real bridge also needs the entry claimed and the session locked, which the
floor assumes done by that same write), then the upstream called at once in this process
(no worker hand-over). Per piece: one Redis write (SPEC §6: journalled before it is sent),
then the POST to Yach's app API, in order, pieces that queued meanwhile merged into one.

No signature check, no parsing beyond the question's key, no composer, no metrics, no logs,
no sessions, no retries: what it measures is this machine's loopback hops and event-loop
wake-ups through these libraries, the part of the bridge's latency no code of ours can remove.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from tests.fakes import yach as fake_yach

_PREFIX = "floor:"


@dataclass
class FloorRelay:
    redis_url: str
    upstream: str  # the OpenAI-compatible base URL
    yach: str  # the fake Yach's API base
    token: str = ""
    session: aiohttp.ClientSession = field(init=False)
    redis: aioredis.Redis = field(init=False)
    turns: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.redis = aioredis.Redis.from_url(self.redis_url)
        query = {"appkey": fake_yach.APP_KEY, "appsecret": fake_yach.APP_SECRET}
        async with self.session.get(f"{self.yach}/gettoken", params=query) as response:
            self.token = (await response.json())["obj"]["access_token"]

    async def close(self) -> None:
        for task in list(self.turns):
            task.cancel()
        await asyncio.gather(*self.turns, return_exceptions=True)
        await self.session.close()
        await self.redis.aclose()

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = json.loads(body)
        await self.redis.xadd(f"{_PREFIX}inbox", {"m": body})
        key = message["text"]["content"].removeprefix("@bot").strip()
        task = asyncio.create_task(self._turn(key, message["conversationId"]))
        self.turns.add(task)
        task.add_done_callback(self.turns.discard)
        return web.json_response({"code": 200, "msg": "ok"})

    async def _turn(self, key: str, group: str) -> None:
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(key, group, pieces))
        body = {"model": "fake-model", "stream": True,
                "messages": [{"role": "user", "content": key}]}
        async with self.session.post(f"{self.upstream}/chat/completions", json=body) as response:
            buffer = b""
            async for chunk in response.content.iter_any():
                complete, _, buffer = (buffer + chunk).rpartition(b"\n\n")
                for event in complete.split(b"\n\n"):
                    text = _content(event)
                    if text:
                        pieces.put_nowait(text)
        pieces.put_nowait(None)
        await sender

    async def _send(self, key: str, group: str, pieces: asyncio.Queue[str | None]) -> None:
        url = f"{self.yach}/group/robot/message/send"
        index, last = 0, False
        while not last:
            text = await pieces.get()
            if text is None:
                return
            while not pieces.empty():  # merged while they waited, as the bridge does
                more = pieces.get_nowait()
                if more is None:
                    last = True
                    break
                text += more
            await self.redis.hset(f"{_PREFIX}journal:{key}", str(index), text)
            message = {"msgtype": "markdown", "markdown": {"title": "floor", "text": text}}
            payload = {"group_id": group, "message": json.dumps(message, ensure_ascii=False),
                       "message_id": f"floor-{key}-{index}"}
            async with self.session.post(url, params={"access_token": self.token},
                                         json=payload) as response:
                await response.read()
            index += 1


def _content(event: bytes) -> str:
    data = event.removeprefix(b"data: ")
    if not data or data == b"[DONE]":
        return ""
    choices: list[dict[str, Any]] = json.loads(data)["choices"]
    return str(choices[0]["delta"].get("content") or "") if choices else ""
