"""A fake image host: named images, redirects, big and slow bodies, errors.

Images are tiny byte strings that start with the PNG signature followed by a label, so the
fake OCR can tell which image it was given (`label_of`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes.base import FakeServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(label: str, size: int = 0) -> bytes:
    """An "image" carrying `label`, padded to `size` bytes when asked."""
    data = PNG_SIGNATURE + label.encode() + b"\x00"
    return data + b"\x00" * max(size - len(data), 0)


def label_of(data: bytes) -> str:
    """The label of an image made by `png` ("" for anything else)."""
    if not data.startswith(PNG_SIGNATURE):
        return ""
    return data[len(PNG_SIGNATURE) :].split(b"\x00", 1)[0].decode()


@dataclass
class FakeImages:
    """`GET /img/<name>` serves `images[name]`; `/redirect?to=…` answers 302;
    `/chunked/<name>` serves without Content-Length; `/slow/<name>` stalls first."""

    images: dict[str, bytes] = field(default_factory=dict)
    content_type: str = "image/png"
    stall_s: float = 5.0
    server: FakeServer = field(default_factory=lambda: FakeServer(web.Application()))

    async def start(self) -> FakeImages:
        router = self.server.app.router
        router.add_get("/img/{name}", self._image)
        router.add_get("/chunked/{name}", self._chunked)
        router.add_get("/slow/{name}", self._slow)
        router.add_get("/redirect", self._redirect)
        router.add_get("/missing", self._missing)
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return self.server.url

    def add(self, name: str, data: bytes | None = None) -> str:
        """Serve `data` (default: an image labelled `name`); its URL."""
        self.images[name] = data if data is not None else png(name)
        return f"{self.url}/img/{name}"

    def _data(self, request: web.Request) -> bytes:
        name = request.match_info["name"]
        if name not in self.images:
            raise web.HTTPNotFound()
        return self.images[name]

    async def _image(self, request: web.Request) -> web.Response:
        return web.Response(body=self._data(request), content_type=self.content_type)

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        data = self._data(request)
        response = web.StreamResponse(headers={"Content-Type": self.content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 1024):
            await response.write(data[start : start + 1024])
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.stall_s)
        return web.Response(body=self._data(request), content_type=self.content_type)

    async def _redirect(self, request: web.Request) -> web.Response:
        # The Location as given, unchecked (HTTPFound refuses a malformed one).
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def _missing(self, request: web.Request) -> web.Response:
        raise web.HTTPNotFound()
