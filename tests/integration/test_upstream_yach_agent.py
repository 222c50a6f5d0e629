"""The yach-agent adapter against a fake Yach open platform: token, chat POST, stream GET.

The failures every adapter meets are in test_upstream_failures.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.events import ConversationRef, Done, ErrorKind, Event, ReasoningDelta, UpstreamError
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamRejected,
    UpstreamUnavailable,
)
from bridge.interfaces import ImageInput, Sender, Turn
from tests.fakes.scripted import answer_text, collect, connect, json_reply, sse_payloads, status
from tests.fakes.yach_agent import (
    ANSWER,
    CHAT,
    CUSTOM_STREAM,
    GETTOKEN,
    INPUTS,
    INVALID_TOKEN,
    STREAM_ID,
    THINK,
    FakeYachAgent,
    answer_frames,
    frame,
)


def turn(text: str = "你是谁", *, work_code: str = "381584",
         conversation: dict[str, str] | None = None,
         images: tuple[ImageInput, ...] = ()) -> Turn:
    return Turn(text=text, sender=Sender("u-9", "Bo", work_code), chat_session_id="yach:g:c:u:9",
                conversation=conversation, images=images, created_at_s=1694500000)


@pytest.fixture(params=[5, 6])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeYachAgent]:
    async with FakeYachAgent(seed=request.param) as server:
        yield server


def posts(fake: FakeYachAgent) -> list[dict[str, object]]:
    return [r.json() for r in fake.server.on(CHAT) if r.method == "POST"]


def stream_reads(fake: FakeYachAgent) -> list[dict[str, str]]:
    return [r.query for r in fake.server.requests if r.method == "GET" and r.path != GETTOKEN]


async def test_answer_reasoning_ref_and_requests_exact(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    events = await collect(connect(http, fake.env()), turn())
    assert events[0] == ConversationRef({"chat_session_id": "cs-1"})
    assert answer_text(events) == ANSWER
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "".join(THINK)
    assert events[-1] == Done()
    (body,) = posts(fake)
    assert body == {
        "access_token": "tok-1",
        "query": "你是谁",
        "biz_id": "381584",
        "inputs": json.dumps(INPUTS, ensure_ascii=False),
        "msg_type": "text",
        "create_at": 1694500000,
    }
    assert json.loads(str(body["inputs"])) == INPUTS
    (read,) = [r for r in fake.server.requests if r.method == "GET" and r.path == CHAT]
    assert read.query == {"stream_id": STREAM_ID, "stream_version": "v2", "access_token": "tok-1"}
    assert read.headers["Accept"] == "text/event-stream"


async def test_chat_session_id_reused_and_token_cached(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    upstream = connect(http, fake.env())
    first = await collect(upstream, turn())
    ref = first[0]
    assert isinstance(ref, ConversationRef)
    second = await collect(upstream, turn("再说一遍", conversation=dict(ref.ref)))
    assert second[0] == ConversationRef({"chat_session_id": "cs-1"})
    assert answer_text(second) == ANSWER
    assert "chat_session_id" not in posts(fake)[0]
    assert posts(fake)[1]["chat_session_id"] == "cs-1"
    assert len(fake.server.on(GETTOKEN)) == 1


async def test_biz_id_falls_back_to_the_configured_one(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    await collect(connect(http, fake.env()), turn(work_code=""))
    assert posts(fake)[0]["biz_id"] == "000000"


async def test_image_text_query(fake: FakeYachAgent, http: UpstreamHTTP) -> None:
    upstream = connect(http, fake.env())
    images = (ImageInput("https://yach-static.zhiyinlou.com/a.png"),
              ImageInput("https://yach-static.zhiyinlou.com/b.png", data_url="data:image/png;x"))
    await collect(upstream, turn("这个图片里有什么内容", images=images))
    await collect(upstream, turn("", images=images[:1]))
    with_text, alone = posts(fake)
    assert with_text["msg_type"] == alone["msg_type"] == "image_text"
    assert with_text["query"] == (
        "这个图片里有什么内容 image::https://yach-static.zhiyinlou.com/a.png:: "
        "image::https://yach-static.zhiyinlou.com/b.png::"
    )
    assert alone["query"] == "image::https://yach-static.zhiyinlou.com/a.png::"


async def test_invalid_token_on_the_post_is_refreshed_once(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    upstream = connect(http, fake.env())
    await collect(upstream, turn())
    fake.expire_tokens()
    events = await collect(upstream, turn())
    assert answer_text(events) == ANSWER
    assert [p["access_token"] for p in posts(fake)] == ["tok-1", "tok-1", "tok-2"]
    assert stream_reads(fake)[-1]["access_token"] == "tok-2"
    assert len(fake.server.on(GETTOKEN)) == 2


async def test_token_still_invalid_after_refresh_is_an_auth_error(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.chat.then(json_reply(INVALID_TOKEN), json_reply(INVALID_TOKEN))
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())
    assert len(posts(fake)) == 2
    assert len(fake.server.on(GETTOKEN)) == 2


async def test_invalid_token_on_the_stream_read_is_refreshed_once(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.script.then(json_reply(INVALID_TOKEN))
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == ANSWER
    assert [q["access_token"] for q in stream_reads(fake)] == ["tok-1", "tok-2"]


async def test_bad_app_credentials_are_an_auth_error(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.gettoken.then(json_reply({"code": 40001, "msg": "appsecret错误"}))
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())
    assert not posts(fake)


async def test_stream_read_5xx_is_retried_then_reported_keeping_the_ref(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.script.then(status(502), status(503), status(500))
    events: list[Event] = []
    with pytest.raises(UpstreamUnavailable):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert events == [ConversationRef({"chat_session_id": "cs-1"})]  # kept although it failed
    assert len(stream_reads(fake)) == 3


async def test_gettoken_5xx_is_unavailable(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.gettoken.then(status(500, {"code": 500, "msg": "busy"}))
    events = await collect(connect(http, fake.env()), turn())  # retried, then fine
    assert answer_text(events) == ANSWER
    fake.gettoken.then(*[status(500, {"code": 500, "msg": "busy"})] * 3)
    # Another process (its own HTTP session: one token cache per process) has no token yet.
    async with aiohttp.ClientSession() as session:
        other = UpstreamHTTP(session, retries=2, backoff_s=0.01)
        with pytest.raises(UpstreamUnavailable):
            await collect(connect(other, fake.env()), turn())
        await other.aclose()


async def test_clean_eof_without_is_finished_is_broken(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.stream = sse_payloads(answer_frames()[:-1])
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert answer_text(events) == ANSWER


async def test_error_frame_ends_the_turn(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    frames = [*answer_frames()[:7], frame("error", "智能体调用失败", finished=True, reason="error")]
    fake.stream = sse_payloads(frames)
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == "我是知音楼数字伙伴"
    assert events[-1] == UpstreamError(ErrorKind.REJECTED, "智能体调用失败")


async def test_rejected_question(fake: FakeYachAgent, http: UpstreamHTTP) -> None:
    fake.chat.then(json_reply({"code": 50010, "msg": "智能体不存在", "obj": None}))
    with pytest.raises(UpstreamRejected, match="智能体不存在"):
        await collect(connect(http, fake.env()), turn())


async def test_server_error_code_of_the_post_is_retried_then_unavailable(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    """A 5xx `code` in the POST's 200 answer is the platform's outage, as HTTP 5xx would be."""
    fake.chat.then(json_reply({"code": 502, "msg": "", "obj": None}))
    assert answer_text(await collect(connect(http, fake.env()), turn())) == ANSWER
    fake.chat.then(*[json_reply({"code": 503, "msg": "", "obj": None})] * 3)
    with pytest.raises(UpstreamUnavailable):
        await collect(connect(http, fake.env()), turn())
    assert len(posts(fake)) == 2 + 3  # the first try and retries=2


async def test_forbidden_code_of_the_post_is_an_auth_error_after_one_fresh_token(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.chat.then(*[json_reply({"code": 403, "msg": "forbidden", "obj": None})] * 2)
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())
    assert [p["access_token"] for p in posts(fake)] == ["tok-1", "tok-2"]


async def test_rate_limit_code_of_the_stream_read_is_retried(
    fake: FakeYachAgent, http: UpstreamHTTP
) -> None:
    fake.script.then(json_reply({"code": 429, "msg": "", "obj": None}))
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == ANSWER
    assert [q["access_token"] for q in stream_reads(fake)] == ["tok-1", "tok-1"]
    assert len(posts(fake)) == 1  # the question was asked once


async def test_configured_stream_url(fake: FakeYachAgent, http: UpstreamHTTP) -> None:
    stream_url = f"{fake.url}{CUSTOM_STREAM}?id={{stream_id}}&v=2"
    events = await collect(
        connect(http, fake.env(BRIDGE_YACH_AGENT_STREAM_URL=stream_url)), turn()
    )
    assert answer_text(events) == ANSWER
    (read,) = fake.server.on(CUSTOM_STREAM)
    assert read.query == {"id": STREAM_ID, "v": "2", "access_token": "tok-1"}
