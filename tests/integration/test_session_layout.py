"""SPEC §5 as Redis shows it after a webhook's turn: the session hash under
`chatbridge:{<bot>}:session:yach:<scope key>` (braces literal) for each BRIDGE_SESSION_SCOPE
and for a direct chat, its fields (`upstream`, `conversation` as a JSON object, `created_at`,
`last_active`, `turns`) and its TTL; `openai`'s history in the same key space."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from tests.fakes import dify as fake_dify
from tests.fakes.coze import CozeFake
from tests.fakes.dify import DifyFake
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import APP_KEY, APP_SECRET, FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import wait_acknowledged

TTL_S = 3600
EN = MESSAGES["en"]


def direct(text: str) -> dict[str, Any]:
    return {"msgId": uuid.uuid4().hex, "msgtype": "text", "text": {"content": text},
            "senderId": "u1", "senderStaffId": "W001", "conversationType": "1"}


async def recorded(redis: aioredis.Redis, key: str, turns: int) -> None:
    """Wait until the session counts `turns` (recorded right after the last piece is sent)."""
    for _ in range(500):
        if await redis.hget(key, "turns") == str(turns).encode():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} never counted {turns} turns")


@pytest.mark.parametrize(("scope", "payload", "chat_session_id"), [
    ("group_user", group_message("q"), "yach:g:g1:u:u1"),
    ("group", group_message("q"), "yach:g:g1"),
    ("user", group_message("q"), "yach:u:u1"),
    ("group", direct("q"), "yach:u:u1"),  # direct chats are always per user
])  # fmt: skip
async def test_the_session_hash_of_a_turn(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis,
    scope: str, payload: dict[str, Any], chat_session_id: str,
) -> None:
    fake = await DifyFake.start(seed=1)
    env = bridge_env(redis_url, bot_id, yach, **fake.env(), BRIDGE_SESSION_SCOPE=scope,
                     BRIDGE_SESSION_TTL_S=str(TTL_S), BRIDGE_YACH_APP_KEY=APP_KEY,
                     BRIDGE_YACH_APP_SECRET=APP_SECRET)
    before = time.time()
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(payload))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1)
            key = f"chatbridge:{{{bot_id}}}:session:{chat_session_id}"
            await recorded(redis_client, key, 1)
            state = {k.decode(): v.decode() for k, v in (await redis_client.hgetall(key)).items()}
            ttl = await redis_client.ttl(key)
    finally:
        await fake.close()
    assert {"upstream", "conversation", "created_at", "last_active", "turns"} <= set(state)
    assert state["upstream"] == "dify"
    assert json.loads(state["conversation"]) == {"conversation_id": fake_dify.CONVERSATION_ID}
    assert state["turns"] == "1"
    for field in ("created_at", "last_active"):
        assert before - 1 <= float(state[field]) <= time.time() + 1
    assert TTL_S - 60 <= ttl <= TTL_S


async def test_openai_history_lives_in_the_same_key_space(
    redis_url: str, bot_id: str, yach: FakeYach, upstream: FakeOpenAI,
    redis_client: aioredis.Redis,
) -> None:
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_HISTORY_TURNS="1")
    async with running_bridge(env) as bridge:
        for n, question in enumerate(("one", "two", "three"), start=1):
            assert (await bridge.post(group_message(question)))[0] == 200
            await wait_until(lambda count=n: len(yach.shown) == count)
    assert yach.texts()[-1] == "You said: three. (history: 2 messages)"  # one turn kept
    keys = {key.decode() async for key in redis_client.scan_iter(match="*")
            if bot_id in key.decode()}
    assert keys and all(key.startswith(f"chatbridge:{{{bot_id}}}:") for key in keys)
    assert f"chatbridge:{{{bot_id}}}:session:yach:g:g1:u:u1" in keys
    assert f"chatbridge:{{{bot_id}}}:inbox" in keys


async def test_changing_the_upstream_starts_fresh_conversations(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis,
) -> None:
    """"Changing BRIDGE_UPSTREAM starts fresh conversations (the mapping records which
    upstream it belongs to)": Dify's conversation id never goes to Coze, nor Coze's back."""
    dify, coze = await DifyFake.start(seed=1), await CozeFake.start(seed=1)
    key = f"chatbridge:{{{bot_id}}}:session:yach:g:g1:u:u1"
    extra = {"BRIDGE_YACH_APP_KEY": APP_KEY, "BRIDGE_YACH_APP_SECRET": APP_SECRET}
    try:
        for shown, fake in enumerate((dify, coze, dify), start=1):
            env = bridge_env(redis_url, bot_id, yach, **fake.env(), **extra)
            async with running_bridge(env) as bridge:
                assert (await bridge.post(group_message(f"turn {shown}")))[0] == 200
                await wait_until(lambda count=shown: len(yach.shown) == count)
                await recorded(redis_client, key, shown)
            upstream = "dify" if fake is dify else "coze"
            assert (await redis_client.hget(key, "upstream")) == upstream.encode()
    finally:
        await dify.close()
        await coze.close()
    dify_bodies = [request.json() for request in dify.server.on(fake_dify.PATH)]
    assert [body["conversation_id"] for body in dify_bodies] == ["", ""]
    [coze_request] = coze.server.on("/v3/chat")
    assert "conversation_id" not in coze_request.query
    assert "conversation_id" not in coze_request.json()


