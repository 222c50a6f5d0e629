"""A Redis user whose ACL forbids what chatbridge does: `check` names what to grant, `run`
refuses to start saying so, and a refusal while running is logged once, not as an outage.

Each test makes an ACL user of its own on the test Redis (a unique name, deleted at the
end) and connects with a URL that carries its name and password. The embedded Redis of the
tests is 6.2; the Redis 7 case runs where CHATBRIDGE_TEST_REDIS_URL names a Redis 7."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bridge.access import acl_rules
from bridge.messages import MESSAGES
from bridge.store import Keys
from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge
from tests.integration.test_cli_check import check, good_env
from tests.integration.test_delivery_stop import LONG_ANSWER
from tests.procs import PacedOpenAI, wait_for

PASSWORD = "acl-pw-5d2e-secret"
MakeUser = Callable[[str], Awaitable[str]]


def with_user(url: str, user: str) -> str:
    """`url` as `user` (any credentials it had replaced): `unix://user:pw@/path` too."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))


@pytest.fixture
async def acl_user(redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[MakeUser]:
    """Makes ACL users with the rules given (after `on` and the password); their URLs."""
    made: list[str] = []

    async def make(rules: str) -> str:
        name = f"chatbridge-test-{uuid.uuid4().hex[:10]}"
        await redis_client.execute_command(
            "ACL", "SETUSER", name, "on", f">{PASSWORD}", *rules.split()
        )
        made.append(name)
        return with_user(redis_url, name)

    try:
        yield make
    finally:
        if made:
            await redis_client.execute_command("ACL", "DELUSER", *made)


def on_prefix(bot_id: str, commands: str) -> str:
    """Every key and channel of the bot (none other), and `commands`."""
    pattern = f"{Keys(bot_id).prefix}*"
    return f"resetkeys ~{pattern} resetchannels &{pattern} {commands}"


def redis_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("redis:")]


async def test_check_names_the_stream_commands_a_user_may_not_run(
    tmp_path: Path, bot_id: str, acl_user: MakeUser
) -> None:
    """`check` ran INFO and GET only: it said "redis: ok" for a user that may not store or
    claim a message. It names each command to grant, never the password, and exits 1."""
    url = await acl_user(on_prefix(bot_id, "+@all -xadd -xautoclaim"))
    result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url, BRIDGE_BOT_ID=bot_id))
    assert result.code == 1, result.out + result.err
    lines = redis_lines(result.out)
    assert any("may not run XADD, XAUTOCLAIM: grant +xadd +xautoclaim" in line
               for line in lines), result.out  # fmt: skip
    assert not any(line.startswith("redis: ok") for line in lines), result.out
    assert any(acl_rules(Keys(bot_id)) in line for line in lines), result.out
    assert PASSWORD not in result.out + result.err


@pytest.mark.parametrize(
    ("rules", "said"),
    [
        ("resetkeys ~other:* resetchannels &{prefix}* +@all", "may not use the keys {prefix}*: "
         "grant ~{prefix}*"),
        ("resetkeys ~{prefix}* resetchannels +@all", "may not use the channel {prefix}control "
         "(PUBLISH, SUBSCRIBE): grant &{prefix}*"),
        ("resetkeys ~{prefix}* resetchannels &{prefix}* +@all -@dangerous",
         "may not run INFO: grant +info"),
    ],
    ids=["other keys", "no channel", "no dangerous"],
)
async def test_check_names_the_keys_channel_or_command_refused(
    tmp_path: Path, bot_id: str, acl_user: MakeUser, rules: str, said: str
) -> None:
    """The bot's keys, its `/stop` channel (a Redis 7 user has none by default), and INFO,
    which `-@dangerous` takes away."""
    prefix = Keys(bot_id).prefix
    url = await acl_user(rules.format(prefix=prefix))
    result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url, BRIDGE_BOT_ID=bot_id))
    assert result.code == 1, result.out + result.err
    [line, _] = redis_lines(result.out)
    assert said.format(prefix=prefix) in line, line


