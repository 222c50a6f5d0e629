"""Several bridge processes on one Redis, and one of them has a bad day (SPEC §5, §6):
SIGKILLed while it runs a session's turn with more of the session queued, SIGTERMed with
turns outlasting its drain window, frozen (SIGSTOP) past BRIDGE_CLAIM_IDLE_S and resumed.
The others finish its work: each message answered once, each session in order, nothing
shown twice, nothing saved by the process that lost its turn.

Unless a test says otherwise, replies go through the custom robot URL, which does not
deduplicate: a second answer to a message would show."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes import yach as fake_yach
from tests.fakes.openai import GATED_HEAD, GatedOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import (
    BridgeProcess,
    PacedOpenAI,
    RedisProxy,
    RedisServer,
    Spawner,
    post_webhook,
    wait_acknowledged,
    wait_for,
)

pytestmark = pytest.mark.slow

EN = MESSAGES["en"]
CLAIM_IDLE_S = 2.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _env(
    redis_url: str, bot_id: str, yach: FakeYach, upstream_url: str, **extra: str
) -> dict[str, str]:
    return bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream_url),
        **{"BRIDGE_LANG": "en", "BRIDGE_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
           "BRIDGE_SESSION_QUEUE_MAX": "10", **extra},
    )  # fmt: skip


async def _start_all(spawn: Spawner, env: dict[str, str], names: str) -> list[BridgeProcess]:
    bridges = [spawn(env, name) for name in names]
    await asyncio.gather(*(bridge.start() for bridge in bridges))
    return bridges


def _runner_of(bridges: list[BridgeProcess], question: str) -> BridgeProcess | None:
    """The bridge whose log shows the turn of `question` started (by its msg_id)."""
    for bridge in bridges:
        if any(event.get("msg_id") == question for event in bridge.events("turn_started")):
            return bridge
    return None


def _said(yach: FakeYach) -> list[str]:
    """The questions the answers echo, in the order they showed."""
    return [t.removeprefix("You said: ").partition(".")[0] for t in yach.texts()]


async def test_sigkill_of_the_process_running_a_session_turn_the_others_finish_the_session_in_order(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Three processes; one session's four messages posted to all three in turn. The
    process running the first turn is SIGKILLed mid-turn: the two left run the first turn
    again and then the rest, in order, each answered once."""
    slow = {"on": True}
    upstream = await PacedOpenAI(pace=lambda q: 30.0 if q == "m0" and slow["on"] else 0.2).start()
    env = _env(redis_url, bot_id, yach, upstream.base_url)
    questions = [f"m{n}" for n in range(4)]
    try:
        bridges = await _start_all(spawn, env, "abc")
        for n, question in enumerate(questions):
            message = group_message(question, msg_id=question)
            assert await post_webhook(http, bridges[n % 3].url, message) == 200
        await wait_for(lambda: upstream.started == ["m0"], 10, "the first turn started")
        await wait_for(lambda: _runner_of(bridges, "m0") is not None, 5, "its runner logged")
        victim = _runner_of(bridges, "m0")
        assert victim is not None
        slow["on"] = False
        victim.kill()
        await wait_for(lambda: len(yach.shown) >= 4, 6 * CLAIM_IDLE_S + 10, "four answers")
        await wait_acknowledged(redis_client, Keys(bot_id).inbox)
        await asyncio.sleep(2 * CLAIM_IDLE_S)  # a second answer would show by now
    finally:
        await upstream.close()
    assert _said(yach) == questions, yach.texts()
    assert upstream.started == ["m0", *questions]  # m0 ran again (nothing was journalled)
    dead = await redis_client.xlen(Keys(bot_id).dead)
    assert dead == 0


