"""Image questions through BRIDGE_IMAGE_PIPELINE, end to end (SPEC §7, §8).

The fake image host, OCR and autocut servers listen on 127.0.0.1: the happy paths
allow-list it (BRIDGE_FETCH_ALLOW_HOSTS), and without the allow-list the same URLs are
refused; a URL at 10.0.0.1 is refused whatever its scheme.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from bridge.config import load_settings
from bridge.images import MAX_CROPS, MAX_IMAGES, OCR_PROMPT, OCR_SYSTEM_PROMPT, ImagePipeline
from bridge.inbox import Entry, EntryKind
from bridge.interfaces import ImageInput, InboundMessage, Sender
from bridge.messages import MESSAGES
from tests.fakes import autocut as fake_autocut
from tests.fakes import ocr as fake_ocr
from tests.fakes import yach as fake_yach
from tests.fakes.autocut import FakeAutocut
from tests.fakes.images import FakeImages, png
from tests.fakes.ocr import FakeOCR
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

ZH = MESSAGES["zh"]



@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI(answer=lambda body: "Answered.").start()
    yield fake
    await fake.close()


@pytest.fixture
async def images() -> AsyncIterator[FakeImages]:
    fake = await FakeImages().start()
    yield fake
    await fake.close()


@pytest.fixture
async def ocr() -> AsyncIterator[FakeOCR]:
    fake = await FakeOCR().start()
    yield fake
    await fake.close()


@pytest.fixture
async def autocut() -> AsyncIterator[FakeAutocut]:
    fake = await FakeAutocut().start()
    yield fake
    await fake.close()


def env(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, pipeline: str,
        **extra: str) -> dict[str, str]:
    return bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                      BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
                      BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
                      BRIDGE_IMAGE_PIPELINE=pipeline, BRIDGE_UPSTREAM_RETRIES="0", **extra)


def ocr_env(ocr: FakeOCR) -> dict[str, str]:
    return {"BRIDGE_OCR_BASE_URL": ocr.base_url, "BRIDGE_OCR_API_KEY": fake_ocr.API_KEY,
            "BRIDGE_OCR_MODEL": fake_ocr.MODEL}


ALLOW = {"BRIDGE_FETCH_ALLOW_HOSTS": "127.0.0.1"}


def image_message(url: str, text: str = "") -> dict[str, Any]:
    return group_message(text, msgtype="image", picUrl=url)


def marker_message(url: str, text: str) -> dict[str, Any]:
    return group_message(f"{text} image::{url}::", msgtype="image_text")


def question(upstream: FakeOpenAI) -> Any:
    return upstream.bodies[-1]["messages"][-1]["content"]


async def run(env: dict[str, str], yach: FakeYach, payload: dict[str, Any]) -> None:
    async with running_bridge(env) as bridge:
        status, _ = await bridge.post(payload)
        assert status == 200
        await wait_until(lambda: len(yach.shown) >= 1)


async def test_none_refuses_images_politely(redis_url: str, bot_id: str, yach: FakeYach,
                                            upstream: FakeOpenAI, images: FakeImages,
                                            redis_client: object) -> None:
    url = images.add("paper")
    await run(env(redis_url, bot_id, yach, upstream, "none"), yach, image_message(url))
    assert yach.texts() == [ZH["image_refused"]]
    assert upstream.bodies == [] and images.server.requests == []


async def test_vision_passes_the_image_as_a_data_url(redis_url: str, bot_id: str,
                                                     yach: FakeYach, upstream: FakeOpenAI,
                                                     images: FakeImages,
                                                     redis_client: object) -> None:
    url = images.add("cat")
    await run(env(redis_url, bot_id, yach, upstream, "vision", **ALLOW), yach,
              marker_message(url, "这是什么？"))
    data_url = "data:image/png;base64," + base64.b64encode(png("cat")).decode()
    assert question(upstream) == [
        {"type": "text", "text": "这是什么？"},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]
    assert yach.texts() == ["Answered."]


@pytest.mark.parametrize("allow", [{}, {"BRIDGE_FETCH_ALLOW_HOSTS": "images.example"}])
async def test_a_loopback_url_is_refused_unless_allow_listed(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, images: FakeImages,
    redis_client: object, allow: dict[str, str]
) -> None:
    url = images.add("cat")
    await run(env(redis_url, bot_id, yach, upstream, "vision", **allow), yach, image_message(url))
    assert yach.texts() == [ZH["image_failed"]]
    assert images.server.requests == [] and upstream.bodies == []


@pytest.mark.parametrize("url", ["https://10.0.0.1/paper.png", "http://10.0.0.1/paper.png",
                                 "https://127.0.0.1/paper.png"])
async def test_a_private_address_is_refused(redis_url: str, bot_id: str, yach: FakeYach,
                                            upstream: FakeOpenAI, ocr: FakeOCR,
                                            redis_client: object, url: str) -> None:
    await run(env(redis_url, bot_id, yach, upstream, "ocr", **ocr_env(ocr)), yach,
              image_message(url))
    assert yach.texts() == [ZH["image_failed"]]
    assert ocr.bodies == [] and upstream.bodies == []


@pytest.mark.parametrize("url", ["https://[::1/paper.png", "https://a..example/paper.png"])
async def test_a_malformed_image_url_is_answered_at_once(redis_url: str, bot_id: str,
                                                         yach: FakeYach, upstream: FakeOpenAI,
                                                         redis_client: object, url: str) -> None:
    """Not an exception that leaves the entry pending, to be retried and dead-lettered."""
    await run(env(redis_url, bot_id, yach, upstream, "vision"), yach, image_message(url))
    assert yach.texts() == [ZH["image_failed"]]
    assert upstream.bodies == []


async def test_too_many_images_are_refused_before_any_fetch(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, images: FakeImages,
    redis_client: object
) -> None:
    """`image::URL::` markers are bounded only by the webhook body; each image may be
    BRIDGE_MAX_IMAGE_BYTES and all are held at once."""
    markers = " ".join(f"image::{images.add(f'p{n}')}::" for n in range(MAX_IMAGES + 1))
    await run(env(redis_url, bot_id, yach, upstream, "vision", **ALLOW), yach,
              group_message(f"这些是什么？ {markers}", msgtype="image_text"))
    assert yach.texts() == [ZH["image_too_many"].format(limit=MAX_IMAGES)]
    assert images.server.requests == [] and upstream.bodies == []


async def test_an_image_too_large(redis_url: str, bot_id: str, yach: FakeYach,
                                  upstream: FakeOpenAI, images: FakeImages,
                                  redis_client: object) -> None:
    url = images.add("huge", png("huge", size=4096))
    await run(env(redis_url, bot_id, yach, upstream, "vision", BRIDGE_MAX_IMAGE_BYTES="2048",
                  **ALLOW), yach, image_message(url))
    assert yach.texts() == ["图片太大了（上限 2 KB），请压缩后再发。"]
    assert upstream.bodies == []


async def test_ocr_transcript_becomes_the_question(redis_url: str, bot_id: str,
                                                   yach: FakeYach, upstream: FakeOpenAI,
                                                   images: FakeImages, ocr: FakeOCR,
                                                   redis_client: object) -> None:
    ocr.transcripts["q12"] = "12. 已知集合 $A=\\{1, 2, 4, 8\\}$，求 $B$。"
    url = images.add("q12")
    await run(env(redis_url, bot_id, yach, upstream, "ocr", **ocr_env(ocr), **ALLOW), yach,
              marker_message(url, "请解答"))
    assert question(upstream) == "请解答\n\n12. 已知集合 $A=\\{1, 2, 4, 8\\}$，求 $B$。"
    body = ocr.bodies[0]
    assert body["model"] == fake_ocr.MODEL and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": OCR_SYSTEM_PROMPT}
    assert body["messages"][1]["content"][0] == {"type": "text", "text": OCR_PROMPT}
    assert yach.texts() == ["Answered."]


async def test_autocut_then_ocr_of_each_question(redis_url: str, bot_id: str, yach: FakeYach,
                                                 upstream: FakeOpenAI, images: FakeImages,
                                                 ocr: FakeOCR, autocut: FakeAutocut,
                                                 redis_client: object) -> None:
    autocut.question_ids = [2, 1, 3]  # answered out of order: the question ids decide
    ocr.transcripts.update({"paper-q1": "1. 计算 $1+1$。", "paper-q2": "2. 解方程 $x^2=4$。",
                            "paper-q3": "3. 化简 $\\frac{2}{4}$。"})
    url = images.add("paper")
    await run(env(redis_url, bot_id, yach, upstream, "autocut+ocr", **ocr_env(ocr), **ALLOW,
                  BRIDGE_AUTOCUT_URL=autocut.url, BRIDGE_AUTOCUT_TOKEN=fake_autocut.TOKEN),
              yach, image_message(url, "批改这张卷子"))
    assert autocut.papers == ["paper"]
    assert autocut.forms == [{"enable_error_detection": "false"}]
    assert sorted(autocut.crops_fetched()) == ["paper-q1.jpg", "paper-q2.jpg", "paper-q3.jpg"]
    assert sorted(ocr.labels()) == ["paper-q1", "paper-q2", "paper-q3"]
    assert question(upstream) == (
        "批改这张卷子\n\n"
        "第 1 题：\n1. 计算 $1+1$。\n\n"
        "第 2 题：\n2. 解方程 $x^2=4$。\n\n"
        "第 3 题：\n3. 化简 $\\frac{2}{4}$。"
    )
    assert yach.texts() == ["Answered."]


async def test_autocut_naming_too_many_crops_is_read_up_to_the_cap(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, images: FakeImages,
    ocr: FakeOCR, autocut: FakeAutocut, redis_client: object
) -> None:
    autocut.question_ids = list(range(MAX_CROPS + 10, 0, -1))  # the first ones by id are kept
    url = images.add("paper")
    with capture_logs() as logs:
        await run(env(redis_url, bot_id, yach, upstream, "autocut+ocr", **ocr_env(ocr),
                      **ALLOW, BRIDGE_AUTOCUT_URL=autocut.url,
                      BRIDGE_AUTOCUT_TOKEN=fake_autocut.TOKEN),
                  yach, image_message(url))
    kept = [f"paper-q{n}" for n in range(1, MAX_CROPS + 1)]
    assert len(ocr.bodies) == MAX_CROPS and sorted(ocr.labels()) == sorted(kept)
    assert sorted(autocut.crops_fetched()) == sorted(f"{label}.jpg" for label in kept)
    assert f"第 {MAX_CROPS} 题" in question(upstream)
    assert f"第 {MAX_CROPS + 1} 题" not in question(upstream)
    capped = [e for e in logs if e["event"] == "autocut_crops_capped"]
    assert [(e["crops"], e["read"], e["cap"]) for e in capped] == [
        (MAX_CROPS + 10, MAX_CROPS, MAX_CROPS)
    ]
    assert yach.texts() == ["Answered."]


async def test_autocut_crops_at_private_addresses_are_refused(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, images: FakeImages,
    ocr: FakeOCR, autocut: FakeAutocut, redis_client: object
) -> None:
    autocut.crop_url = "https://10.0.0.1/crop.jpg"
    url = images.add("paper")
    await run(env(redis_url, bot_id, yach, upstream, "autocut+ocr", **ocr_env(ocr), **ALLOW,
                  BRIDGE_AUTOCUT_URL=autocut.url, BRIDGE_AUTOCUT_TOKEN=fake_autocut.TOKEN),
              yach, image_message(url))
    assert yach.texts() == [ZH["image_failed"]]
    assert ocr.bodies == [] and upstream.bodies == []


async def test_autocut_refusing_the_file(redis_url: str, bot_id: str, yach: FakeYach,
                                         upstream: FakeOpenAI, images: FakeImages,
                                         ocr: FakeOCR, autocut: FakeAutocut,
                                         redis_client: object) -> None:
    autocut.refuse = "不支持的文件格式"
    url = images.add("paper")
    await run(env(redis_url, bot_id, yach, upstream, "autocut+ocr", **ocr_env(ocr), **ALLOW,
                  BRIDGE_AUTOCUT_URL=autocut.url, BRIDGE_AUTOCUT_TOKEN=fake_autocut.TOKEN),
              yach, image_message(url))
    assert yach.texts() == [ZH["image_failed"]]


@pytest.mark.parametrize("statuses", [[500], [401]], ids=["5xx", "auth"])
async def test_the_ocr_service_failing(redis_url: str, bot_id: str, yach: FakeYach,
                                       upstream: FakeOpenAI, images: FakeImages, ocr: FakeOCR,
                                       redis_client: object, statuses: list[int]) -> None:
    ocr.statuses = statuses
    url = images.add("q1")
    await run(env(redis_url, bot_id, yach, upstream, "ocr", **ocr_env(ocr), **ALLOW), yach,
              image_message(url))
    assert yach.texts() == [ZH["image_service_failed"]]
    assert upstream.bodies == []


async def test_native_passes_urls_on_unfetched(images: FakeImages) -> None:
    url = images.add("photo")
    settings = load_settings({"BRIDGE_IMAGE_PIPELINE": "native"}, command="demo")
    message = InboundMessage("m1", "看图", Sender("u1"), "g1", False, "image_text", (url,))
    entry = Entry("1-0", message, EntryKind.TURN, "yach:g:g1:u:u1", 1)
    prepared = await ImagePipeline(settings).prepare(entry)
    assert prepared.text == "看图"
    assert prepared.images == (ImageInput(url),)
    assert not prepared.refusal
    assert images.server.requests == []
