"""The chatgpt-web adapter against a fake backend-api: SSE and WebSocket answers, /stop.

The failures every adapter meets are in test_upstream_failures.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from bridge.events import Done, ErrorKind, Event, TextDelta, UpstreamError
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamHTTP,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.interfaces import Sender, Turn
from tests.fakes.base import FakeServer
from tests.fakes.chatgpt_web import (
    ACCESS_TOKEN,
    ANSWER,
    CONVERSATION,
    CONVERSATION_ID,
    PIECES,
    QUESTION,
    STOP,
    WS,
    FakeChatGPT,
    hub_frame,
)
from tests.fakes.scripted import (
    MIDWAY,
    Reply,
    answer_text,
    collect,
    connect,
    refs,
    sse_payloads,
    status,
)
from tests.harness import stop_after_first


def turn(text: str = QUESTION, conversation: dict[str, str] | None = None) -> Turn:
    return Turn(text=text, sender=Sender("u1"), chat_session_id="yach:u:u1",
                conversation=conversation)


@pytest.fixture(params=[3, 4])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeChatGPT]:
    async with FakeChatGPT(seed=request.param) as server:
        yield server


def stalled(fake: FakeChatGPT) -> Reply:
    """The first answer pieces as SSE, then silence (until the fake closes)."""
    return fake.answer(upto=4, stall_after=10**6)


async def test_sse_answer_exact_with_refs_and_request_shape(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == ANSWER
    assert [e.text for e in events if isinstance(e, TextDelta)] == PIECES
    assert events[-1] == Done()
    (request,) = fake.server.on(CONVERSATION)
    body = request.json()
    assert request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert body["action"] == "next"
    assert body["model"] == "gpt-4o"
    assert "conversation_id" not in body
    (message,) = body["messages"]
    assert message["author"] == {"role": "user"}
    assert message["content"] == {"content_type": "text", "parts": [QUESTION]}
    assert uuid.UUID(message["id"]) != uuid.UUID(body["parent_message_id"])
    first, last = refs(events)[0], refs(events)[-1]
    assert first == {"conversation_id": CONVERSATION_ID, "parent_message_id": message["id"]}
    assert last["conversation_id"] == CONVERSATION_ID
    assert last["parent_message_id"].startswith("a5515fa1-")
    assert not fake.server.on(STOP)


async def test_second_turn_continues_from_the_assistant_message(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    upstream = connect(http, fake.env())
    first = await collect(upstream, turn())
    stored = refs(first)[-1]
    second = await collect(upstream, turn("噢噢好的", conversation=stored))
    assert answer_text(second) == ANSWER
    body = fake.server.on(CONVERSATION)[1].json()
    assert body["conversation_id"] == CONVERSATION_ID
    assert body["parent_message_id"] == stored["parent_message_id"]
    assert refs(second)[-1]["parent_message_id"] != stored["parent_message_id"]


@pytest.mark.parametrize(("ws_mode", "wss_target"), [
    pytest.param("done", "ok", id="done"),
    pytest.param("hub", "ok", id="hub-envelope"),
    pytest.param("close", "ok", id="closed-normally-without-end-marker"),
    pytest.param("done", "dead", id="fallback-wss-url"),  # `wss_url` is unreachable
])
async def test_websocket_answer_exact(
    ws_mode: str, wss_target: str, fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.answer_mode, fake.ws_mode, fake.wss_target = "ws", ws_mode, wss_target
    events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == ANSWER
    assert events[-1] == Done()
    assert refs(events)[0]["conversation_id"] == CONVERSATION_ID
    assert refs(events)[-1]["parent_message_id"].startswith("a5515fa1-")
    assert len(fake.server.on(WS)) == 1


@pytest.mark.parametrize("wss_target", ["all_dead", "all_gone", "all_inside"])
async def test_no_socket_reachable_is_unavailable(
    fake: FakeChatGPT, http: UpstreamHTTP, wss_target: str
) -> None:
    """Refused, or gone (a 404 to the handshake): the sockets are the answer's, not a
    setting's, so a 404 there is no misconfiguration to report (`not_found`). Sockets the
    fetch rules refuse are not connected to, and fail the same way."""
    fake.answer_mode, fake.wss_target = "ws", wss_target
    with pytest.raises(UpstreamUnavailable):
        await collect(connect(http, fake.env()), turn())


def socket_hosts(fake: FakeChatGPT) -> list[str]:
    """The host each socket the fake saw was opened to."""
    return [request.headers["Host"] for request in fake.server.on(WS)]


async def test_a_socket_on_another_inside_host_is_refused_and_the_fallback_used(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    """The `wss_url` names the fake's own socket through `localhost`: it would answer, but
    it is `ws` to a loopback host that is neither the configured one (127.0.0.1) nor
    allow-listed, so the bridge does not connect; the fallback, on the configured host, is
    used. The refusal is logged, with the URL's token masked."""
    fake.answer_mode, fake.wss_target = "ws", "inside"
    with capture_logs() as logs:
        events = await collect(connect(http, fake.env()), turn())
    assert answer_text(events) == ANSWER
    assert socket_hosts(fake) == [fake.server.url.removeprefix("http://")]
    (refused,) = [line for line in logs if line["event"] == "chatgpt_socket_refused"]
    assert refused["log_level"] == "warning"
    assert refused["reason"].startswith("ws to localhost")
    assert refused["url"].startswith("ws://localhost:") and "access_token=***" in refused["url"]
    assert not [line for line in logs if line["event"] == "chatgpt_socket_unreachable"]


