"""The app access token of Yach's open API, fetched once by calls that need it together."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from adapters.yach_api import YachAPI
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
