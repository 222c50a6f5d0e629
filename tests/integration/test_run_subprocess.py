"""`chatbridge run` as a real process: embedded Redis, a signed webhook, the reply, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest

from tests.fakes.openai import FakeOpenAI
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, signed_headers, wait_until

pytestmark = pytest.mark.slow

RECORDINGS = Path(__file__).resolve().parents[2] / "bridge" / "recordings"


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeYach, FakeOpenAI]]:
    yach, upstream = await FakeYach().start(), await FakeOpenAI().start()
    yield yach, upstream
    await yach.close()
    await upstream.close()


async def start_bridge(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}, **env}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = await process.stdout.readline()
            assert line, "the bridge exited before listening"
            event = json.loads(line)
            assert event.get("bot") == env["BRIDGE_BOT_ID"], event  # every line names the bot
            if event["event"] == "listening":
                assert event["event_loop"] == "uvloop"  # the daemon's loop, and it says so
                return process, int(event["port"])


async def test_run_with_embedded_redis_answers_and_stops_cleanly(
    fakes: tuple[FakeYach, FakeOpenAI], tmp_path: Path, bot_id: str
) -> None:
    yach, upstream = fakes
    env = bridge_env("", bot_id, yach, BRIDGE_STATE_DIR=str(tmp_path),
                     BRIDGE_LOG_FORMAT="json", BRIDGE_LOG_LEVEL="info",
                     **openai_env(upstream.base_url))
    assert "BRIDGE_REDIS_URL" not in env
    process, port = await start_bridge(env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            for _ in range(100):
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert response.status == 200
            body = json.dumps(group_message("what is OpenStack?"))
            async with session.post(f"{base}/webhook/yach", data=body,
                                    headers={**signed_headers(),
                                             "Content-Type": "application/json"}) as response:
                assert response.status == 200
            await wait_until(lambda: len(yach.shown) == 1, timeout=20)
            assert yach.texts() == ["You said: what is OpenStack?. (history: 0 messages)"]
            async with session.get(f"{base}/metrics") as response:
                metrics = await response.text()
            assert 'chatbridge_webhook_requests_total{status="200"} 1.0' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0
    assert any((tmp_path / "redis").glob("appendonly*")), "embedded Redis keeps an AOF"


async def test_configuration_error_exits_2_naming_the_variable(tmp_path: Path) -> None:
    code, output, lines = await _run_to_exit(
        BRIDGE_UPSTREAM="openai", BRIDGE_PORT="http", BRIDGE_STATE_DIR=str(tmp_path)
    )
    assert code == 2
    assert any(line.startswith("chatbridge: BRIDGE_PORT:") for line in lines)
    assert any("BRIDGE_OPENAI_API_KEY" in line and "example" in line for line in lines)
    assert "Traceback" not in output


async def test_an_upstream_that_cannot_be_set_up_exits_2_without_a_traceback(
    tmp_path: Path,
) -> None:
    """What only the adapter can tell (here: a recording that exists but cannot be read, a
    socket) is a configuration error of `run` as of `check`: exit 2, one line naming the
    variable."""
    unreadable = tmp_path / "answer.sse"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(unreadable))
        code, output, lines = await _run_to_exit(
            BRIDGE_UPSTREAM="replay", BRIDGE_REPLAY_FILE=str(unreadable),
            BRIDGE_REPLAY_FORMAT="openai", BRIDGE_YACH_INSECURE="1", BRIDGE_PORT="0",
            BRIDGE_STATE_DIR=str(tmp_path),
        )
    assert code == 2
    assert any(line.startswith("chatbridge: BRIDGE_UPSTREAM=replay cannot be set up: cannot "
                               "read replay file") for line in lines), lines
    assert "Traceback" not in output


async def _run_to_exit(**settings: str) -> tuple[int | None, str, list[str]]:
    """`python -m bridge run` with only these BRIDGE_* variables, until it exits by itself:
    its exit code, all it printed, and its stderr's lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env={**env, **settings},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, stdout.decode() + stderr.decode(), stderr.decode().splitlines()