async def test_sigterm_with_turns_outlasting_the_drain_the_live_process_finishes_them_once(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Process A runs two long turns (two sessions) when it is SIGTERMed with a drain
    window shorter than them; a third message waits behind one of them in process B. A
    exits 0 leaving its turns pending; B, alive all along, answers all three, once each,
    the waiting one after the turn it waited for — long before BRIDGE_CLAIM_IDLE_S."""
    upstream = await PacedOpenAI(pace=lambda q: 3.0 if q.startswith("long") else 0.0).start()
    env = _env(
        redis_url, bot_id, yach, upstream.base_url,
        BRIDGE_DRAIN_TIMEOUT_S="1", BRIDGE_CLAIM_IDLE_S="30",
    )  # fmt: skip
    try:
        a, b = await _start_all(spawn, env, "ab")
        for question, sender in (("long1", "u1"), ("long2", "u2")):
            message = group_message(question, msg_id=question, sender=sender)
            assert await post_webhook(http, a.url, message) == 200
        await wait_for(lambda: sorted(upstream.started) == ["long1", "long2"], 10, "both started")
        behind = group_message("next1", msg_id="next1", sender="u1")
        assert await post_webhook(http, b.url, behind) == 200
        await asyncio.sleep(0.3)
        assert _runner_of([a, b], "long1") is a and _runner_of([a, b], "long2") is a
        a.signal(signal.SIGTERM)
        assert await a.wait(10) == 0
        [drained] = a.events("drained")
        assert drained["interrupted"] == 2
        await wait_for(lambda: len(yach.shown) >= 3, 15, "three answers from B")
        await wait_acknowledged(redis_client, Keys(bot_id).inbox)
        await asyncio.sleep(1.0)
    finally:
        await upstream.close()
    said = _said(yach)
    assert sorted(said) == ["long1", "long2", "next1"], yach.texts()
    assert said.index("long1") < said.index("next1")
    assert sorted(upstream.started) == ["long1", "long1", "long2", "long2", "next1"]


def _app_api(upstream_url: str) -> dict[str, str]:
    """Streamed replies through the app API (it shows a `message_id` once): a replay may
    resend a piece whose confirmation it did not find."""
    return {
        "BRIDGE_REPLY_MODE": "stream", "BRIDGE_FLUSH_MIN_CHARS": "20",
        "BRIDGE_FLUSH_MAX_WAIT_S": "30",
        "BRIDGE_YACH_APP_KEY": fake_yach.APP_KEY, "BRIDGE_YACH_APP_SECRET": fake_yach.APP_SECRET,
    }  # fmt: skip


def _sends(yach: FakeYach) -> list[str]:
    """The message_id of every send the platform received (shown or not)."""
    return [r.json()["message_id"] for r in yach.server.on("/group/robot/message/send")]


async def test_a_process_frozen_past_the_claim_and_resumed_sends_and_saves_nothing_more(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A runs a streamed turn: two pieces shown, the rest still to come. A is frozen
    (SIGSTOP) past BRIDGE_CLAIM_IDLE_S: B claims the entry, replays the journal (no new
    question upstream) with the cut-off notice, records the turn and acknowledges it. The
    rest of the answer then reaches A, and A is resumed (SIGCONT): it must send nothing
    more — no piece, no second notice — and record nothing (the history has B's one
    turn); the session's next question runs normally."""
    upstream = await GatedOpenAI().start()
    keys = Keys(bot_id)
    session = "yach:g:g1:u:u1"
    env = _env(redis_url, bot_id, yach, upstream.base_url, **_app_api(upstream.base_url))
    try:
        a, b = await _start_all(spawn, env, "ab")
        assert await post_webhook(http, a.url, group_message("tell me", msg_id="first")) == 200
        await wait_for(lambda: len(yach.shown) >= 2, 10, "two pieces shown")
        assert _runner_of([a, b], "first") is a
        a.signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: EN["cut_off"] in yach.texts(), 4 * CLAIM_IDLE_S + 5,
                           "B replayed the journal")  # fmt: skip
            await wait_acknowledged(redis_client, keys.inbox)
            upstream.gate.set()  # the rest of the answer reaches the frozen A
            await asyncio.sleep(0.5)
            shown_before, sends_before = yach.texts(), _sends(yach)
        finally:
            a.signal(signal.SIGCONT)
        await wait_for(lambda: bool(a.events("session_lock_lost") or a.events("entry_lost")),
                       3 * CLAIM_IDLE_S, "A gave the turn up")  # fmt: skip
        await asyncio.sleep(1.0)
        assert yach.texts() == shown_before
        assert _sends(yach) == sends_before
        history = await redis_client.lrange(keys.history(session), 0, -1)
        turns = await redis_client.hget(keys.session(session), "turns")
        # The session's next question, answered as usual (the whole gated answer at once).
        assert await post_webhook(http, b.url, group_message("next", msg_id="next")) == 200
        await wait_for(lambda: upstream.started == 2 and len(yach.shown) > len(shown_before),
                       10, "the next answer")  # fmt: skip
        await wait_acknowledged(redis_client, keys.inbox)
    finally:
        await upstream.close()
    assert upstream.started == 2  # B's replay asked nothing
    assert len(history) == 1 and turns == b"1", (history, turns)
    texts = shown_before
    assert texts[-1] == EN["cut_off"] and texts.count(EN["cut_off"]) == 1
    assert all(t.strip() in GATED_HEAD for t in texts[:-1]), texts
    assert len(set(_sends(yach))) == len(yach.shown)  # resends reused their message_id


