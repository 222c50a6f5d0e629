"""The webhook's contract (SPEC §4): 401, 413, 400, 503 and 200, in that order of checks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, urlencode

import pytest

from bridge.app import drain
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import (
    WEBHOOK_SECRET,
    RunningBridge,
    bridge_env,
    group_message,
    openai_env,
    running_bridge,
    signed_headers,
    wait_until,
)


@pytest.fixture
async def bridge(redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
                 redis_client: object) -> AsyncIterator[RunningBridge]:
    env = bridge_env(redis_url, bot_id, yach, BRIDGE_MAX_BODY_BYTES="4096",
                     **openai_env(upstream.base_url))
    async with running_bridge(env) as running:
        yield running


async def inbox_length(bridge: RunningBridge) -> int:
    assert bridge.bridge.redis is not None
    return int(await bridge.bridge.redis.xlen(bridge.bridge.keys.inbox))


async def test_signed_message_is_acknowledged_and_answered(bridge: RunningBridge,
                                                           yach: FakeYach) -> None:
    status, body = await bridge.post(group_message("hello"))
    assert (status, body) == (200, {"code": 200, "msg": "ok"})
    await wait_until(lambda: len(yach.shown) == 1)
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
    assert yach.shown[0].route == "robot"
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W001"]}


async def test_the_ok_answer_is_spec_s_body_byte_for_byte(bridge: RunningBridge) -> None:
    """SPEC §4 writes the answer out: `200 {"code":200,"msg":"ok"}`. A platform (or a
    black-box check) may compare the bytes, not the JSON they parse to."""
    data = json.dumps(group_message("exact"))
    headers = {"Content-Type": "application/json", **signed_headers()}
    async with bridge.session.post(f"{bridge.url}/webhook/yach", data=data,
                                   headers=headers) as response:
        assert (response.status, await response.read()) == (200, b'{"code":200,"msg":"ok"}')
        assert response.content_type == "application/json"


def _tampered() -> dict[str, str]:
    headers = signed_headers()
    return {**headers, "sign": "AAAA" + headers["sign"][4:]}


@pytest.mark.parametrize(
    "make_headers",
    [
        dict,
        lambda: {"timestamp": str(int(time.time() * 1000))},
        lambda: signed_headers("SEC-some-other-secret"),
        _tampered,
        lambda: signed_headers(now_ms=int((time.time() - 310) * 1000)),
        lambda: signed_headers(now_ms=int((time.time() + 310) * 1000)),
        lambda: {**signed_headers(), "timestamp": "\u00b2"},
        lambda: {**signed_headers(), "timestamp": "9" * 5000},
        lambda: {**signed_headers(), "sign": "\u00e9"},
    ],
    ids=["no-headers", "no-sign", "wrong-secret", "tampered", "stale", "future",
         "superscript-digit", "digits-beyond-int", "non-ascii-sign"],
)
async def test_bad_or_stale_signature_is_401_and_nothing_is_stored(
    bridge: RunningBridge, make_headers: Callable[[], dict[str, str]]
) -> None:
    status, _ = await bridge.post(group_message("hi"), headers=make_headers())
    assert status == 401
    assert await inbox_length(bridge) == 0


async def test_refusals_are_compact_json_as_the_200_body_is(bridge: RunningBridge) -> None:
    """`{"code":401,"msg":…}` without the spaces `json.dumps` puts in, as SPEC writes the 200
    body: a client comparing or grepping the text sees one format."""
    async with bridge.session.post(
        f"{bridge.url}/webhook/yach", data=b"{}",
        headers={**signed_headers("SEC-wrong"), "Content-Type": "application/json"},
    ) as response:  # fmt: skip
        body = await response.read()
    assert response.status == 401
    assert body.startswith(b'{"code":401,"msg":"') and b'": ' not in body, body


async def test_url_encoded_sign_is_accepted(bridge: RunningBridge, yach: FakeYach) -> None:
    headers = signed_headers()
    headers["sign"] = quote(headers["sign"], safe="")
    status, _ = await bridge.post(group_message("encoded"), headers=headers)
    assert status == 200


async def test_signature_is_checked_before_the_size(bridge: RunningBridge) -> None:
    huge = group_message("x" * 10_000)
    status, _ = await bridge.post(huge, headers=signed_headers("SEC-wrong"))
    assert status == 401
    status, _ = await bridge.post(huge)
    assert status == 413
    assert await inbox_length(bridge) == 0


def _body_of(size: int) -> bytes:
    """A valid message's JSON body of exactly `size` bytes (padded in an extra field)."""
    message = group_message("edge", msg_id=f"edge-{size}", pad="")
    bare = len(json.dumps(message).encode())
    message["pad"] = "x" * (size - bare)
    body = json.dumps(message).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_of_exactly_the_limit_is_taken_one_byte_more_is_413(
    bridge: RunningBridge, upstream: FakeOpenAI, chunked: bool
) -> None:
    """`413` only *above* BRIDGE_MAX_BODY_BYTES (4096 here), with or without Content-Length."""

    async def post(body: bytes) -> int:
        async def chunks() -> AsyncIterator[bytes]:
            yield body[:1000]
            yield body[1000:]

        headers = {**signed_headers(), "Content-Type": "application/json"}
        data = chunks() if chunked else body
        async with bridge.session.post(f"{bridge.url}/webhook/yach", data=data,
                                       headers=headers) as response:
            return response.status

    assert await post(_body_of(4097)) == 413
    assert await inbox_length(bridge) == 0
    assert await post(_body_of(4096)) == 200
    await wait_until(lambda: len(upstream.bodies) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "edge"



@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        json.dumps({"text": {"content": "no sender"}, "conversationId": "g"}).encode(),
        json.dumps({"text": {"content": "no group"}, "senderId": "u"}).encode(),
        "\xff\xfe".encode("latin-1"),
        b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b"payload=" + b"[" * 2000 + b"]" * 2000,
    ],
    ids=["broken-json", "json-array", "no-sender", "no-conversation", "not-utf8",
         "nested-deeper-than-the-stack", "form-field-nested-deeper-than-the-stack"],
)
async def test_malformed_body_is_400_with_a_reason(bridge: RunningBridge, body: bytes) -> None:
    status, answer = await bridge.post(body)
    assert status == 400
    assert answer["msg"]
    assert await inbox_length(bridge) == 0