async def test_check_is_ok_for_a_user_with_all_it_needs_on_the_bot_alone(
    tmp_path: Path, bot_id: str, acl_user: MakeUser
) -> None:
    for rules in (acl_rules(Keys(bot_id)), on_prefix(bot_id, "+@all -@dangerous +info")):
        url = await acl_user(rules)
        result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url, BRIDGE_BOT_ID=bot_id))
        assert result.code == 0, result.out + result.err
        assert any(line.startswith("redis: ok") for line in result.lines), result.out


async def test_check_tells_a_refused_password_from_a_redis_that_does_not_answer(
    tmp_path: Path, bot_id: str, acl_user: MakeUser
) -> None:
    url = (await acl_user(acl_rules(Keys(bot_id)))).replace(PASSWORD, "wrong-pw-41c7")
    result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url, BRIDGE_BOT_ID=bot_id))
    assert result.code == 1, result.out + result.err
    [line] = redis_lines(result.out)
    assert "refuses its user" in line and "refused the credentials" in line, line
    assert "wrong-pw-41c7" not in result.out + result.err


async def test_check_names_the_channel_of_a_redis_7_user_made_without_one(
    tmp_path: Path, bot_id: str, redis_client: aioredis.Redis, acl_user: MakeUser
) -> None:
    """Redis 7 makes a new user with no Pub/Sub channel (`acl-pubsub-default resetchannels`):
    a user given keys and commands only could not carry `/stop` across processes."""
    version = (await redis_client.info("server"))["redis_version"]
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"Redis {version}: a new user gets every channel before Redis 7")
    url = await acl_user(f"~{Keys(bot_id).prefix}* +@all")
    result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url, BRIDGE_BOT_ID=bot_id))
    assert result.code == 1, result.out + result.err
    assert "may not use the channel" in redis_lines(result.out)[0], result.out