async def test_a_process_frozen_before_its_thinking_notice_does_not_send_it_once_resumed(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A's turn waits for a slow first token; A is frozen before its "thinking" notice is
    due, and stays frozen past BRIDGE_CLAIM_IDLE_S: B claims the entry and answers it at
    once (no notice needed). Resumed, A finds its notice overdue: it must not send it — a
    "thinking" notice after the answer, from a turn that is not A's any more."""
    calls = {"n": 0}

    def pace(_question: str) -> float:
        calls["n"] += 1
        return 30.0 if calls["n"] == 1 else 0.0

    upstream = await PacedOpenAI(pace=pace).start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream.base_url, BRIDGE_THINKING_NOTICE_S="3")
    try:
        a, b = await _start_all(spawn, env, "ab")
        assert await post_webhook(http, a.url, group_message("slow", msg_id="slow")) == 200
        await wait_for(lambda: upstream.started == ["slow"], 10, "A asked the upstream")
        assert _runner_of([a, b], "slow") is a
        a.signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: len(yach.shown) >= 1, 4 * CLAIM_IDLE_S + 5, "B's answer")
            await wait_acknowledged(redis_client, keys.inbox)
            await asyncio.sleep(3.0)  # past A's notice time (3 s after its turn began)
        finally:
            a.signal(signal.SIGCONT)
        await wait_for(lambda: bool(a.events("entry_given_up") or a.events("session_lock_lost")),
                       3 * CLAIM_IDLE_S, "A gave the turn up")  # fmt: skip
        await asyncio.sleep(1.0)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: slow. (history: 0 messages)"]


