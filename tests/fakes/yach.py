"""A fake Yach open platform: token API, app-API sends (deduplicated by message_id, as the
platform does), single-chat sends and a custom robot URL that checks its signature."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from adapters.yach_api import robot_sign
from tests.fakes.base import FakeServer

ROBOT_TOKEN = "robot-token-placeholder"
ROBOT_SECRET = "SEC-robot-secret-placeholder"
APP_KEY = "app-key-placeholder"
APP_SECRET = "app-secret-placeholder"


@dataclass
class Shown:
    """A message as the group or person sees it."""

    route: str
    to: str
    message: dict[str, Any]
    message_id: str | None

    @property
    def text(self) -> str:
        if self.message.get("msgtype") == "markdown":
            return str(self.message["markdown"]["text"])
        return str(self.message["text"]["content"])


@dataclass
class FakeYach:
    """State of the fake platform; `server.url` is the API base and the robot host."""

    server: FakeServer = field(default_factory=lambda: FakeServer(web.Application()))
    shown: list[Shown] = field(default_factory=list)
    seen_message_ids: set[str] = field(default_factory=set)
    tokens_issued: int = 0
    token_lifetime_s: int | str | None = 7200  # what `expired_time` says
    failures: deque[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=deque)
    invalidate_next: int = 0  # answer this many sends with "access_token invalid"
    # once this many messages have shown, the next `failing_times` sends fail (HTTP 500)
    failing_from: int | None = None
    failing_times: int = 0
    holding: int = 0  # the next this many app-API sends are held (`hold_next`)
    held: list[asyncio.Event] = field(default_factory=list)  # one per held send: set it

    async def start(self) -> FakeYach:
        app = self.server.app
        app.router.add_get("/gettoken", self._gettoken)
        app.router.add_post("/group/robot/message/send", self._app_group_send)
        app.router.add_post("/v1/single/message/send", self._single_send)
        app.router.add_post("/robot/send", self._robot_send)
        app.router.add_post("/session/send", self._session_send)
        await self.server.start()
        return self

    async def close(self) -> None:
        for release in self.held:  # a send still held ends, so the server can stop
            release.set()
        await self.server.close()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def robot_url(self) -> str:
        return f"{self.url}/robot/send?access_token={ROBOT_TOKEN}"

    def texts(self) -> list[str]:
        return [shown.text for shown in self.shown]

    def fail_next(self, status: int, body: dict[str, Any] | None = None, times: int = 1,
                  headers: dict[str, str] | None = None) -> None:
        for _ in range(times):
            self.failures.append(
                (status, body or {"code": 500, "msg": "internal error"}, headers or {})
            )

    def hold_next(self, times: int = 1) -> None:
        """The next `times` app-API sends are taken in (a new message_id shows) and then
        held: the answer waits until the test sets the send's event in `held`."""
        self.holding += times

    def fail_after(self, shown: int, times: int) -> None:
        """Once `shown` messages have shown, fail the next `times` sends with HTTP 500."""
        self.failing_from, self.failing_times = shown, times

    def _failure(self) -> web.Response | None:
        if self.failing_from is not None and len(self.shown) >= self.failing_from:
            self.failing_from = None
            self.fail_next(500, times=self.failing_times)
        if not self.failures:
            return None
        status, body, headers = self.failures.popleft()
        return web.json_response(body, status=status, headers=headers)

    async def _gettoken(self, request: web.Request) -> web.Response:
        if (request.query.get("appkey"), request.query.get("appsecret")) != (APP_KEY, APP_SECRET):
            return web.json_response({"code": 40001, "msg": "invalid appkey"})
        self.tokens_issued += 1
        token = f"app-token-{self.tokens_issued}"
        return web.json_response(
            {"code": 200, "obj": {"access_token": token, "expired_time": self.token_lifetime_s}}
        )

    def _token_ok(self, request: web.Request) -> bool:
        return request.query.get("access_token") == f"app-token-{self.tokens_issued}"

    async def _app_send(self, request: web.Request, route: str, to_field: str) -> web.Response:
        failure = self._failure()
        if failure is not None:
            return failure
        if self.invalidate_next or not self._token_ok(request):
            self.invalidate_next = max(self.invalidate_next - 1, 0)
            return web.json_response({"code": 40014, "msg": "access_token invalid or expired"})
        body = await request.json()
        message_id = body["message_id"]
        if message_id not in self.seen_message_ids:
            self.seen_message_ids.add(message_id)
            self.shown.append(Shown(route, body[to_field], json.loads(body["message"]),
                                    message_id))
        if self.holding:
            self.holding -= 1
            release = asyncio.Event()
            self.held.append(release)
            await release.wait()
        return web.json_response({"code": 200, "msg": "ok"})

    async def _app_group_send(self, request: web.Request) -> web.Response:
        return await self._app_send(request, "app", "group_id")

    async def _single_send(self, request: web.Request) -> web.Response:
        return await self._app_send(request, "single", "to_user_id")

    async def _robot_send(self, request: web.Request) -> web.Response:
        failure = self._failure()
        if failure is not None:
            return failure
        query = request.query
        timestamp = query.get("timestamp", "")
        if query.get("access_token") != ROBOT_TOKEN or not timestamp.isdigit():
            return web.json_response({"code": 401, "msg": "bad robot token"})
        if abs(time.time() * 1000 - int(timestamp)) > 3600_000:
            return web.json_response({"code": 401, "msg": "stale timestamp"})
        if query.get("sign") != robot_sign(ROBOT_SECRET, timestamp):
            return web.json_response({"code": 401, "msg": "bad sign"})
        self.shown.append(Shown("robot", "robot", await request.json(), None))
        return web.json_response({"code": 200, "msg": "ok"})

    def session_webhook(self, token: str = "session-token") -> str:
        """A `sessionWebhook` as an inbound message carries it: on the API host."""
        return f"{self.url}/session/send?session={token}"

    async def _session_send(self, request: web.Request) -> web.Response:
        failure = self._failure()
        if failure is not None:
            return failure
        self.shown.append(Shown("session", request.query["session"], await request.json(), None))
        return web.json_response({"code": 200, "msg": "ok"})
