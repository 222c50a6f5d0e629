"""The app access token of Yach's open API, fetched once by calls that need it together."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from adapters.yach_api import YachAPI, YachAPIError
from tests.fakes.base import FakeServer
from tests.fakes.scripted import unanswered_url
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach

CALLS = 20


def api(session: aiohttp.ClientSession, yach: FakeYach) -> YachAPI:
    return YachAPI(session, yach.url, APP_KEY, APP_SECRET)


async def send(client: YachAPI, n: int) -> None:
    message = json.dumps({"msgtype": "text", "text": {"content": f"piece {n}"}})
    body = {"to_user_id": "u1", "message": message, "message_id": f"m{n}"}
    await client.call_with_token("POST", "/v1/single/message/send", json=body)


async def test_calls_that_find_no_token_share_one_fetch(
    session: aiohttp.ClientSession, yach: FakeYach
) -> None:
    client = api(session, yach)
    tokens = await asyncio.gather(*(client.access_token() for _ in range(CALLS)))

    assert set(tokens) == {"app-token-1"}
    assert yach.tokens_issued == 1


async def test_calls_refused_together_refresh_the_token_once(
    session: aiohttp.ClientSession, yach: FakeYach
) -> None:
    client = api(session, yach)
    assert await client.access_token() == "app-token-1"
    # Another holder of the app credentials takes a token: ours is refused from now on.
    params = {"appkey": APP_KEY, "appsecret": APP_SECRET}
    async with session.get(f"{yach.url}/gettoken", params=params) as response:
        assert response.status == 200

    await asyncio.gather(*(send(client, n) for n in range(CALLS)))

    assert yach.tokens_issued == 3  # ours, the other holder's, one refresh for all the calls
    assert len(yach.shown) == CALLS


async def test_a_bare_token_answer_and_an_errcode_success_are_accepted(
    session: aiohttp.ClientSession,
) -> None:
    """`/gettoken` may answer `{"access_token": …}` without `code`/`obj`; a send may answer
    `{"errcode": 0}` (SPEC §4)."""
    server = FakeServer(web.Application())

    async def gettoken(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "bare-token", "expires_in": 7200})

    async def single(request: web.Request) -> web.Response:
        if request.query.get("access_token") != "bare-token":
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    server.app.router.add_get("/gettoken", gettoken)
    server.app.router.add_post("/v1/single/message/send", single)
    await server.start()
    try:
        client = YachAPI(session, server.url, APP_KEY, APP_SECRET)
        assert await client.access_token() == "bare-token"
        await send(client, 1)
        assert len(server.on("/v1/single/message/send")) == 1
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("expired_time", "refreshed_at_s"),
    [
        (7200, 6900),  # a lifetime in seconds: refreshed 300 s before its end
        ("absolute-s", 3300),  # the moment of expiry as a Unix time, an hour from now
        ("absolute-ms", 3300),  # the same in milliseconds
    ],
)
async def test_expired_time_as_a_lifetime_or_as_the_moment_of_expiry(
    session: aiohttp.ClientSession, yach: FakeYach, expired_time: int | str,
    refreshed_at_s: float,
) -> None:
    """SPEC's `expired_time` is in seconds, from when it does not say: a value that can only
    be a Unix time (it was read as a lifetime of decades, the token kept until a send failed)
    is the moment the token expires."""
    now = time.time()
    yach.token_lifetime_s = {"absolute-s": int(now) + 3600,
                             "absolute-ms": int(now * 1000) + 3_600_000}.get(
        str(expired_time), expired_time)
    ticks = [0.0]
    client = YachAPI(session, yach.url, APP_KEY, APP_SECRET, clock=lambda: ticks[0])
    assert await client.access_token() == "app-token-1"
    ticks[0] = refreshed_at_s - 200
    assert await client.access_token() == "app-token-1"
    ticks[0] = refreshed_at_s + 200
    assert await client.access_token() == "app-token-2"


async def test_an_expiry_moment_already_past_is_kept_a_minute(
    session: aiohttp.ClientSession, yach: FakeYach
) -> None:
    """Clocks differ: a token the platform says expired is used (a refused one is replaced
    at once anyway), and fetched again a minute later, not on every call."""
    yach.token_lifetime_s = int(time.time()) - 10
    ticks = [0.0]
    client = YachAPI(session, yach.url, APP_KEY, APP_SECRET, clock=lambda: ticks[0])
    assert await client.access_token() == "app-token-1"
    ticks[0] = 30.0
    assert await client.access_token() == "app-token-1"
    ticks[0] = 61.0
    assert await client.access_token() == "app-token-2"


async def test_an_http_401_is_an_invalid_token_answer(
    session: aiohttp.ClientSession,
) -> None:
    """A send refused with HTTP 401, whatever its body says, gets one fresh token and is
    sent again (SPEC §4: refreshed "once on an invalid-token answer")."""
    server = FakeServer(web.Application())
    issued: list[str] = []

    async def gettoken(request: web.Request) -> web.Response:
        issued.append(f"t{len(issued) + 1}")
        return web.json_response({"code": 200, "obj": {"access_token": issued[-1],
                                                        "expired_time": 7200}})

    async def single(request: web.Request) -> web.Response:
        if request.query.get("access_token") != issued[-1] or len(issued) < 2:
            return web.json_response({"code": 401, "msg": "Unauthorized"}, status=401)
        return web.json_response({"code": 200, "msg": "ok"})

    server.app.router.add_get("/gettoken", gettoken)
    server.app.router.add_post("/v1/single/message/send", single)
    await server.start()
    try:
        client = YachAPI(session, server.url, APP_KEY, APP_SECRET)
        await send(client, 1)
        sends = server.on("/v1/single/message/send")
        assert [request.query["access_token"] for request in sends] == ["t1", "t2"]
    finally:
        await server.close()


async def test_an_answer_that_does_not_end_is_refused_after_a_mebibyte(
    session: aiohttp.ClientSession,
) -> None:
    """An answer of the open API was read whole, however long: a proxy's error page that
    never ends (here 64 MiB on offer) went into memory. It is refused once over 1 MiB, as an
    answer of the API (a YachAPIError: sends retry, the token fetch fails), not read on."""
    server = FakeServer(web.Application())
    written = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            for _ in range(1024):
                await response.write(chunk)
                written += len(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return response

    server.app.router.add_get("/gettoken", endless)
    await server.start()
    try:
        client = YachAPI(session, server.url, APP_KEY, APP_SECRET)
        with pytest.raises(YachAPIError, match="over 1048576 bytes"):
            await client.access_token()
    finally:
        await server.close()
    assert written < 16 * 1048576, written  # the rest was never asked for


# JSON nested deeper than Python's stack raised RecursionError, not a YachAPIError; an integer
# of more digits than `int` converts, a ValueError
@pytest.mark.parametrize("body", ["[" * 100_000, '{"code": ' + "1" * 5000 + "}"])
async def test_an_answer_json_cannot_read_is_no_json_object(
    session: aiohttp.ClientSession, body: str
) -> None:
    server = FakeServer(web.Application())

    async def gettoken(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    server.app.router.add_get("/gettoken", gettoken)
    await server.start()
    try:
        client = YachAPI(session, server.url, APP_KEY, APP_SECRET)
        with pytest.raises(YachAPIError, match="not a JSON object"):
            await client.access_token()
    finally:
        await server.close()


async def test_a_host_that_drops_packets_fails_the_call_at_the_connect_timeout(
    session: aiohttp.ClientSession,
) -> None:
    """Connecting to an API host that answers nothing (its SYNs dropped) waited the whole
    15 s of a call, then the send retried; now the connect gives up on its own timeout."""
    with unanswered_url() as url:
        client = YachAPI(session, url, APP_KEY, APP_SECRET, timeout_s=30, connect_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(YachAPIError, match="cannot reach Yach"):
            await client.access_token()
        assert time.monotonic() - started < 5
