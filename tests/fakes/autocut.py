"""A fake paper-splitting (autocut) API, as math-graph-external-apis.md describes it.

`POST /autocut/detect` takes a multipart form (`image` file, `enable_error_detection`) and
answers with the question crops of the paper; the crops are served at
`GET /autocut/files/<session_id>/<filename>`. A crop made for the paper labelled `P` and
question `n` is an image labelled `P-q<n>`, so the fake OCR can tell them apart.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.images import label_of, png

TOKEN = "autocut-token-placeholder"
SESSION_ID = "20251125_082929_f1975f5c"
PREFIX = "/autocut"


def parse_form(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (the recorder has read the stream already,
    so the standard library parses the bytes)."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    raw = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body
    message = BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload
    return fields


@dataclass
class FakeAutocut:
    question_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    token: str | None = TOKEN  # None: no Authorization expected
    refuse: str | None = None  # answer `{"success": false, "message": refuse}`
    crop_url: str | None = None  # answer crops with this `url` instead of a filename
    server: FakeServer = field(default_factory=lambda: FakeServer(web.Application()))
    papers: list[str] = field(default_factory=list)  # labels of the papers received
    forms: list[dict[str, str]] = field(default_factory=list)  # the non-file fields

    async def start(self) -> FakeAutocut:
        router = self.server.app.router
        router.add_post(f"{PREFIX}/detect", self._detect)
        router.add_get(f"{PREFIX}/files/{{session}}/{{filename}}", self._file)
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return self.server.url + PREFIX

    def crops_fetched(self) -> list[str]:
        return [r.path.rsplit("/", 1)[1] for r in self.server.requests if "/files/" in r.path]

    async def _detect(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"message": "unauthorized", "success": False}, status=401)
        fields = parse_form(request.headers.get("Content-Type", ""), await request.read())
        image = fields.pop("image", None)
        if image is None:
            return web.json_response({"message": "没有上传图片文件", "success": False})
        self.forms.append({k: v.decode() for k, v in fields.items()})
        paper = label_of(image)
        self.papers.append(paper)
        if self.refuse:
            return web.json_response({"message": self.refuse, "success": False})
        return web.json_response(self._answer(paper))

    def _answer(self, paper: str) -> dict[str, Any]:
        images = []
        for question_id in self.question_ids:
            item: dict[str, Any] = {"bbox": [970, 69, 1909, 246], "question_id": question_id,
                                    "vertical_id": question_id}
            if self.crop_url:
                item["url"] = self.crop_url
            else:
                item["filename"] = f"{paper}-q{question_id}.jpg"
            images.append(item)
        return {
            "data": {
                "crop_results": {"cropped_count": len(images), "cropped_images": images,
                                 "mode": "all_questions", "zip_url": f"/download/{SESSION_ID}"},
                "error_count": 0,
                "error_details": [],
                "question_count": len(images),
                "session_id": SESSION_ID,
                "visualization_images": {},
            },
            "success": True,
        }

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["session"] != SESSION_ID:
            raise web.HTTPNotFound()
        filename = request.match_info["filename"]
        return web.Response(body=png(filename.removesuffix(".jpg")), content_type="image/jpeg")