async def test_run_refuses_to_start_naming_what_to_grant(
    bot_id: str, yach: FakeYach, acl_user: MakeUser
) -> None:
    """Refused at start, the bridge said `redis_unavailable … will keep trying` and served
    503 for ever: a permission is no outage. It exits 1 (systemd restarts it with backoff)
    with one `startup_failed` line that says what to grant."""
    url = await acl_user(on_prefix(bot_id, "+@all -xadd"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(bridge_env(url, bot_id, yach, **openai_env("http://127.0.0.1:9/v1"),
                          BRIDGE_LOG_FORMAT="json", BRIDGE_LOG_LEVEL="info"))  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    output = out.decode()
    assert process.returncode == 1, output
    [line] = [line for line in output.splitlines() if '"startup_failed"' in line]
    assert "the Redis user may not run XADD: grant +xadd" in line, line
    assert "redis_unavailable" not in output and "listening" not in output
    assert PASSWORD not in output


async def test_the_least_rules_run_a_turn_and_a_refusal_later_is_logged_once(
    bot_id: str, yach: FakeYach, upstream: FakeOpenAI, redis_client: aioredis.Redis,
    acl_user: MakeUser,
) -> None:
    """Under exactly `acl_rules` (what the guide tells to grant) the bridge answers. Then
    SUBSCRIBE is taken away and the user's connections cut: the `/stop` listener is refused
    at each try, which was a `redis_unavailable` warning every few seconds, as for an
    outage; it is one `redis_refused` error, and the loop carries on once it is granted."""
    url = await acl_user(acl_rules(Keys(bot_id)))
    user = urlsplit(url).username
    env = bridge_env(url, bot_id, yach, **openai_env(upstream.base_url))
    with capture_logs() as logs:
        async with running_bridge(env) as bridge:
            assert (await bridge.post(group_message("hello")))[0] == 200
            await wait_for(lambda: len(yach.shown) == 1, 10, "the answer")
            await redis_client.execute_command("ACL", "SETUSER", user, "-subscribe")
            await redis_client.execute_command("CLIENT", "KILL", "USER", user)
            await wait_for(lambda: _events(logs, "redis_refused"), 5, "redis_refused")
            await wait_for_tries(redis_client, user, 3)
            await redis_client.execute_command("ACL", "SETUSER", user, "+subscribe")
            await wait_for(lambda: _events(logs, "redis_reconnected"), 10, "redis_reconnected")
    assert yach.texts() == ["You said: hello. (history: 0 messages)"]
    [refused] = _events(logs, "redis_refused")
    assert refused["log_level"] == "error" and refused["where"] == "_listen_loop", refused
    assert "subscribe" in refused["reason"] and "chatbridge check" in refused["reason"]
    # (one for the connection cut, which is no refusal)
    cut = [e for e in _events(logs, "redis_unavailable") if e["loop"] == "_listen_loop"]
    assert len(cut) <= 1 and all(e["error"] == "ConnectionError" for e in cut), cut


async def test_a_stop_whose_announcement_is_refused_is_confirmed_and_still_stops(
    bot_id: str, yach: FakeYach, redis_client: aioredis.Redis, acl_user: MakeUser
) -> None:
    """The stop key was set, then PUBLISH was refused: the `/stop` failed and was retried
    until it was dead-lettered, though the turn stopped all the same (every process finds
    the key at its next keep). It is confirmed at once, and the turn stops at that look."""
    upstream = await PacedOpenAI(answer=lambda _body: LONG_ANSWER, delay_s=0.02).start()
    url = await acl_user(acl_rules(Keys(bot_id)))
    user = urlsplit(url).username
    env = bridge_env(url, bot_id, yach, **openai_env(upstream.base_url), BRIDGE_LANG="en",
                     BRIDGE_CLAIM_IDLE_S="1.5", BRIDGE_REPLY_MODE="stream",
                     BRIDGE_FLUSH_MIN_CHARS="40", BRIDGE_FLUSH_MAX_WAIT_S="30")  # fmt: skip
    try:
        with capture_logs() as logs:
            async with running_bridge(env) as bridge:
                assert (await bridge.post(group_message("talk for a long time")))[0] == 200
                await wait_for(lambda: len(yach.shown) >= 2, 15, "the answer's start")
                await redis_client.execute_command("ACL", "SETUSER", user, "-publish")
                assert (await bridge.post(group_message("/stop")))[0] == 200
                await wait_for(lambda: MESSAGES["en"]["stopped"] in yach.texts(), 5, "stopped")
                await wait_until_stopped(redis_client, Keys(bot_id))  # (its next keep)
                shown_after_stop = len(yach.shown)
                await asyncio.sleep(1.5)
                assert len(yach.shown) == shown_after_stop
    finally:
        await upstream.close()
    assert len(upstream.started) == 1
    assert MESSAGES["en"]["dead_letter"] not in yach.texts()
    assert len(yach.texts()) < 20  # far from the whole answer
    assert _events(logs, "control_not_announced")


async def wait_until_stopped(client: aioredis.Redis, keys: Keys) -> None:
    """Until the stopped turn is acknowledged (which releases its session's lock)."""
    async with asyncio.timeout(5):
        while await client.xlen(keys.inbox) or await client.exists(keys.lock("yach:g:g1:u:u1")):
            await asyncio.sleep(0.05)


async def wait_for_tries(client: aioredis.Redis, user: str, tries: int) -> None:
    """Until Redis has refused `user` SUBSCRIBE `tries` times (its ACL LOG counts them)."""
    async with asyncio.timeout(10):
        while True:
            entries = await client.acl_log()
            if any(entry["username"] == user and entry["object"] == "subscribe"
                   and int(entry["count"]) >= tries for entry in entries):  # fmt: skip
                return
            await asyncio.sleep(0.05)


def _events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [log for log in logs if log["event"] == name]