async def test_reset_read_by_another_process_stops_the_turn_there_and_the_next_starts_afresh(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A runs a long turn of a session that has one earlier exchange and one more question
    queued; `/reset` is read by B. The turn in A stops (nothing of it sent), B confirms the
    reset once it has, and the queued question starts a new conversation: no history."""
    upstream = await PacedOpenAI(pace=lambda q: 60.0 if q == "long" else 0.0).start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream.base_url)
    try:
        a, b = await _start_all(spawn, env, "ab")
        assert await post_webhook(http, a.url, group_message("warm", msg_id="warm")) == 200
        await wait_for(lambda: len(yach.shown) == 1, 10, "the first answer")
        await wait_acknowledged(redis_client, keys.inbox)
        for question in ("long", "queued"):
            message = group_message(question, msg_id=question)
            assert await post_webhook(http, a.url, message) == 200
        await wait_for(lambda: _runner_of([a, b], "long") is a, 10, "A runs the long turn")
        assert await post_webhook(http, b.url, group_message("/reset", msg_id="reset")) == 200
        await wait_for(lambda: len(yach.shown) == 3, 4 * CLAIM_IDLE_S, "reset and answer")
        await wait_acknowledged(redis_client, keys.inbox)
        await asyncio.sleep(2 * CLAIM_IDLE_S)  # a stopped turn stays stopped
    finally:
        await upstream.close()
    assert any(e.get("msg_id") == "reset" for e in b.events("command"))  # B read it
    assert [e["msg_id"] for e in a.events("turn_stopped")] == ["long"]
    assert yach.texts() == [
        "You said: warm. (history: 0 messages)",
        EN["reset_done"],
        "You said: queued. (history: 0 messages)",
    ]
    assert upstream.started == ["warm", "long", "queued"]


async def test_one_message_delivered_to_two_processes_at_once_and_again_later_is_answered_once(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """The platform's retries of one message race across two processes (three to each, at
    once), and come again after its answer was acknowledged: stored and answered once."""
    upstream = await PacedOpenAI().start()
    keys = Keys(bot_id)
    env = _env(redis_url, bot_id, yach, upstream.base_url)
    message = group_message("once please")
    try:
        a, b = await _start_all(spawn, env, "ab")
        statuses = await asyncio.gather(
            *(post_webhook(http, bridge.url, message) for bridge in (a, b, a, b, a, b))
        )
        assert statuses == [200] * 6
        await wait_for(lambda: len(yach.shown) >= 1, 10, "the answer")
        await wait_acknowledged(redis_client, keys.inbox)
        for bridge in (a, b):
            assert await post_webhook(http, bridge.url, message) == 200
        await asyncio.sleep(2 * CLAIM_IDLE_S)
    finally:
        await upstream.close()
    assert yach.texts() == ["You said: once please. (history: 0 messages)"]
    assert upstream.started == ["once please"]
    assert await redis_client.xlen(keys.inbox) == 0


async def test_a_reset_frozen_mid_way_and_resumed_after_it_was_done_elsewhere_forgets_nothing_new(
    redis_url: str, bot_id: str, redis_client: aioredis.Redis, yach: FakeYach,
    spawn: Spawner, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """C runs a long turn and is frozen; A reads `/reset`, stops that turn and waits for it
    to let go — and is frozen too. B, alive, takes both entries over: it carries the reset
    out (once), acknowledges the stopped turn, and answers the question queued behind it in
    the new conversation. Then A is resumed: its reset was done already, by B — it must not
    forget the session again (the new conversation's history), nor delete it upstream."""
    upstream = await PacedOpenAI(pace=lambda q: 60.0 if q == "long" else 0.0).start()
    keys = Keys(bot_id)
    session = "yach:g:g1:u:u1"
    env = _env(redis_url, bot_id, yach, upstream.base_url,
               **{**_app_api(upstream.base_url), "BRIDGE_REPLY_MODE": "final"})  # fmt: skip
    try:
        a, b, c = await _start_all(spawn, env, "abc")
        assert await post_webhook(http, c.url, group_message("warm", msg_id="warm")) == 200
        await wait_for(lambda: len(yach.shown) == 1, 10, "the first answer")
        await wait_acknowledged(redis_client, keys.inbox)
        assert await post_webhook(http, c.url, group_message("long", msg_id="long")) == 200
        await wait_for(lambda: _runner_of([a, b, c], "long") is c, 10, "C runs the long turn")
        assert await post_webhook(http, b.url, group_message("queued", msg_id="queued")) == 200
        c.signal(signal.SIGSTOP)  # its turn will not let go: A's reset waits for its lock
        try:
            assert await post_webhook(http, a.url, group_message("/reset", msg_id="reset")) == 200
            await wait_for(lambda: any(e.get("msg_id") == "reset" for e in a.events("command")),
                           1.0, "A runs the reset")  # fmt: skip
            a.signal(signal.SIGSTOP)
            try:
                await wait_for(lambda: "You said: queued." in " ".join(yach.texts()), 40,
                               "B answers the queued question after the reset")  # fmt: skip
                await wait_acknowledged(redis_client, keys.inbox)
                history_before = await redis_client.llen(keys.history(session))
            finally:
                a.signal(signal.SIGCONT)
        finally:
            c.kill()
        await asyncio.sleep(2 * CLAIM_IDLE_S)  # A goes on with its reset meanwhile
        assert await post_webhook(http, b.url, group_message("after", msg_id="after")) == 200
        await wait_for(lambda: "You said: after." in " ".join(yach.texts()), 10, "after")
        await wait_acknowledged(redis_client, keys.inbox)
    finally:
        await upstream.close()
    assert history_before == 1
    assert yach.texts() == [
        "You said: warm. (history: 0 messages)",
        EN["reset_done"],
        "You said: queued. (history: 0 messages)",
        "You said: after. (history: 2 messages)",  # the new conversation, not forgotten
    ]



async def test_a_process_cut_from_redis_after_its_last_send_leaves_the_turn_to_the_other(
    bot_id: str, yach: FakeYach, spawn: Spawner, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A (behind a proxy to a private Redis) sends the whole answer, and loses Redis before
    the platform's 200 reaches it: a partition of A alone, longer than BRIDGE_CLAIM_IDLE_S.
    B takes the entry over and replays the journal (the unconfirmed piece again, shown once
    by the app API). The partition ends while B's resend is on its way and A still rides
    its outage out: A's record is refused (the lock is B's) — and A must then leave the
    entry alone. It acknowledged it instead, under B's replay: B gave the entry up, the
    turn was never recorded (the question behind it came without it in its history), and
    B's session lock stayed until it expired. (Frozen instead of cut off, A does not get
    that far: its keep loop, overdue, finds the entry claimed first.)"""
    keys = Keys(bot_id)
    async with _cut_after_last_send(bot_id, yach, spawn, http, tmp_path, claim_idle_s=6) as (
        a, b, proxy, client, upstream
    ):
        assert await post_webhook(http, b.url, group_message("q1", msg_id="q1")) == 200
        await asyncio.sleep(5.0)
        yach.hold_next()
        yach.held[0].set()  # A learns the piece was sent: it marks it, riding the outage out
        await wait_for(lambda: len(yach.held) == 2, 10,
                       "B replays: the unconfirmed piece resent, its 200 held")  # fmt: skip
        proxy.heal()
        await wait_for(
            lambda: bool(a.events("turn_done") or a.events("entry_lost")
                         or a.events("redis_error")),
            10, "A went on",
        )  # fmt: skip
        await asyncio.sleep(3.0)  # B's keep loop runs meanwhile
        yach.held[1].set()
        await wait_for(lambda: len(yach.shown) >= 2, 20, "q1 answered")
        await wait_acknowledged(client, keys.inbox)
    assert not b.events("entry_lost"), b.events("entry_lost")
    assert yach.texts() == [
        "You said: q0. (history: 0 messages)",
        "You said: q1. (history: 2 messages)",  # q0 recorded, once
    ]
    assert upstream.started == ["q0", "q1"]


async def test_a_process_cut_from_redis_after_its_last_send_counts_no_turn_the_other_finished(
    bot_id: str, yach: FakeYach, spawn: Spawner, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """As above, but B's replay ends first: B resends the unconfirmed piece (shown once by
    the app API), records the turn and acknowledges it. Then A learns its send went and
    gets Redis back: its record is refused (the lock is gone), and its ack finds the entry
    no longer pending. That ack used to succeed as if the entry were A's: A logged
    `turn_done` and counted the turn in `turns_total` — one message counted by both
    processes (B as `replayed`, A as `completed`). It is B's turn alone now."""
    keys = Keys(bot_id)
    async with _cut_after_last_send(bot_id, yach, spawn, http, tmp_path,
                                    claim_idle_s=CLAIM_IDLE_S) as (a, b, proxy, client, upstream):
        await wait_for(lambda: bool(b.events("turn_done")), 4 * CLAIM_IDLE_S + 5,
                       "B replayed the turn")  # fmt: skip
        await wait_acknowledged(client, keys.inbox)
        yach.held[0].set()  # A learns the piece was sent, riding its outage out
        proxy.heal()
        await wait_for(lambda: bool(a.events("turn_done") or a.events("entry_lost")),
                       15, "A went on")  # fmt: skip
        counted = {name: await _turns_counted(http, bridge) for name, bridge in (("a", a),
                                                                                  ("b", b))}
    assert [e["outcome"] for e in b.events("turn_done")] == ["replayed"]
    assert not a.events("turn_done"), a.events("turn_done")
    [lost] = a.events("entry_lost")
    assert lost["reason"] == "acknowledged by another worker", lost
    assert counted == {"a": {}, "b": {"replayed": 1.0}}, counted
    assert yach.texts() == ["You said: q0. (history: 0 messages)"]
    assert upstream.started == ["q0"]