async def test_sigterm_while_starting_stops_cleanly_with_exit_0(tmp_path: Path) -> None:
    """SIGTERM before the bridge listens (here: a Redis that accepts connections and does
    not answer, so the start waits on it) is a clean stop like any other: exit 0, a
    `stopped` line, and at once, not after the start's 10 s Redis timeout. The handlers were
    installed only once listening, so the signal's default action killed the process (-15)
    with no drain and no cleanup."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_REDIS_URL=f"redis://127.0.0.1:{port}/0", BRIDGE_UPSTREAM="replay",
        BRIDGE_REPLAY_FILE=str(Path(__file__).parents[2] / "bridge" / "recordings"),
        BRIDGE_YACH_INSECURE="1", BRIDGE_PORT="0", BRIDGE_LOG_FORMAT="json",
        BRIDGE_LOG_LEVEL="info", BRIDGE_DRAIN_TIMEOUT_S="2",
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await asyncio.wait_for(connected.wait(), 30)  # the start is waiting on Redis now
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 8)  # (Redis times out at 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for writer in held:
            writer.close()
        server.close()
    events = [json.loads(line)["event"] for line in output.decode().splitlines()]
    assert process.returncode == 0, output.decode()[-2000:]
    assert "listening" not in events and events[-1] == "stopped", events


async def test_sigterm_while_the_embedded_redis_starts_leaves_no_server_running(
    tmp_path: Path, bot_id: str
) -> None:
    """SIGTERM while the embedded Redis is being started (in a thread: here held at its start
    lock, as a server loading a large append-only file holds it in its wait) cancelled the
    wait but not the thread: the thread went on to start redis-server, whose handle nobody
    had, so the bridge exited 0 and left the server running; the last user must stop it."""
    import fcntl

    redis_dir = tmp_path / "redis"
    redis_dir.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_STATE_DIR=str(tmp_path), BRIDGE_BOT_ID=bot_id, BRIDGE_UPSTREAM="replay",
        BRIDGE_REPLAY_FILE=str(Path(__file__).parents[2] / "bridge" / "recordings"),
        BRIDGE_YACH_INSECURE="1", BRIDGE_PORT="0", BRIDGE_LOG_FORMAT="json",
        BRIDGE_LOG_LEVEL="info", BRIDGE_DRAIN_TIMEOUT_S="2",
    )  # fmt: skip
    with open(redis_dir / "start.lock", "w") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)  # another start holds it
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await wait_until(lambda: _waits_for_a_lock(process.pid), timeout=30)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the stop goes ahead: the start is given up
        finally:
            fcntl.flock(start_lock, fcntl.LOCK_UN)  # the thread starts the server now
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        running = _embedded_answers(redis_dir)
        if running:
            import redis as sync_redis

            sync_redis.Redis(unix_socket_path=str(redis_dir / "redis.sock")).shutdown(nosave=True)
    events = [json.loads(line)["event"] for line in output.decode().splitlines()]
    assert process.returncode == 0, output.decode()[-2000:]
    assert "listening" not in events and "stopped" in events, events
    assert not running, "the embedded Redis was left running after the bridge stopped"


# Installed by `sitecustomize` before the program's own code runs: the first import of aiohttp
# (the program loading) says so on stdout and then takes 5 s, a window a signal can hit.
_SLOW_IMPORT = """
import sys, time

class _SlowAiohttp:
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp":
            sys.meta_path.remove(self)
            print("loading", flush=True)
            time.sleep(5)
        return None

