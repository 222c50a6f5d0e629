"""Two bridge processes on one Redis (SPEC §5, §6): work spreads over both, each session's
turns run one at a time in inbox order across them, a long turn keeps its claim, nothing is
answered twice; `/stop` posted to one process stops the turn running in the other.

Replies go through the custom robot URL, which does not deduplicate: a second answer to a
message would show."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import BridgeProcess, PacedOpenAI, Spawner, post_webhook, wait_for

pytestmark = pytest.mark.slow

EN = MESSAGES["en"]
SESSIONS, PER_SESSION = 20, 10
_ANSWER = re.compile(r"^You said: s(\d+) m(\d+)\.")



async def _two_bridges(spawn: Spawner, env: dict[str, str]) -> list[BridgeProcess]:
    bridges = [spawn(env, "a"), spawn(env, "b")]
    await asyncio.gather(*(bridge.start() for bridge in bridges))
    return bridges


async def test_two_processes_answer_200_messages_once_each_in_session_order(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, spawn: Spawner
) -> None:
    # The first turn of every session outlasts BRIDGE_CLAIM_IDLE_S: the other process must
    # not take it over, and the session's other messages queue up behind it in both.
    upstream = await PacedOpenAI(pace=lambda q: 1.5 if q.endswith(" m0") else 0.0).start()
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_CLAIM_IDLE_S="1", BRIDGE_SESSION_QUEUE_MAX=str(PER_SESSION), BRIDGE_LANG="en",
    )  # fmt: skip
    try:
        bridges = await _two_bridges(spawn, env)
        async with aiohttp.ClientSession() as http:

            async def session(s: int) -> None:  # one sender: its messages in order
                for m in range(PER_SESSION):
                    message = group_message(f"s{s} m{m}", sender=f"user{s}")
                    bridge = bridges[(s + m) % 2]  # alternate: both processes store each session
                    assert await post_webhook(http, bridge.url, message) == 200

            await asyncio.gather(*(session(s) for s in range(SESSIONS)))
            total = SESSIONS * PER_SESSION
            await wait_for(lambda: len(yach.shown) >= total, 60, f"{total} replies")
            await asyncio.sleep(2.5)  # past twice BRIDGE_CLAIM_IDLE_S: a second answer shows
    finally:
        await upstream.close()
    seen: dict[int, list[int]] = defaultdict(list)
    for text in yach.texts():
        match = _ANSWER.match(text)
        assert match, text
        seen[int(match[1])].append(int(match[2]))
    assert len(yach.shown) == SESSIONS * PER_SESSION  # none twice, none lost
    assert {s: seen[s] for s in range(SESSIONS)} == {
        s: list(range(PER_SESSION)) for s in range(SESSIONS)
    }  # each session's replies in the order its messages came
    assert len(upstream.started) == SESSIONS * PER_SESSION  # no turn ran twice
    # A process paused past BRIDGE_CLAIM_IDLE_S on a loaded machine lets the other re-claim an
    # entry; the re-claim then finds the turn done (a later attempt, no upstream call). First
    # attempts are what must add up.
    runs = [
        sum(1 for event in bridge.events("turn_started") if event["attempt"] == 1)
        for bridge in bridges
    ]
    assert sum(runs) == SESSIONS * PER_SESSION and min(runs) > 0, runs  # both did work
    assert await redis_client.xlen(Keys(bot_id).inbox) == 0


async def test_stop_posted_to_one_process_stops_the_turn_running_in_the_other(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach, spawn: Spawner
) -> None:
    """Long turns in several sessions spread over both processes; each session's `/stop`
    is posted to the process that does not run its turn. Which process reads a `/stop`
    from the shared inbox is Redis's choice, so rounds repeat (at most 4) until at least
    one turn was stopped by the other process; every round, every turn must stop."""
    upstream = await PacedOpenAI(pace=lambda q: 60.0 if q.startswith("long") else 0.0).start()
    keys = Keys(bot_id)
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_CLAIM_IDLE_S="1", BRIDGE_LANG="en",
    )  # fmt: skip
    crossed = 0
    try:
        bridges = await _two_bridges(spawn, env)
        async with aiohttp.ClientSession() as http:
            for round_ in range(4):
                # An odd count: Redis hands entries to blocked readers in turn, so with an
                # even one each `/stop` tends to land where its turn runs.
                users = [f"r{round_}u{n}" for n in range(3)]
                for user in users:
                    message = group_message(f"long {user}", sender=user)
                    assert await post_webhook(http, bridges[0].url, message) == 200
                runner = await _runners(bridges, users)
                stops_before = len([t for t in yach.texts() if t == EN["stopped"]])
                for user in users:
                    other = bridges[1 - runner[user]]
                    assert (
                        await post_webhook(http, other.url, group_message("/stop", sender=user))
                        == 200
                    )
                expected_stops = stops_before + len(users)
                await wait_for(
                    lambda n=expected_stops: yach.texts().count(EN["stopped"]) >= n,
                    10, "every stop confirmed",
                )  # fmt: skip
                await wait_for(lambda n=3 * (round_ + 1): _stopped_turns(bridges) >= n, 10,
                               "every turn stopped")  # fmt: skip
                crossed += sum(_handled_stop(bridges[1 - runner[user]], user) for user in users)
                if crossed:
                    break
            await asyncio.sleep(2.5)  # past twice BRIDGE_CLAIM_IDLE_S: a stopped turn stays so
            assert await redis_client.xlen(keys.inbox) == 0
    finally:
        await upstream.close()
    assert crossed > 0
    assert all(text == EN["stopped"] for text in yach.texts())  # no answer, no cut-off notice
    assert len(upstream.started) == len(set(upstream.started))  # no stopped turn ran again


async def _runners(bridges: list[BridgeProcess], users: list[str]) -> dict[str, int]:
    """Which bridge (0 or 1) runs the turn of each user's session."""
    found: dict[str, int] = {}

    def look() -> bool:
        for index, bridge in enumerate(bridges):
            for event in bridge.events("turn_started"):
                user = event["chat_session_id"].rpartition(":u:")[2]
                if user in users:
                    found[user] = index
        return len(found) == len(users)

    await wait_for(look, 10, "every long turn started")
    return found


def _stopped_turns(bridges: list[BridgeProcess]) -> int:
    return sum(len(bridge.events("turn_stopped")) for bridge in bridges)


def _handled_stop(bridge: BridgeProcess, user: str) -> bool:
    """Whether this bridge read the `/stop` of that user's session."""
    return any(
        event["chat_session_id"].endswith(f":u:{user}") and event.get("command") == "stop"
        for event in bridge.events("command")
    )