@dataclass(frozen=True)
class _ExpiringSession:
    """A session of two answered turns, with its history, a minute from expiring."""

    key: str
    history_key: str
    fields: dict[str, str]

    async def assert_refreshed(self, redis_client: aioredis.Redis, *, since: float) -> None:
        """Its TTL, its history's and `last_active` refreshed; nothing else changed."""
        raw = await redis_client.hgetall(self.key)
        state = {k.decode(): v.decode() for k, v in raw.items()}
        last_active = state.pop("last_active")
        assert state == {k: v for k, v in self.fields.items() if k != "last_active"}
        assert since - 1 <= float(last_active) <= time.time() + 1
        assert TTL_S - 60 <= await redis_client.ttl(self.key) <= TTL_S
        assert TTL_S - 60 <= await redis_client.ttl(self.history_key) <= TTL_S
        assert await redis_client.llen(self.history_key) == 1


async def _expiring_session(redis_client: aioredis.Redis, bot_id: str) -> _ExpiringSession:
    session = _ExpiringSession(
        f"chatbridge:{{{bot_id}}}:session:yach:g:g1:u:u1",
        f"chatbridge:{{{bot_id}}}:history:yach:g:g1:u:u1",
        {"upstream": "openai", "conversation": "{}", "created_at": "1", "last_active": "1",
         "turns": "2"},
    )  # fmt: skip
    await redis_client.hset(session.key, mapping=session.fields)
    await redis_client.rpush(session.history_key, '{"question": "q", "answer": "a"}')
    for each in (session.key, session.history_key):
        await redis_client.expire(each, 60)  # about to end, were it not refreshed
    return session


@pytest.mark.parametrize("failure", ["upstream", "refusal"])
async def test_a_failed_turn_refreshes_the_sessions_ttl(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis, failure: str,
) -> None:
    """SPEC §5 "TTL refreshed each turn": also a turn that ends in a failure message (the
    upstream failed after its retries; an image refused before asking). It refreshes the
    TTL of the session and of its history and sets `last_active`; `turns` counts answered
    turns, and the conversation and history stay as they were."""
    upstream = await FakeOpenAI(statuses=[503, 503]).start()
    expiring = await _expiring_session(redis_client, bot_id)
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_SESSION_TTL_S=str(TTL_S), BRIDGE_UPSTREAM_RETRIES="1",
                     BRIDGE_IMAGE_PIPELINE="none", BRIDGE_LANG="en")  # fmt: skip
    payload = (group_message("will it fail?") if failure == "upstream"
               else group_message("", msgtype="image", picUrl="https://images.example/a.png"))
    before = time.time()
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(payload))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1)
            # the session is refreshed before the acknowledgement
            await wait_acknowledged(redis_client, f"chatbridge:{{{bot_id}}}:inbox")
    finally:
        await upstream.close()
    notice = "upstream_unavailable" if failure == "upstream" else "image_refused"
    assert yach.texts() == [EN[notice]]
    await expiring.assert_refreshed(redis_client, since=before)


async def test_a_failed_first_turn_leaves_no_session(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis,
) -> None:
    """A failed turn refreshes a session; it makes none: with no answer and no reference
    from the upstream, /status still says there is no conversation yet."""
    upstream = await FakeOpenAI(statuses=[503, 503]).start()
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_UPSTREAM_RETRIES="1")  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("will it fail?")))[0] == 200
            await wait_until(lambda: len(yach.shown) == 1)
            await wait_acknowledged(redis_client, f"chatbridge:{{{bot_id}}}:inbox")
    finally:
        await upstream.close()
    assert not await redis_client.exists(f"chatbridge:{{{bot_id}}}:session:yach:g:g1:u:u1")


async def test_a_stopped_turn_refreshes_the_sessions_ttl(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: aioredis.Redis,
) -> None:
    """SPEC §5 "TTL refreshed each turn", §2 "idle time after which a session's mapping
    expires": a turn the user stopped with `/stop` was a turn (the question reached the
    upstream), so the session is no longer idle. Its TTL, its history's and `last_active`
    are refreshed; `turns` (answered turns) and the history stay as they were."""
    from tests.integration.test_commands import EchoUnlessSlow

    fake = await EchoUnlessSlow().start()
    expiring = await _expiring_session(redis_client, bot_id)
    env = bridge_env(redis_url, bot_id, yach, **openai_env(fake.base_url),
                     BRIDGE_SESSION_TTL_S=str(TTL_S), BRIDGE_LANG="en")  # fmt: skip
    before = time.time()
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("slow one")))[0] == 200
            await asyncio.wait_for(fake.holding.wait(), timeout=5)
            assert (await bridge.post(group_message("/stop")))[0] == 200
            await wait_until(lambda: EN["stopped"] in yach.texts())
            await wait_acknowledged(redis_client, f"chatbridge:{{{bot_id}}}:inbox")
    finally:
        await fake.close()
    await expiring.assert_refreshed(redis_client, since=before)
