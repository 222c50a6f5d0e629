"""Redis goes away under a running bridge (SPEC §6): a private redis-server (append-only,
its own socket and directory) is stopped mid-run — a clean SHUTDOWN, a SIGKILL — and
started again on its data, or empty. While it is down the webhook and /readyz answer 503;
after it returns, everything stored is answered, once; an empty Redis gets its consumer
group back and new messages are answered. Replies go through the custom robot URL, which
does not deduplicate: an answer sent twice would show twice."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge.sessions import _START  # its SHA: the command whose answer is lost
from bridge.store import GROUP, Keys
from tests.fakes.yach import FakeYach
from tests.harness import RunningBridge, bridge_env, group_message, openai_env, running_bridge
from tests.procs import PacedOpenAI, RedisProxy, RedisServer, wait_for

QUESTIONS = [f"stored {n}" for n in range(6)]


async def _readyz(bridge: RunningBridge) -> int:
    async with bridge.session.get(f"{bridge.url}/readyz") as response:
        return response.status


def _answered(yach: FakeYach, question: str) -> int:
    return sum(text.startswith(f"You said: {question}.") for text in yach.texts())


@pytest.mark.parametrize("stop", ["shutdown", "sigkill"])
async def test_redis_stopped_mid_run_and_restarted_with_its_data(
    stop: str, bot_id: str, yach: FakeYach, redis_server: RedisServer
) -> None:
    # The stored questions' turns are still waiting for the upstream when Redis goes.
    upstream = await PacedOpenAI(pace=lambda q: 2.0 if q in QUESTIONS[:2] else 0.0).start()
    env = bridge_env(
        redis_server.url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_CLAIM_IDLE_S="2",
    )  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            await wait_for(lambda: bool(bridge.bridge.worker and bridge.bridge.worker.healthy),
                           5, "workers up")  # fmt: skip
            assert await _readyz(bridge) == 200
            for n, question in enumerate(QUESTIONS):  # two sessions: order matters too
                message = group_message(question, sender=f"u{n % 2}")
                assert (await bridge.post(message))[0] == 200
            await wait_for(lambda: len(upstream.started) == 2, 5, "the first turns started")
            await asyncio.sleep(1.2)  # past appendfsync everysec: what was stored is on disk
            if stop == "shutdown":
                redis_server.shutdown()
            else:
                redis_server.kill()
            refused = group_message("while down")
            assert (await bridge.post(refused))[0] == 503  # the platform will retry it
            assert await _readyz(bridge) == 503
            await asyncio.sleep(1.0)
            redis_server.start()
            assert (await bridge.post(refused))[0] == 200  # the platform's retry
            await wait_for(lambda: len(yach.shown) >= len(QUESTIONS) + 1, 20, "every answer")
            await wait_for(lambda: _ready_now(bridge), 5, "ready again")
            await asyncio.sleep(2.5)  # past BRIDGE_CLAIM_IDLE_S: a second answer would show
            assert redis_server.client().xlen(Keys(bot_id).inbox) == 0
    finally:
        await upstream.close()
    for question in [*QUESTIONS, "while down"]:
        assert _answered(yach, question) == 1, (question, yach.texts())
    # The turns in flight rode the outage out: none had to be asked again.
    assert sorted(upstream.started) == sorted([*QUESTIONS, "while down"])
    for sender in ("u0", "u1"):  # each session's answers in order
        asked = [q for n, q in enumerate(QUESTIONS) if f"u{n % 2}" == sender]
        shown = [t.partition(".")[0].removeprefix("You said: ") for t in yach.texts()]
        assert [q for q in shown if q in asked] == asked


def _ready_now(bridge: RunningBridge) -> bool:
    worker = bridge.bridge.worker
    return bool(worker and worker.healthy)


async def test_redis_restarted_empty_gets_its_group_back_and_new_messages_answered(
    bot_id: str, yach: FakeYach, redis_server: RedisServer
) -> None:
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    env = bridge_env(redis_server.url, bot_id, yach, **openai_env(upstream.base_url),
                     BRIDGE_CLAIM_IDLE_S="2")  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("before")))[0] == 200
            await wait_for(lambda: len(yach.shown) == 1, 10, "the first answer")
            redis_server.shutdown()
            redis_server.wipe()
            redis_server.start()
            assert not redis_server.client().exists(keys.inbox)  # the group is gone with it
            status = 0
            for _ in range(50):  # the first command on a stale pooled connection may fail
                status = (await bridge.post(group_message("after")))[0]
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            await wait_for(lambda: len(yach.shown) == 2, 15, "the answer after the restart")
            groups = redis_server.client().xinfo_groups(keys.inbox)
            assert [group["name"] for group in groups] == [GROUP.encode()]
            await wait_for(lambda: _ready_now(bridge), 5, "ready again")
            assert await _readyz(bridge) == 200
    finally:
        await upstream.close()
    assert [t.partition(".")[0] for t in yach.texts()] == ["You said: before", "You said: after"]


async def test_redis_down_at_start_then_up_the_bridge_connects_and_answers(
    bot_id: str, yach: FakeYach, tmp_path: Path
) -> None:
    """Started before its Redis: webhooks are refused (503, nothing stored, the platform
    retries) until Redis answers; then the workers connect and the retry is answered once.
    The log says so: after the `redis_unavailable` warnings, one `redis_reconnected` line
    (before, the warnings only stopped, and the journal never said Redis was back)."""
    upstream = await PacedOpenAI().start()
    server = RedisServer(tmp_path / "late-redis")
    env = bridge_env(server.url, bot_id, yach, **openai_env(upstream.base_url))
    message = group_message("are you up?")
    try:
        with capture_logs() as logs:
            await _answer_once_redis_is_up(env, server, message, yach)
    finally:
        await upstream.close()
        server.close()
    assert yach.texts() == ["You said: are you up?. (history: 0 messages)"]
    events = [log["event"] for log in logs]
    assert "redis_unavailable" in events
    [back] = [log for log in logs if log["event"] == "redis_reconnected"]
    assert events.index("redis_unavailable") < events.index("redis_reconnected")
    assert back["down_s"] > 0


async def _answer_once_redis_is_up(
    env: dict[str, str], server: RedisServer, message: dict[str, object], yach: FakeYach
) -> None:
    async with running_bridge(env) as bridge:
        assert (await bridge.post(message))[0] == 503
        assert await _readyz(bridge) == 503
        server.start()
        status = 0
        for _ in range(100):  # the platform's retries, until one is stored
            status = (await bridge.post(message))[0]
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        await wait_for(lambda: len(yach.shown) >= 1, 10, "the answer")
        await wait_for(lambda: _ready_now(bridge), 10, "ready")
        assert await _readyz(bridge) == 200
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("outage_s", [0.0, 0.5], ids=["cut", "cut-and-out-of-reach"])
async def test_a_start_whose_answer_is_lost_starts_its_turn_once_and_at_once(
    bot_id: str, yach: FakeYach, redis_server: RedisServer, outage_s: float
) -> None:
    """q2 waits behind q1 in one session. When q1 is done, q2's start takes the lock and
    counts its attempt, and its answer is lost on the way back (the connection cut, by a
    proxy in front of Redis); the client sends the call again at once — or, with Redis out
    of reach for a moment, that fails too and the worker tries again later. Those tries
    found the session locked by a token they never learnt: q2 waited for the lock to expire
    (BRIDGE_CLAIM_IDLE_S) and counted its attempt again, so with BRIDGE_MAX_ATTEMPTS=1 it was
    dead-lettered instead of answered. Made again under the same name (`Sessions.start`'s
    `call`), a try gets the answer it had (the second case found by review)."""
    proxy = await RedisProxy(redis_server.socket).start()
    upstream = await PacedOpenAI(pace=lambda q: 1.0 if q == "q1" else 0.0).start()
    env = bridge_env(
        proxy.url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_CLAIM_IDLE_S="2", BRIDGE_MAX_ATTEMPTS="1",
    )  # fmt: skip
    start_script = hashlib.sha1(_START.encode()).hexdigest().encode()
    try:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("q1")))[0] == 200
            await wait_for(lambda: upstream.started == ["q1"], 5, "q1 asked")
            assert (await bridge.post(group_message("q2")))[0] == 200
            # a start that took the lock
            proxy.lose_answer(start_script, b"*7\r\n", then_partition=outage_s > 0)
            started = await asyncio.wait_for(proxy.lost.wait(), 5)
            await asyncio.sleep(outage_s)
            proxy.heal()
            await wait_for(lambda: len(yach.shown) == 2, 10, "both answered")
    finally:
        await upstream.close()
        await proxy.close()
    assert started
    assert [t.partition(".")[0] for t in yach.texts()] == ["You said: q1", "You said: q2"]
    assert upstream.started == ["q1", "q2"]
