"""What a process's first finished turn writes to Redis, read off the server's MONITOR: its
one piece is journalled before it is sent; the turn's record then marks the journal complete
and the piece sent in the same round trip; the ack drops the journal. No read of the session
before the record, no separate journal write after the last piece, no `wake` when nothing
waits for the session, and no script loaded on the way (they are loaded at start). Every
step of delivery (SPEC §6) costs a round trip on the path of every answer."""

from __future__ import annotations

import asyncio
import contextlib
import re

import redis.asyncio as aioredis

from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until

APP = {"BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET}


async def _watch(redis: aioredis.Redis, into: list[str], listening: asyncio.Event) -> None:
    """Every command the server runs (top level, not a script's own calls), in order."""
    async with redis.monitor() as monitor:
        listening.set()
        while True:
            command = await monitor.next_command()
            if command["client_type"] != "lua":
                into.append(command["command"])


async def test_a_finished_turn_journals_records_and_acknowledges_in_three_writes(
    redis_url: str,
    bot_id: str,
    redis_client: aioredis.Redis,
    yach: FakeYach,
    upstream: FakeOpenAI,
) -> None:
    keys = Keys(bot_id)
    env = bridge_env(redis_url, bot_id, yach, **openai_env(upstream.base_url), **APP)
    seen: list[str] = []
    async with running_bridge(env) as bridge:
        worker = bridge.bridge.worker
        assert worker is not None
        await wait_until(lambda: worker.healthy)  # started: its scripts loaded
        listening = asyncio.Event()
        watching = asyncio.create_task(_watch(redis_client, seen, listening))
        await asyncio.wait_for(listening.wait(), 5)
        assert (await bridge.post(group_message("hello")))[0] == 200
        await wait_until(lambda: len(yach.shown) == 1)
        await wait_until(lambda: any(keys.dead in command for command in seen))  # the ack
        await asyncio.sleep(0.3)  # time for a wake, were one published
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    entry_journal = re.compile(re.escape(keys.journal("")) + r"\d+-\d+")
    writes = [command for command in seen if entry_journal.search(command)]
    assert len(writes) == 3, writes
    piece, record, ack = writes
    assert "p:0" in piece  # journalled before it was sent
    assert " s:0 " in record  # the record confirms the sent piece
    assert keys.dead in ack
    assert [key async for key in redis_client.scan_iter(match=keys.journal("*"))] == []
    session = keys.session("yach:g:g1:u:u1")
    assert not [c for c in seen if c.startswith("HGETALL") and session in c]
    assert not [c for c in seen if c.startswith("PUBLISH")]
    # The process's first turn: its scripts were loaded at start, none is loaded now.
    assert not [c for c in seen if c.startswith("SCRIPT")]
