"""Image questions: turn an entry's images into what the upstream takes (SPEC §7).

`none` refuses images politely; `native` passes their URLs on, unfetched; `vision` fetches
them (under the SSRF guard of `bridge.fetch`) and hands them over as base64 data URLs; `ocr`
transcribes each with an OpenAI-compatible vision model (temperature 0, a fixed prompt);
`autocut+ocr` first splits a paper into question crops with the autocut API, reads the
crops from the URLs it names (through the same guard; `MAX_CROPS` of a paper at most) and
transcribes each. Transcripts
become the question, after the user's own text; with autocut, each is labelled with its
question id, in order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urljoin

import structlog

from bridge.config import Settings
from bridge.fetch import Fetched, FetchError, FetchTooLarge, ImageFetcher, describe
from bridge.http import UpstreamAuthError, UpstreamFailure, UpstreamHTTP, UpstreamProtocolError
from bridge.inbox import Entry
from bridge.interfaces import ImageInput
from bridge.logging import clip
from bridge.messages import Catalogue
from bridge.relay import PreparedInput

__all__ = ["MAX_CROPS", "MAX_IMAGES", "OCR_PROMPT", "OCR_SYSTEM_PROMPT", "Crop", "ImagePipeline"]

log = structlog.get_logger(__name__)

# The transcription prompt of math-graph-external-apis.md, fixed so results are repeatable.
OCR_SYSTEM_PROMPT = "你是一名数学图片文字识别专家。"
OCR_PROMPT = (
    "你的任务是将图片中的文字严格转换为markdown格式的文字，如图中有数学公式，你必须使用$或者$$"
    "进行包裹，生成markdown可解析的latex格式的数学公式，你无需输出其他任何解释性文字，"
    "只需严格输出图片中的文字。"
)
OCR_CONCURRENCY = 4  # crops of one paper transcribed at once
# Images fetched for one message: each may be BRIDGE_MAX_IMAGE_BYTES and all are held at
# once, so `image::URL::` markers, bounded only by the webhook body, must be counted.
MAX_IMAGES = 5
# Question crops read of one paper: the seed's paper has 14 questions, so twice that and
# more is no paper but an autocut API gone wrong (each crop costs a fetch and an OCR call).
MAX_CROPS = 30
_T = TypeVar("_T")


class _Refusal(Exception):
    """The image step failed in a way the user is told about with `key`."""

    def __init__(self, key: str, **values: object) -> None:
        super().__init__(key)
        self.key = key
        self.values = values


@dataclass(frozen=True, slots=True)
class Crop:
    """One question cut out of a paper by autocut."""

    question_id: str
    url: str


class ImagePipeline:
    """Prepares the question of an entry according to BRIDGE_IMAGE_PIPELINE."""

    def __init__(
        self,
        settings: Settings,
        http: UpstreamHTTP | None = None,
        catalogue: Catalogue | None = None,
        *,
        fetcher: ImageFetcher | None = None,
    ) -> None:
        self.mode = settings.resolved_image_pipeline
        self.settings = settings
        self.http = http
        self.catalogue = catalogue or Catalogue(settings.lang)
        self.fetcher = fetcher or ImageFetcher(
            allow_hosts=settings.fetch_allow_hosts,
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=settings.upstream_connect_timeout_s or 10.0,
        )

    async def prepare(self, entry: Entry) -> PreparedInput:
        message = entry.message
        urls = message.image_urls
        if not urls:
            return PreparedInput(message.text)
        if self.mode == "native":
            return PreparedInput(message.text, tuple(ImageInput(url) for url in urls))
        if self.mode not in ("vision", "ocr", "autocut+ocr"):
            return PreparedInput(message.text, refusal="image_refused")
        if len(urls) > MAX_IMAGES:
            return PreparedInput(
                message.text, refusal="image_too_many", refusal_values={"limit": MAX_IMAGES}
            )
        try:
            return await self._prepare(message.text, urls)
        except _Refusal as refusal:
            return PreparedInput(message.text, refusal=refusal.key, refusal_values=refusal.values)

    async def _prepare(self, text: str, urls: Sequence[str]) -> PreparedInput:
        images = [await self._fetch(url) for url in urls]
        if self.mode == "vision":
            inputs = tuple(ImageInput(image.url, image.data_url) for image in images)
            return PreparedInput(text, inputs)
        if self.mode == "ocr":
            transcripts = await _gather_bounded([partial(self._ocr, i) for i in images])
            return PreparedInput(_question(text, transcripts))
        return PreparedInput(_question(text, await self._autocut_and_ocr(images)))

    # Steps

    async def _fetch(self, url: str) -> Fetched:
        try:
            return await self.fetcher.fetch(url)
        except FetchTooLarge as exc:
            log.info("image_too_large", **describe(exc))
            raise _Refusal("image_too_large", limit=Catalogue.size(exc.limit_bytes)) from exc
        except FetchError as exc:
            log.warning("image_fetch_failed", **describe(exc))
            raise _Refusal("image_failed") from exc

    async def _autocut_and_ocr(self, papers: Sequence[Fetched]) -> list[str]:
        """The labelled transcripts of every paper's crops, `MAX_CROPS` of each at most."""
        cuts = [await self._autocut(paper) for paper in papers]
        named = sum(len(crops) for crops in cuts)
        kept = [crops[:MAX_CROPS] for crops in cuts]
        if (read := sum(len(crops) for crops in kept)) < named:
            log.warning("autocut_crops_capped", crops=named, read=read, cap=MAX_CROPS)
        sections: list[str] = []
        for paper, crops in zip(papers, kept, strict=True):
            sections += await self._read_paper(paper, crops)
        return sections

    async def _read_paper(self, paper: Fetched, crops: Sequence[Crop]) -> list[str]:
        if not crops:  # not a paper of questions: read the whole image
            return [await self._ocr(paper)]
        transcripts = await _gather_bounded([partial(self._read_crop, crop) for crop in crops])
        label = self.catalogue
        return [
            f"{label('question_label', id=crop.question_id)}\n{transcript}"
            for crop, transcript in zip(crops, transcripts, strict=True)
        ]

    async def _read_crop(self, crop: Crop) -> str:
        return await self._ocr(await self._fetch(crop.url))

    async def _autocut(self, paper: Fetched) -> list[Crop]:
        base = self.settings.autocut_url or ""
        body, content_type = _multipart(paper)
        headers = {"Content-Type": content_type}
        if self.settings.autocut_token:
            headers["Authorization"] = f"Bearer {self.settings.autocut_token}"
        answer = await self._call("autocut", f"{base}/detect", data=body, headers=headers)
        if not isinstance(answer, Mapping) or answer.get("success") is not True:
            message = answer.get("message") if isinstance(answer, Mapping) else None
            log.warning("autocut_refused", reason=clip(str(message or answer), 200))
            raise _Refusal("image_failed")
        return crops_from(answer, base)

    async def _ocr(self, image: Fetched) -> str:
        settings = self.settings
        body = {
            "model": settings.ocr_model,
            "messages": [
                {"role": "system", "content": OCR_SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": OCR_PROMPT},
                        {"type": "image_url", "image_url": {"url": image.data_url}},
                    ],
                },
            ],
            "temperature": 0,
        }
        headers = (
            {"Authorization": f"Bearer {settings.ocr_api_key}"} if settings.ocr_api_key else {}
        )
        url = f"{settings.ocr_base_url}/chat/completions"
        answer = await self._call("ocr", url, json=body, headers=headers)
        return _transcript(answer)

    async def _call(self, service: str, url: str, **kwargs: Any) -> Any:
        if self.http is None:
            raise _Refusal("image_service_failed")
        try:
            return await self.http.json("POST", url, **kwargs)
        except UpstreamFailure as exc:
            level = log.error if isinstance(exc, UpstreamAuthError) else log.warning
            level("image_service_failed", service=service, kind=exc.kind.value, detail=exc.message)
            raise _Refusal("image_service_failed") from exc