async def test_form_encoded_body_with_aliases(bridge: RunningBridge, yach: FakeYach) -> None:
    form = urlencode({"msg_id": "m-form", "content": "@机器人 表单消息", "sender_id": "u9",
                      "group_id": "g9", "msg_type": "text", "workCode": "W9"})
    status, _ = await bridge.post(form)
    assert status == 200
    await wait_until(lambda: len(yach.shown) == 1)
    assert yach.texts() == ["You said: 表单消息. (history: 0 messages)"]
    assert yach.shown[0].message["at"] == {"atWorkCodes": ["W9"]}


async def test_form_with_nested_names_written_flat(bridge: RunningBridge, yach: FakeYach,
                                                   upstream: FakeOpenAI) -> None:
    """`text.content` as a form field name, as SPEC writes it: the question, not a notice."""
    form = urlencode({"msgId": "m-flat", "msgtype": "text", "text.content": "@bot 扁平字段",
                      "senderId": "u8", "conversationId": "g8", "conversationType": "2"})
    assert (await bridge.post(form))[0] == 200
    await wait_until(lambda: len(yach.shown) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "扁平字段"
    assert yach.texts() == ["You said: 扁平字段. (history: 0 messages)"]


async def test_a_markdown_message_is_a_question(bridge: RunningBridge, yach: FakeYach,
                                                upstream: FakeOpenAI) -> None:
    """`markdown` is one of SPEC's message types: its text (`markdown.text`, where the
    outbound format keeps it too) is the question, not an "unsupported type" notice."""
    message = {k: v for k, v in group_message("x").items() if k != "text"}
    message |= {"msgtype": "markdown", "markdown": {"title": "问题", "text": "@bot **加粗**问题"}}
    assert (await bridge.post(message))[0] == 200
    await wait_until(lambda: len(yach.shown) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "**加粗**问题"


@pytest.mark.parametrize(
    "form",
    [
        b"msgId=m-amp&content=%40bot+trailing&senderId=u7&conversationId=g7&",
        b"msgId=m-amp&&content=%40bot+trailing&senderId=u7&conversationId=g7\r\n",
    ],
    ids=["trailing-ampersand", "empty-field-and-crlf"],
)
async def test_form_with_empty_fields_is_read_as_the_form_standard_reads_it(
    bridge: RunningBridge, upstream: FakeOpenAI, form: bytes
) -> None:
    """Empty `&`-separated parts are no fields (WHATWG form-urlencoded): hand-built forms
    end in `&`; such a message must not be refused (the platform does not resend a 400)."""
    status, answer = await bridge.post(form)
    assert (status, answer) == (200, {"code": 200, "msg": "ok"})
    await wait_until(lambda: len(upstream.bodies) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "trailing"


async def test_json_body_with_a_byte_order_mark_is_read(
    bridge: RunningBridge, upstream: FakeOpenAI
) -> None:
    body = b"\xef\xbb\xbf" + json.dumps(group_message("bom")).encode()
    status, _ = await bridge.post(body)
    assert status == 200
    await wait_until(lambda: len(upstream.bodies) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "bom"


async def test_a_refused_body_is_not_quoted_back(bridge: RunningBridge) -> None:
    """The 400's reason (also logged) is short: never the body, which may be a megabyte."""
    status, answer = await bridge.post(b"q" * 3000)
    assert status == 400
    assert "qqqq" not in answer["msg"] and len(answer["msg"]) < 100


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_whose_content_encoding_cannot_be_decoded_is_400(
    bridge: RunningBridge, encoding: str
) -> None:
    """Not a 500 (an unhandled exception, logged with a traceback, that the platform retries):
    a 400 with a JSON reason, nothing stored, counted as 400."""
    registry = bridge.bridge.metrics.registry
    sample = ("chatbridge_webhook_requests_total", {"status": "400"})
    before = registry.get_sample_value(*sample) or 0.0
    headers = {**signed_headers(), "Content-Type": "application/json", "Content-Encoding": encoding}
    async with bridge.session.post(
        f"{bridge.url}/webhook/yach", data=b"not compressed at all", headers=headers
    ) as response:
        assert response.status == 400
        assert (await response.json())["msg"]
    assert (registry.get_sample_value(*sample) or 0.0) - before == 1
    assert await inbox_length(bridge) == 0


async def test_form_whose_single_field_holds_json(bridge: RunningBridge,
                                                  upstream: FakeOpenAI) -> None:
    payload = json.dumps(group_message("packed"), ensure_ascii=False)
    status, _ = await bridge.post(urlencode({"data": payload}))
    assert status == 200
    await wait_until(lambda: len(upstream.bodies) == 1)
    assert upstream.bodies[0]["messages"][-1]["content"] == "packed"


async def test_same_message_three_times_with_new_timestamps_is_answered_once(
    bridge: RunningBridge, yach: FakeYach, upstream: FakeOpenAI
) -> None:
    message = group_message("once", msg_id="dup-1")
    for offset in (0, 1500, 3000):
        status, _ = await bridge.post(message, headers=signed_headers(
            now_ms=int(time.time() * 1000) - offset))
        assert status == 200
    await wait_until(lambda: len(yach.shown) == 1)
    await bridge.post(group_message("after", msg_id="dup-2"))
    await wait_until(lambda: len(yach.shown) == 2)
    assert len(upstream.bodies) == 2


async def test_without_msg_id_dedupe_uses_create_time(
    bridge: RunningBridge, yach: FakeYach, upstream: FakeOpenAI
) -> None:
    message = group_message("no id", createAt=1764400000000)
    del message["msgId"]
    for _ in range(2):
        assert (await bridge.post(message))[0] == 200
    message_without_time = {k: v for k, v in message.items() if k != "createAt"}
    assert (await bridge.post(message_without_time))[0] == 200
    await wait_until(lambda: len(yach.shown) == 2)
    for _ in range(100):  # every stored entry is answered and acknowledged (deleted)
        if await inbox_length(bridge) == 0:
            break
        await asyncio.sleep(0.02)
    assert await inbox_length(bridge) == 0
    assert len(yach.shown) == 2 and len(upstream.bodies) == 2


async def test_webhook_secret_is_not_echoed(bridge: RunningBridge) -> None:
    status, answer = await bridge.post(group_message("x"), headers=signed_headers("SEC-bad"))
    assert status == 401 and WEBHOOK_SECRET not in json.dumps(answer)


async def test_every_answer_of_the_webhook_is_counted_by_status(bridge: RunningBridge) -> None:
    """Including the 413 aiohttp raises for a chunked body (no Content-Length) over the cap."""
    registry = bridge.bridge.metrics.registry

    def count(status: str) -> float:
        value = registry.get_sample_value("chatbridge_webhook_requests_total", {"status": status})
        return value or 0.0

    before = {status: count(status) for status in ("200", "401", "413")}
    assert (await bridge.post(group_message("counted")))[0] == 200
    assert (await bridge.post(group_message("x"), headers=signed_headers("SEC-wrong")))[0] == 401

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with bridge.session.post(
        f"{bridge.url}/webhook/yach", data=chunks(), headers=signed_headers()
    ) as response:
        assert response.status == 413
        assert await response.json() == {"code": 413, "msg": "body too large"}  # as any 413
    after = {status: count(status) for status in ("200", "401", "413")}
    assert {status: after[status] - before[status] for status in after} == {
        "200": 1, "401": 1, "413": 1
    }


async def test_a_draining_bridge_still_checks_the_request_first(bridge: RunningBridge) -> None:
    """SIGTERM's 503 is the "cannot store it now" answer, and comes in its place in the
    order of checks: a forged or malformed request learns nothing of the bridge's state."""
    await drain(bridge.server.app)
    huge = group_message("x" * 10_000)
    assert (await bridge.post(group_message("x"), headers=signed_headers("SEC-wrong")))[0] == 401
    assert (await bridge.post(huge))[0] == 413
    assert (await bridge.post(b"{not json"))[0] == 400
    status, answer = await bridge.post(group_message("too late"))
    assert (status, answer) == (503, {"code": 503, "msg": "draining"})
    assert await inbox_length(bridge) == 0


async def test_the_skew_window_is_the_configured_one(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object
) -> None:
    """BRIDGE_YACH_MAX_SKEW_S: `|now − timestamp| ≤` it passes, beyond it is 401."""
    env = bridge_env(redis_url, bot_id, yach, BRIDGE_YACH_MAX_SKEW_S="30",
                     **openai_env(upstream.base_url))
    now_ms = int(time.time() * 1000)
    async with running_bridge(env) as running:
        for offset_s in (-45, 45):
            headers = signed_headers(now_ms=now_ms + offset_s * 1000)
            assert (await running.post(group_message("x"), headers=headers))[0] == 401
        for offset_s in (-20, 20):
            headers = signed_headers(now_ms=now_ms + offset_s * 1000)
            assert (await running.post(group_message("x"), headers=headers))[0] == 200


@pytest.mark.parametrize("secret", ["", WEBHOOK_SECRET], ids=["no-secret", "with-a-secret"])
async def test_insecure_mode_skips_only_a_missing_secret(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: object,
    secret: str,
) -> None:
    """BRIDGE_YACH_INSECURE=1 lets `run` start without BRIDGE_YACH_SECRET, and then takes
    unsigned webhooks; a secret given is still checked."""
    env = bridge_env(redis_url, bot_id, yach, BRIDGE_YACH_INSECURE="1",
                     BRIDGE_YACH_SECRET=secret, **openai_env(upstream.base_url))
    async with running_bridge(env) as running:
        unsigned = (await running.post(group_message("unsigned"), headers={}))[0]
        assert unsigned == (200 if not secret else 401)
        assert (await running.post(group_message("signed")))[0] == 200


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_another_method_is_405_and_counted(bridge: RunningBridge, method: str) -> None:
    """A probe or a misrouted check GETs the webhook: answered 405 (`Allow: POST`), nothing
    stored, and counted like every webhook request, so it shows in the metrics."""
    registry = bridge.bridge.metrics.registry
    sample = ("chatbridge_webhook_requests_total", {"status": "405"})
    async with bridge.session.request(method, f"{bridge.url}/webhook/yach") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
    assert registry.get_sample_value(*sample) == 1
    assert await inbox_length(bridge) == 0
