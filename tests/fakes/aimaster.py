"""A fake AI Master scenario API serving the recorded fixture, re-chunked at random."""

from __future__ import annotations

import asyncio
import random

from aiohttp import web

from tests.fakes.base import FIXTURES, FakeServer
from tests.fakes.scripted import Reply, Script, sse_reply

FIXTURE = FIXTURES / "aimaster-scenario.sse"
ENV_PREFIX = "/dev-api"
PATH = ENV_PREFIX + "/aimaster/scenario/open/api"


class FakeAimaster:
    """`POST {base}/aimaster/scenario/open/api`; the fixture unless a test scripts otherwise."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.release = asyncio.Event()
        self.script = Script(self.fixture())
        app = web.Application()
        app.router.add_post(PATH, self.script.handle)
        self.server = FakeServer(app)

    async def start(self) -> FakeAimaster:
        await self.server.start()
        return self

    async def close(self) -> None:
        self.release.set()
        await self.server.close()

    @property
    def base_url(self) -> str:
        return self.server.url + ENV_PREFIX

    def fixture(self, *, cut_after: int | None = None, stall_after: int | None = None) -> Reply:
        return self.stream(FIXTURE.read_bytes(), cut_after=cut_after, stall_after=stall_after)

    def stream(
        self, data: bytes, *, cut_after: int | None = None, stall_after: int | None = None
    ) -> Reply:
        return sse_reply(
            data, self.rng, cut_after=cut_after, stall_after=stall_after, release=self.release
        )