def crops_from(answer: Mapping[str, Any], base: str) -> list[Crop]:
    """The question crops of an autocut answer, ordered by question id.

    A crop names its `url` (absolute, or relative to the autocut base) or, as the API of
    math-graph-external-apis.md does, its `filename` under `{base}/files/{session_id}/`.
    """
    raw = answer.get("data")
    data: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    results = data.get("crop_results")
    items = results.get("cropped_images") if isinstance(results, Mapping) else None
    session = str(data.get("session_id") or "")
    crops: list[tuple[int, int, Crop]] = []
    for position, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, Mapping):
            continue
        url = _crop_url(item, base, session)
        if url is None:
            continue
        question_id = item.get("question_id", position + 1)
        order = question_id if isinstance(question_id, int) else position + 1
        crops.append((order, position, Crop(str(question_id), url)))
    return [crop for _, _, crop in sorted(crops, key=lambda c: (c[0], c[1]))]


def _crop_url(item: Mapping[str, Any], base: str, session: str) -> str | None:
    url = item.get("url")
    if isinstance(url, str) and url:
        return urljoin(base.rstrip("/") + "/", url.lstrip("/"))
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename or not session:
        return None
    return f"{base.rstrip('/')}/files/{quote(session, safe='')}/{quote(filename, safe='')}"


def _transcript(answer: Any) -> str:
    """The text of a chat.completion answer (a string, or a list of text parts)."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        log.warning("image_service_failed", service="ocr", detail=clip(str(answer), 200))
        raise _Refusal("image_service_failed") from UpstreamProtocolError(str(exc))
    if isinstance(content, list):
        content = "".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping)
        )
    return str(content or "").strip()


def _question(text: str, transcripts: Sequence[str]) -> str:
    return "\n\n".join(part for part in (text.strip(), *transcripts) if part.strip())


def _multipart(image: Fetched) -> tuple[bytes, str]:
    """The autocut form (`image` file, `enable_error_detection=false`) as bytes, so a
    retried request resends exactly the same body."""
    boundary = uuid.uuid4().hex
    extension = image.content_type.partition("/")[2] or "png"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="image.{extension}"\r\nContent-Type: {image.content_type}\r\n\r\n'
        ).encode()
        + image.data
        + b"\r\n",
        (
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="enable_error_detection"\r\n\r\nfalse\r\n'
        ).encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def _gather_bounded(calls: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
    """Run the calls at most OCR_CONCURRENCY at a time; results in order. The first
    failure cancels the others and is raised as it is."""
    slots = asyncio.Semaphore(OCR_CONCURRENCY)

    async def run(call: Callable[[], Awaitable[_T]]) -> _T:
        async with slots:
            return await call()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(call)) for call in calls]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]
