"""The hot path of the relay's Redis commands, on a real Redis: the same answers as the
client, a few connections kept between commands, and every failure it does not handle
itself (NOSCRIPT, a connection the server dropped) taken over by the client."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from bridge.store import HotPath, Keys, connect

_SET = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return redis.call('HLEN', KEYS[1])"


@pytest.fixture
def key(bot_id: str) -> str:
    return Keys(bot_id).journal("1-1")


async def test_answers_as_the_client_does(
    client: aioredis.Redis, redis_client: aioredis.Redis, key: str
) -> None:
    hot = HotPath(client)
    script = client.register_script(_SET)
    assert await hot.script(script, [key], ["p:0", "a"]) == 1
    assert await hot.script(script, [key], ["p:1", "b"]) == 2
    assert await hot.command("HSET", key, "s:0", "1") == 1
    assert await redis_client.hgetall(key) == {b"p:0": b"a", b"p:1": b"b", b"s:0": b"1"}


async def test_concurrent_commands_get_their_own_answers(client: aioredis.Redis) -> None:
    hot = HotPath(client, keep=2)
    replies = await asyncio.gather(*(hot.command("ECHO", f"m{n}") for n in range(20)))
    assert replies == [f"m{n}".encode() for n in range(20)]


async def test_noscript_is_loaded_by_the_client(
    client: aioredis.Redis, redis_client: aioredis.Redis, key: str
) -> None:
    hot = HotPath(client)
    script = client.register_script(_SET)
    await hot.script(script, [key], ["p:0", "a"])
    await redis_client.script_flush()  # as a Redis restarted empty
    assert await hot.script(script, [key], ["p:1", "b"]) == 2


async def test_a_dropped_connection_is_replaced(
    client: aioredis.Redis, redis_client: aioredis.Redis, key: str, bot_id: str
) -> None:
    hot = HotPath(client, keep=1)
    await hot.command("CLIENT", "SETNAME", f"kept-{bot_id}")
    # as after a Redis restart; only that connection: the test Redis may be shared
    (kept,) = [c for c in await redis_client.client_list() if c["name"] == f"kept-{bot_id}"]
    await redis_client.client_kill_filter(_id=kept["id"])
    assert await hot.command("HSET", key, "s:0", "1") == 1
    assert await redis_client.hget(key, "s:0") == b"1"


async def test_a_cancelled_command_leaves_no_answer_behind(
    client: aioredis.Redis, redis_client: aioredis.Redis, key: str
) -> None:
    hot = HotPath(client, keep=1)
    blocked = asyncio.create_task(hot.command("BLPOP", key + ":list", 2))
    await asyncio.sleep(0.1)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await redis_client.rpush(key + ":list", "late")
    # the cancelled command's connection was dropped: no later command reads its answer
    assert await hot.command("ECHO", "mine") == b"mine"
    assert await hot.command("LLEN", key + ":list") == 1


async def _names(redis: aioredis.Redis) -> list[str]:
    return [client["name"] for client in await redis.client_list()]


async def test_a_kept_connection_serves_the_next_command_and_closes_with_the_client(
    redis_url: str, redis_client: aioredis.Redis, bot_id: str
) -> None:
    client = connect(redis_url, max_connections=4)
    hot = HotPath(client, keep=1)
    await hot.command("CLIENT", "SETNAME", f"kept-{bot_id}")
    assert await hot.command("CLIENT", "GETNAME") == f"kept-{bot_id}".encode()
    assert f"kept-{bot_id}" in await _names(redis_client)
    await client.aclose()
    for _ in range(50):
        if f"kept-{bot_id}" not in await _names(redis_client):
            break
        await asyncio.sleep(0.02)
    assert f"kept-{bot_id}" not in await _names(redis_client)
