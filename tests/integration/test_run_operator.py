"""What `chatbridge run` tells the operator when it cannot start or cannot reach Redis: a
real `python -m bridge run` process, its JSON log read as an operator reads the journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, openai_env
from tests.procs import BridgeProcess, RedisServer, Spawner, closing_all

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "redis-pw-7f3a-secret"


async def test_a_redis_that_wants_a_password_is_named_as_the_reason(
    tmp_path: Path, bot_id: str, yach: FakeYach
) -> None:
    """A Redis that refuses the bridge (no password, or a wrong one) was logged as
    `redis_unavailable` with `error: ConnectionError` and nothing else, again and again: the
    same words as a Redis that is down, so the operator could not tell a missing password
    from a dead server. Then it said what Redis answered, still again and again, the bridge
    serving 503 meanwhile; a refusal is no outage: the start is given up, exit 1, with one
    `startup_failed` line that says what Redis answered (and never the password)."""
    server = RedisServer(tmp_path / "redis")
    wrong = server.url.replace("unix://", "unix://:wrong-pw-9c1e@")
    for n, url in enumerate((server.url, wrong)):
        server.start().client().config_set("requirepass", REDIS_PASSWORD)
        env = bridge_env(url, bot_id, yach, **openai_env("http://127.0.0.1:9/v1"))
        bridge = BridgeProcess(env, tmp_path / f"bridge{n}.log")
        with closing_all(bridge, server):
            with pytest.raises(AssertionError, match="exited at start"):
                await bridge.start()
            assert await bridge.wait(10) == 1
            [failed] = bridge.events("startup_failed")
            assert "refused the credentials" in failed["error"], failed
            assert not bridge.events("redis_unavailable")
        log = (tmp_path / f"bridge{n}.log").read_text()
        assert "wrong-pw-9c1e" not in log and REDIS_PASSWORD not in log


async def test_variables_never_read_are_logged_at_start_as_check_prints_them(
    redis_url: str, bot_id: str, yach: FakeYach, spawn: Spawner
) -> None:
    """A typo in the unit's EnvironmentFile (BRIDGE_DRAIN_TIMEOUT instead of …_S) was silent
    under `run`: the setting kept its default and only `check` said why."""
    env = bridge_env(redis_url, bot_id, yach, **openai_env("http://127.0.0.1:9/v1"),
                     BRIDGE_DRAIN_TIMEOUT="5")  # fmt: skip
    bridge = await spawn(env).start()
    [line] = bridge.events("variable_not_read")
    assert line["level"] == "warning"
    assert line["detail"] == (
        "BRIDGE_DRAIN_TIMEOUT is not a chatbridge variable; did you mean BRIDGE_DRAIN_TIMEOUT_S?"
    )
