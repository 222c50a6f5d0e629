"""Running a real bridge in tests: its environment, signed webhooks, and waiting for replies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.yach_api import robot_sign
from bridge.app import STATE, Bridge, build_app, drain
from bridge.config import load_settings
from bridge.outbox import SEND_BACKOFF_S
from tests.fakes import yach as fake_yach

WEBHOOK_SECRET = "SEC-webhook-secret-placeholder"


def bridge_env(
    redis_url: str, bot_id: str, yach: fake_yach.FakeYach, **extra: str
) -> dict[str, str]:
    """The environment of a bridge talking to the fakes; `extra` overrides or adds."""
    env = {
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_BOT_ID": bot_id,
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": "0",
        "BRIDGE_YACH_SECRET": WEBHOOK_SECRET,
        "BRIDGE_YACH_ROBOT_URL": yach.robot_url,
        "BRIDGE_YACH_ROBOT_SECRET": fake_yach.ROBOT_SECRET,
        "BRIDGE_YACH_API_BASE": yach.url,
        "BRIDGE_YACH_SEND_RATE": "0",
        "BRIDGE_USER_RATE": "0",
        "BRIDGE_THINKING_NOTICE_S": "0",
        "BRIDGE_REPLY_MODE": "final",
        "BRIDGE_CLAIM_IDLE_S": "2",
        "BRIDGE_LOG_LEVEL": "warning",
    }
    env.update(extra)
    return {key: value for key, value in env.items() if value != ""}


def openai_env(base_url: str) -> dict[str, str]:
    return {
        "BRIDGE_UPSTREAM": "openai",
        "BRIDGE_OPENAI_BASE_URL": base_url,
        "BRIDGE_OPENAI_API_KEY": "sk-test-placeholder",
        "BRIDGE_OPENAI_MODEL": "fake-model",
    }


def signed_headers(secret: str = WEBHOOK_SECRET, now_ms: int | None = None) -> dict[str, str]:
    """Headers as Yach sends them, signed with the production signer."""
    timestamp = str(now_ms if now_ms is not None else int(time.time() * 1000))
    return {"timestamp": timestamp, "sign": robot_sign(secret, timestamp)}


def group_message(
    text: str,
    *,
    msg_id: str | None = None,
    sender: str = "u1",
    group: str = "g1",
    work_code: str = "W001",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "msgId": msg_id or uuid.uuid4().hex,
        "msgtype": "text",
        "text": {"content": f"@bot {text}"},
        "senderId": sender,
        "senderNick": "Tester",
        "senderStaffId": work_code,
        "conversationId": group,
        "conversationType": "2",
        **extra,
    }


class RunningBridge:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def bridge(self) -> Bridge:
        return self.server.app[STATE]

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def post(
        self, payload: dict[str, Any] | bytes | str, *, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        if isinstance(payload, dict):
            data: bytes | str = json.dumps(payload, ensure_ascii=False)
            content_type = "application/json"
        else:
            data, content_type = payload, "application/x-www-form-urlencoded"
        all_headers = {
            "Content-Type": content_type,
            **(signed_headers() if headers is None else headers),
        }
        async with self.session.post(
            f"{self.url}/webhook/yach", data=data, headers=all_headers
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except json.JSONDecodeError:
                return response.status, text


@asynccontextmanager
async def running_bridge(
    env: dict[str, str], *, send_backoff_s: float = SEND_BACKOFF_S
) -> AsyncIterator[RunningBridge]:
    """A bridge application served on loopback, drained and closed on exit; `send_backoff_s`
    (the outbox's first wait after a failed send) as `build_app` takes it."""
    settings = load_settings(env, command="run")
    app = build_app(settings, send_backoff_s=send_backoff_s)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield RunningBridge(server, session)
    finally:
        await drain(app)
        await server.close()


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll a condition on the fakes' state; fail the test after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_recorded(client: redis.asyncio.Redis, session_key: str, turns: int) -> None:
    """Wait until the session hash at `session_key` counts `turns` recorded turns (the
    record follows the last piece's send: a test that reads the session after seeing the
    answer waits for it)."""
    for _ in range(500):
        if await client.hget(session_key, "turns") == str(turns).encode():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{session_key} never counted {turns} turns")


async def stop_after_first(
    events: AsyncIterator[Any], is_first: Callable[[Any], bool] = lambda _: True
) -> None:
    """Read `events` in a task of their own until the first one `is_first` accepts, then
    cancel that task, as `/stop` cancels a turn."""
    first = asyncio.Event()

    async def read() -> None:
        async for event in events:
            if is_first(event):
                first.set()

    reading = asyncio.create_task(read())
    await asyncio.wait_for(first.wait(), 5)
    reading.cancel()
    try:
        await reading
    except asyncio.CancelledError:
        return
    raise AssertionError("the reading ended before it was cancelled")


def slowed_script_load(client: redis.asyncio.Redis) -> asyncio.Event:
    """The client's SCRIPT LOAD, answered a little late (as when the retry that follows it
    waits for a connection of the pool); the event is set once the script is loaded."""
    real_load, loaded = client.script_load, asyncio.Event()

    async def script_load(body: str) -> str:
        sha = await real_load(body)
        loaded.set()
        await asyncio.sleep(0.05)
        return str(sha)

    client.script_load = script_load  # type: ignore[method-assign]
    return loaded


__all__ = [
    "WEBHOOK_SECRET",
    "RunningBridge",
    "bridge_env",
    "group_message",
    "openai_env",
    "running_bridge",
    "signed_headers",
    "slowed_script_load",
    "wait_until",
    "web",
]