sys.meta_path.insert(0, _SlowAiohttp())
"""


@pytest.mark.parametrize("command", ["python -m bridge", "chatbridge"])
async def test_sigterm_while_the_program_loads_exits_0(tmp_path: Path, command: str) -> None:
    """SIGTERM in the ~0.2 s the program takes to load (its imports), before `run` installs
    its handlers, took the signal's default action: killed, status 143 (-15 here), where a
    clean SIGTERM exits 0 (SPEC §1). The load is stretched to 5 s here so that the signal
    surely lands in it; it must end the process at once."""
    (tmp_path / "sitecustomize.py").write_text(_SLOW_IMPORT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]), BRIDGE_UPSTREAM="replay",
        BRIDGE_REPLAY_FILE=str(RECORDINGS), BRIDGE_YACH_INSECURE="1", BRIDGE_PORT="0",
        BRIDGE_STATE_DIR=str(tmp_path), BRIDGE_LOG_FORMAT="json",
    )  # fmt: skip
    program = ([sys.executable, "-m", "bridge"] if command == "python -m bridge"
               else [str(Path(sys.executable).parent / "chatbridge")])  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *program, "run", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        assert first == b"loading\n", first
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 3)  # not after the 5 s load
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, rest.decode()[-2000:]
    assert b"Traceback" not in rest, rest.decode()[-2000:]


def _waits_for_a_lock(pid: int) -> bool:
    with open("/proc/locks") as locks:
        return any("->" in line and f" {pid} " in line for line in locks)


def _embedded_answers(redis_dir: Path) -> bool:
    import redis as sync_redis

    try:
        client = sync_redis.Redis(unix_socket_path=str(redis_dir / "redis.sock"), socket_timeout=2)
        return bool(client.ping())
    except (sync_redis.RedisError, OSError):
        return False


async def test_a_listen_address_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    """A BRIDGE_HOST that does not resolve gave `startup_failed` with only "[Errno -2] Name
    or service not known": neither the variable nor the name it could not use."""
    code, output, _ = await _run_to_exit(
        BRIDGE_UPSTREAM="replay", BRIDGE_REPLAY_FILE=str(RECORDINGS), BRIDGE_YACH_INSECURE="1",
        BRIDGE_HOST="no-such-host.invalid", BRIDGE_PORT="0", BRIDGE_STATE_DIR=str(tmp_path),
        BRIDGE_LOG_FORMAT="json",
    )  # fmt: skip
    assert code == 1
    [failed] = [json.loads(line) for line in output.splitlines()
                if line.startswith("{") and '"startup_failed"' in line]  # fmt: skip
    assert failed["host"] == "no-such-host.invalid" and failed["port"] == 0, failed
    assert "BRIDGE_HOST" in failed["error"], failed
    assert "Traceback" not in output


async def test_a_log_reader_that_goes_away_stops_neither_answers_nor_a_clean_exit(
    fakes: tuple[FakeYach, FakeOpenAI], redis_url: str, bot_id: str
) -> None:
    """`chatbridge run | tee run.log`, and tee is gone (killed, or journald restarted under
    a unit): every log line met a broken pipe. The bridge took messages (200) and answered
    none, each turn died on its first log line while /readyz still said ok, and a SIGTERM
    ended in a traceback with exit 1. Log lines without a reader are dropped instead."""
    yach, upstream = fakes
    env = bridge_env(redis_url, bot_id, yach, BRIDGE_LOG_FORMAT="json", BRIDGE_LOG_LEVEL="info",
                     **openai_env(upstream.base_url))  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        port = await _listening_port(process.stdout)
        process.stdout.close()  # the reader of the log goes away
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for question in ("first", "second"):
                body = json.dumps(group_message(question))
                headers = {**signed_headers(), "Content-Type": "application/json"}
                async with session.post(f"{base}/webhook/yach", data=body,
                                        headers=headers) as response:  # fmt: skip
                    assert response.status == 200
            await wait_until(lambda: len(yach.shown) == 2, timeout=10)
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    errors = process.stderr.read().decode()
    process.stderr.close()
    assert code == 0, errors
    assert "Traceback" not in errors and "Logging error" not in errors, errors


async def _listening_port(stdout: IO[bytes]) -> int:
    while True:
        line = await asyncio.to_thread(stdout.readline)
        assert line, "the bridge exited before listening"
        event = json.loads(line)
        if event["event"] == "listening":
            return int(event["port"])


def _ignore_sighup() -> None:  # in the child, before exec: as `nohup` starts a program
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("nohup", [False, True])
async def test_sighup_stops_as_sigterm_does_unless_ignored_as_by_nohup(
    redis_url: str, bot_id: str, fakes: tuple[FakeYach, FakeOpenAI], nohup: bool
) -> None:
    """SIGHUP (the terminal of a `run` in the foreground closed) killed the daemon by the
    signal: no drain, its claims left to expire, status -1. It now stops as SIGTERM does,
    exit 0 after the drain; started under `nohup` (SIGHUP ignored), it keeps running."""
    yach, upstream = fakes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
           **bridge_env(redis_url, bot_id, yach, BRIDGE_LOG_FORMAT="json",
                        BRIDGE_LOG_LEVEL="info", **openai_env(upstream.base_url))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, preexec_fn=_ignore_sighup if nohup else None,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            while b'"listening"' not in await process.stdout.readline():
                pass
        process.send_signal(signal.SIGHUP)
        if nohup:
            await asyncio.sleep(1.0)
            assert process.returncode is None
            process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stdout.read(), 30)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b'"drained"' in rest and b"Traceback" not in rest, rest.decode()[-2000:]
