"""`InOrder` on a real Redis: script calls pipelined on one connection take effect in the
order they were made, each gets its own answer, and every failure — a connection killed
with calls on their way, NOSCRIPT, a cancelled call ahead — is retried in that order."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from bridge.store import InOrder, Keys
from tests.harness import slowed_script_load

_APPEND = "redis.call('RPUSH', KEYS[1], ARGV[1]) return redis.call('LLEN', KEYS[1])"


@pytest.fixture
def calls(client: aioredis.Redis) -> InOrder:
    return InOrder(client)


@pytest.fixture
def key(bot_id: str) -> str:
    return Keys(bot_id).queue("in-order")


@pytest.fixture
async def script(client: aioredis.Redis) -> AsyncScript:
    script = client.register_script(_APPEND)
    await client.script_load(_APPEND)
    return script


async def on_their_way(
    calls: InOrder, script: AsyncScript, key: str, values: list[str]
) -> list[asyncio.Task[int]]:
    """The calls made one loop iteration after another, each written before any answer."""
    tasks = []
    for value in values:
        tasks.append(asyncio.create_task(calls.script(script, [key], [value])))
        await asyncio.sleep(0.005)
    return tasks


async def listed(redis: aioredis.Redis, key: str) -> list[str]:
    return [value.decode() for value in await redis.lrange(key, 0, -1)]


async def test_calls_take_effect_in_the_order_made_each_with_its_own_answer(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    values = [str(n) for n in range(50)]
    answers = await asyncio.gather(*(calls.script(script, [key], [v]) for v in values))
    assert answers == list(range(1, 51))
    assert await listed(redis_client, key) == values


async def test_the_calls_on_their_way_share_one_connection(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    await calls.script(script, [key], ["first"])
    await redis_client.execute_command("CLIENT", "PAUSE", 300, "WRITE")
    tasks = await on_their_way(calls, script, key, ["a", "b", "c"])
    # All three written while Redis holds the first: one connection, blocked on it, the
    # two behind it already in its query buffer (not waiting for its answer to be sent).
    [holding] = [c for c in await redis_client.client_list() if c["cmd"] == "evalsha"]
    assert "b" in holding["flags"] and int(holding["qbuf"]) > 0, holding
    assert [await task for task in tasks] == [2, 3, 4]
    assert await listed(redis_client, key) == ["first", "a", "b", "c"]


async def test_a_connection_killed_with_calls_on_their_way_loses_and_reorders_nothing(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    for round_ in range(4):  # a pool of 3: a broken connection must go back to it
        await redis_client.execute_command("CLIENT", "PAUSE", 200, "WRITE")
        values = [f"{round_}-{n}" for n in range(4)]
        tasks = await on_their_way(calls, script, key, values)
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert await listed(redis_client, key) == [f"{r}-{n}" for r in range(4) for n in range(4)]


async def test_noscript_with_calls_on_their_way_is_retried_in_order(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    await calls.script(script, [key], ["loaded"])
    await redis_client.script_flush()
    await redis_client.execute_command("CLIENT", "PAUSE", 200, "WRITE")
    tasks = await on_their_way(calls, script, key, ["a", "b", "c"])
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=5) == [2, 3, 4]
    assert await listed(redis_client, key) == ["loaded", "a", "b", "c"]


async def test_a_cancelled_call_ahead_leaves_the_ones_behind_their_own_answers(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    await redis_client.execute_command("CLIENT", "PAUSE", 200, "WRITE")
    first, second, third = await on_their_way(calls, script, key, ["a", "b", "c"])
    first.cancel()  # its read is cut: redis-py drops the connection, and "a" with it
    assert await asyncio.wait_for(asyncio.gather(second, third), timeout=5) == [1, 2]
    assert first.cancelled()
    assert await listed(redis_client, key) == ["b", "c"]
    assert await calls.script(script, [key], ["d"]) == 3  # and the next call goes on


async def test_a_call_made_while_the_one_ahead_retries_after_noscript_waits_for_it(
    client: aioredis.Redis, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    calls = InOrder(client)
    await calls.script(script, [key], ["loaded"])
    await redis_client.script_flush()
    loaded = slowed_script_load(client)
    first = asyncio.create_task(calls.script(script, [key], ["a"]))
    await loaded.wait()  # "a" met NOSCRIPT, and its retry has loaded the script
    second = asyncio.create_task(calls.script(script, [key], ["b"]))
    assert await asyncio.wait_for(asyncio.gather(first, second), timeout=5) == [2, 3]
    assert await listed(redis_client, key) == ["loaded", "a", "b"]


async def test_a_call_cancelled_before_reading_its_answer_has_it_read_and_dropped(
    calls: InOrder, redis_client: aioredis.Redis, script: AsyncScript, key: str
) -> None:
    await calls.script(script, [key], ["first"])
    await redis_client.execute_command("CLIENT", "PAUSE", 200, "WRITE")
    ahead, cancelled = await on_their_way(calls, script, key, ["a", "b"])
    cancelled.cancel()  # written, waiting for the answer of the call ahead
    later = asyncio.create_task(calls.script(script, [key], ["c"]))  # made meanwhile
    # "b" was written and runs; its answer is read and dropped after the call ahead read its
    # own, so the connection stays in step: every call reads its own answer, none runs twice.
    assert await asyncio.wait_for(asyncio.gather(ahead, later), timeout=5) == [2, 4]
    assert cancelled.cancelled()
    assert await calls.script(script, [key], ["d"]) == 5
    assert await listed(redis_client, key) == ["first", "a", "b", "c", "d"]