async def test_a_socket_redirected_to_another_host_is_not_followed(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    """The `wss_url` is on the configured host, which answers the handshake with a 307 to
    an IP literal elsewhere (aiohttp connects to one without asking the pinned resolver):
    the redirect was followed past the guard. It is refused as another origin, the
    fallback used."""
    inside = await FakeServer(web.Application()).start()
    try:
        fake.answer_mode, fake.wss_target = "ws", "moved"
        fake.moved_to = f"{inside.url}/latest/meta-data"
        with capture_logs() as logs:
            events = await collect(connect(http, fake.env()), turn())
    finally:
        await inside.close()
    assert inside.requests == []
    assert answer_text(events) == ANSWER
    assert socket_hosts(fake) == [fake.server.url.removeprefix("http://")]
    (unreachable,) = [line for line in logs if line["event"] == "chatgpt_socket_unreachable"]
    assert "redirect to another origin" in unreachable["error"]


async def test_a_socket_on_an_allow_listed_host_is_used(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.answer_mode, fake.wss_target = "ws", "inside"
    env = fake.env(BRIDGE_FETCH_ALLOW_HOSTS="localhost")
    with capture_logs() as logs:
        events = await collect(connect(http, env), turn())
    assert answer_text(events) == ANSWER
    assert socket_hosts(fake) == [fake.server.url.replace("http://127.0.0.1", "localhost")]
    assert not [line for line in logs if line["event"].startswith("chatgpt_socket")]


async def test_socket_dropped_is_broken(fake: FakeChatGPT, http: UpstreamHTTP) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "drop"
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert answer_text(events) == "".join(PIECES[:2])


@pytest.mark.parametrize("added", ["long-line", "bad-json", "wrong-shape"])
async def test_an_unreadable_socket_message_is_a_protocol_error(
    added: str, fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    """A hub frame whose SSE holds a line over 1 MiB, a frame that is not JSON, or one whose
    JSON is not a message: what came before stays, the turn ends as a protocol error (the
    long line escaped as a bare SSELineTooLong: a traceback, the entry asked again)."""

    def edit(frames: list[str]) -> list[str]:
        request_id = json.loads(frames[0])["websocket_request_id"]
        bad = {
            "long-line": hub_frame(request_id, b"data: " + b"x" * (1 << 20) + b"\n\n"),
            "bad-json": hub_frame(request_id, b"data: {not json\n\n"),
            "wrong-shape": hub_frame(request_id, b'data: {"message": {"author": {"role": '
                                                 b'"assistant"}, "content": {"parts": 5}}}\n\n'),
        }[added]
        return [*frames[:4], bad, *frames[4:]]

    fake.answer_mode, fake.ws_mode, fake.edit_frames = "ws", "hub", edit
    events: list[Event] = []
    with pytest.raises(UpstreamProtocolError):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert answer_text(events) == "".join(PIECES[:2])
    assert len(await fake.server.wait_for_requests(1, STOP, timeout=5)) == 1


async def test_socket_idle_timeout(fake: FakeChatGPT, http: UpstreamHTTP) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "stall"
    with pytest.raises(UpstreamTimeout):
        await collect(connect(replace(http, idle_timeout_s=0.3), fake.env()), turn())


@pytest.mark.parametrize("mode", ["sse", "ws"])
async def test_stop_request_sent_when_the_consumer_stops_early(
    mode: str, fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.answer_mode, fake.ws_mode = mode, "stall"
    if mode == "sse":
        fake.script.then(stalled(fake))
    async with aclosing(connect(http, fake.env()).stream(turn())) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                break
    (stop,) = await fake.server.wait_for_requests(1, STOP, timeout=5)
    sent = fake.server.on(CONVERSATION)[0].json()
    assert stop.json() == {"websocket_request_id": sent["websocket_request_id"]}
    assert stop.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"


async def test_stop_request_sent_when_the_turn_is_cancelled(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.answer_mode, fake.ws_mode = "ws", "stall"
    events = connect(http, fake.env()).stream(turn())
    await stop_after_first(events, lambda event: isinstance(event, TextDelta))
    assert len(await fake.server.wait_for_requests(1, STOP, timeout=5)) == 1


async def test_error_message_in_the_stream(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    data = sse_payloads([
        {"message": None, "conversation_id": CONVERSATION_ID,
         "error": "Something went wrong while generating the response."},
    ])
    fake.script.then(fake.sse(data))
    events = await collect(connect(http, fake.env()), turn())
    assert events[-1] == UpstreamError(
        ErrorKind.REJECTED, "chatgpt-web error: Something went wrong while generating the response."
    )
    assert refs(events) == [
        {"conversation_id": CONVERSATION_ID,
         "parent_message_id": fake.server.on(CONVERSATION)[0].json()["messages"][0]["id"]}
    ]


STALE = {"conversation_id": "6f1c0d2e-0000-4000-8000-000000000000",
         "parent_message_id": "a5515fa1-0000-4000-8000-999999999999"}


@pytest.mark.parametrize("detail", [
    {"message": "Conversation not found", "code": "conversation_not_found"},
    "Conversation not found",  # older servers
])
async def test_a_conversation_the_server_no_longer_has_is_started_afresh(
    detail: object, fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    # Deleted in the web UI, or the access token is now another account's.
    fake.script.then(status(404, {"detail": detail}))
    events = await collect(connect(http, fake.env()), turn(conversation=STALE))

    first, again = (request.json() for request in fake.server.on(CONVERSATION))
    assert (first["conversation_id"], first["parent_message_id"]) == tuple(STALE.values())
    assert "conversation_id" not in again
    assert again["parent_message_id"] != STALE["parent_message_id"]
    assert answer_text(events) == ANSWER
    assert {ref["conversation_id"] for ref in refs(events)} == {CONVERSATION_ID}
    assert events[-1] == Done()
    assert not fake.server.on(STOP)


async def test_another_404_is_reported_and_not_asked_again(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.script.then(status(404, "404: Not Found"))  # a base URL missing its path
    with pytest.raises(UpstreamRejected):
        await collect(connect(http, fake.env()), turn(conversation=STALE))
    assert len(fake.server.on(CONVERSATION)) == 1


@pytest.mark.parametrize("code", [401, 403])
async def test_no_stop_request_when_the_conversation_is_refused(
    code: int, fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.script.then(status(code, {"detail": "token expired"}))
    with pytest.raises(UpstreamAuthError):
        await collect(connect(http, fake.env()), turn())
    assert len(fake.server.on(CONVERSATION)) == 1
    assert not fake.server.on(STOP)


async def test_stop_request_sent_when_the_sse_stream_breaks(
    fake: FakeChatGPT, http: UpstreamHTTP
) -> None:
    fake.script.then(fake.answer(cut_after=MIDWAY))
    events: list[Event] = []
    with pytest.raises(UpstreamBroken):
        await collect(connect(http, fake.env()), turn(), into=events)
    assert ANSWER.startswith(answer_text(events))
    assert len(await fake.server.wait_for_requests(1, STOP, timeout=5)) == 1
