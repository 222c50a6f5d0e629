"""Redirects of upstream and Yach API requests: followed within their origin, never to
another (the request's credentials would go along: aiohttp strips only `Authorization`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from adapters.yach_api import YachAPI, YachAPIError
from bridge.http import UpstreamHTTP, UpstreamRedirectRefused
from bridge.interfaces import Sender, Turn
from bridge.messages import MESSAGES
from tests.fakes.base import FakeServer
from tests.fakes.hiagent import CHAT_QUERY, HiAgentFake, recorded_answer
from tests.fakes.scripted import answer_text, collect, connect, status
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach
from tests.harness import bridge_env, group_message, running_bridge, wait_until

ZH = MESSAGES["zh"]


@pytest.fixture
async def hiagent() -> AsyncIterator[HiAgentFake]:
    async with HiAgentFake() as fake:
        yield fake


@pytest.fixture
async def elsewhere() -> AsyncIterator[FakeServer]:
    """Another origin (another port of 127.0.0.1): it records whatever reaches it."""
    server = await FakeServer(web.Application()).start()
    yield server
    await server.close()


def redirect_to(url: str) -> web.Application:
    """An app answering every request with a 307 to `url`, path and query kept (as a proxy
    moved to another host answers)."""

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": url + request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    return app


async def test_a_redirect_to_another_origin_is_not_followed_and_the_user_is_told(
    redis_url: str,
    bot_id: str,
    yach: FakeYach,
    hiagent: HiAgentFake,
    elsewhere: FakeServer,
    redis_client: object,
) -> None:
    hiagent.script.then(status(307, "", {"Location": f"{elsewhere.url}/moved?token=leak"}))
    env = bridge_env(redis_url, bot_id, yach, **hiagent.env(), BRIDGE_UPSTREAM_RETRIES="1")
    with capture_logs() as logs:
        async with running_bridge(env) as bridge:
            status_code, _ = await bridge.post(group_message("你知道OVS吗？"))
            assert status_code == 200
            await wait_until(lambda: len(yach.shown) >= 1)
            await asyncio.sleep(0.2)  # time for a request that should not come

    assert elsewhere.requests == []  # no x-csrf-token, no app-visitor-key, no question
    assert yach.texts() == [ZH["upstream_unavailable"]]
    assert len(hiagent.server.on(CHAT_QUERY)) == 1  # not retried: it would redirect again
    (failed,) = [e for e in logs if e["event"] == "upstream_failed"]
    assert failed["kind"] == "unavailable"
    assert "307" in failed["detail"] and elsewhere.url in failed["detail"]
    assert "moved" not in failed["detail"] and "leak" not in failed["detail"]


async def test_a_redirect_within_the_origin_is_followed(
    http: UpstreamHTTP, hiagent: HiAgentFake
) -> None:
    hiagent.script.then(status(307, "", {"Location": f"{CHAT_QUERY}?hop=1"}))
    turn = Turn(text="你知道OVS吗？", sender=Sender("user-1"), chat_session_id="yach:g:g1:u:u1")

    events = await collect(connect(http, hiagent.env()), turn)

    assert answer_text(events) == recorded_answer()
    asked = hiagent.server.on(CHAT_QUERY)
    assert [request.query for request in asked] == [{}, {"hop": "1"}]
    assert asked[1].headers["x-csrf-token"] == asked[0].headers["x-csrf-token"]


async def test_an_http_url_moved_to_https_is_not_followed_and_the_fix_is_named(
    http: UpstreamHTTP, hiagent: HiAgentFake
) -> None:
    """Followed, aiohttp would drop the Authorization header (another origin) and turn a
    301's POST into a bodiless GET: the upstream's 401 or 405 would send the operator to the
    credentials. Refused, the failure says what to set."""
    https = hiagent.server.url.replace("http://", "https://")
    hiagent.script.then(status(301, "", {"Location": f"{https}{CHAT_QUERY}"}))
    turn = Turn(text="你知道OVS吗？", sender=Sender("user-1"), chat_session_id="yach:g:g1:u:u1")
    with pytest.raises(UpstreamRedirectRefused, match="not followed; set the https URL"):
        await collect(connect(http, hiagent.env()), turn)


async def test_yach_api_calls_are_not_redirected_to_another_origin(
    session: aiohttp.ClientSession, elsewhere: FakeServer
) -> None:
    moved = await FakeServer(redirect_to(elsewhere.url)).start()
    try:
        with pytest.raises(YachAPIError, match="307") as refused:
            await YachAPI(session, moved.url, APP_KEY, APP_SECRET).access_token()
    finally:
        await moved.close()

    assert elsewhere.requests == []  # the app secret, in the query kept, stayed home
    assert moved.requests[0].query["appsecret"] == APP_SECRET
    assert APP_SECRET not in refused.value.reason