async def _turns_counted(http: aiohttp.ClientSession, bridge: BridgeProcess) -> dict[str, float]:
    """`turns_total` of one process by outcome, the outcomes it counted any of."""
    async with http.get(f"{bridge.url}/metrics") as response:
        text = await response.text()
    counted = {}
    for line in text.splitlines():
        if line.startswith("chatbridge_turns_total{"):
            outcome = line.partition('outcome="')[2].partition('"')[0]
            if float(line.rpartition(" ")[2]):
                counted[outcome] = float(line.rpartition(" ")[2])
    return counted


@contextlib.asynccontextmanager
async def _cut_after_last_send(
    bot_id: str, yach: FakeYach, spawn: Spawner, http: aiohttp.ClientSession, tmp_path: Path,
    *, claim_idle_s: float,
) -> AsyncIterator[tuple[BridgeProcess, BridgeProcess, RedisProxy, aioredis.Redis,
                         PacedOpenAI]]:  # fmt: skip
    """A (behind a proxy to a private Redis) and B; A has sent q0's whole answer (final
    mode, app API), the platform holds its 200 (`yach.held[0]`), and A is cut from Redis."""
    server = RedisServer(tmp_path / "redis").start()
    proxy = await RedisProxy(server.socket).start()
    client = aioredis.Redis(unix_socket_path=str(server.socket))
    upstream = await PacedOpenAI().start()
    env = _env(server.url, bot_id, yach, upstream.base_url,
               **{**_app_api(upstream.base_url), "BRIDGE_REPLY_MODE": "final",
                  "BRIDGE_CLAIM_IDLE_S": str(claim_idle_s)})  # fmt: skip
    try:
        a, b = spawn({**env, "BRIDGE_REDIS_URL": proxy.url}, "a"), spawn(env, "b")
        await asyncio.gather(a.start(), b.start())
        yach.hold_next()
        assert await post_webhook(http, a.url, group_message("q0", msg_id="q0")) == 200
        await wait_for(lambda: len(yach.held) == 1, 10, "A's answer sent, the 200 held")
        assert _runner_of([a, b], "q0") is a
        proxy.partition()
        yield a, b, proxy, client, upstream
    finally:
        await upstream.close()
        await proxy.close()
        await client.aclose()
        server.close()
