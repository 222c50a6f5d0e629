"""`chatbridge run | check | chat | demo` (also `python -m bridge`).

Exit codes: 0 normal (a clean SIGTERM included), 1 runtime failure, 2 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from typing import TextIO

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from adapters.im.terminal import TERMINAL_USER, TerminalIM
from bridge import __version__, systemd
from bridge.app import STATE, build_app, drain
from bridge.config import ConfigError, Settings, load_settings, masked_settings, unknown_variables
from bridge.inbox import EntryKind
from bridge.intake import judge
from bridge.interfaces import InboundMessage
from bridge.logging import configure_logging, register_secrets
from bridge.store import Keys, SchemaError, check_server, connect

__all__ = ["main"]

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
_READY_TIMEOUT_S = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chatbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="the daemon: HTTP server and relay workers")
    check = commands.add_parser("check", help="validate the configuration")
    check.add_argument("--probe", action="store_true", help="also ask the upstream one word")
    commands.add_parser("chat", help="talk to the configured upstream in this terminal")
    commands.add_parser("demo", help="zero configuration: replayed recordings, offline")
    args = parser.parse_args(argv)
    if args.command == "check":
        return asyncio.run(_check(os.environ, probe=args.probe))
    if args.command == "demo":
        return _terminal(_demo_environment(os.environ), "demo")
    settings = _settings_or_exit(os.environ, args.command)
    if isinstance(settings, int):
        return settings
    if args.command == "chat":
        return _terminal(os.environ, "chat")
    _setup_logging(settings, sys.stdout)
    return asyncio.run(_run(settings))


def _settings_or_exit(env: Mapping[str, str], command: str) -> Settings | int:
    try:
        return load_settings(env, command=command)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"chatbridge: {problem}", file=sys.stderr)
        return EXIT_CONFIG


def _setup_logging(settings: Settings, stream: TextIO, *, level: str | None = None) -> None:
    configure_logging(level or settings.log_level, settings.resolved_log_format, stream)
    register_secrets(
        getattr(settings, spec.name) for spec in fields(Settings) if spec.metadata["secret"]
    )
    structlog.contextvars.bind_contextvars(bot=settings.bot_id)


# run


async def _run(settings: Settings) -> int:
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except (SchemaError, OSError, RuntimeError) as exc:
        log.error("startup_failed", error=str(exc))
        await runner.cleanup()
        return EXIT_RUNTIME
    host, port = runner.addresses[0][:2]
    log.info("listening", host=host, port=port, version=__version__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = asyncio.create_task(systemd.watchdog_loop(stop))
    await _notify_ready_when_connected(app, stop)
    await stop.wait()
    systemd.notify("STOPPING=1")
    log.info("stopping", drain_timeout_s=settings.drain_timeout_s)
    await drain(app)
    await runner.cleanup()
    await watchdog
    log.info("stopped")
    return EXIT_OK


async def _notify_ready_when_connected(app: web.Application, stop: asyncio.Event) -> None:
    """READY=1 once listening and Redis answers (logged, not fatal, if it never does)."""
    bridge = app[STATE]
    deadline = asyncio.get_running_loop().time() + _READY_TIMEOUT_S
    while not stop.is_set():
        with contextlib.suppress(RedisError, OSError):
            if bridge.redis is not None and await bridge.redis.ping():
                systemd.notify("READY=1")
                return
        if asyncio.get_running_loop().time() > deadline:
            log.error("redis_not_ready", outcome="serving 503 until Redis answers")
            systemd.notify("READY=1")
            return
        await asyncio.sleep(0.2)


# check


async def _check(env: Mapping[str, str], *, probe: bool) -> int:
    for name in unknown_variables(env):
        print(f"warning: {name} is not a chatbridge variable (a typo?)")
    try:
        settings = load_settings(env, command="check")
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        return EXIT_CONFIG
    width = max(len(name) for name, _ in masked_settings(settings))
    for name, shown in masked_settings(settings):
        print(f"{name.ljust(width)}  {shown}")
    return await _check_reachable(settings, probe=probe)


async def _check_reachable(settings: Settings, *, probe: bool) -> int:
    if settings.redis_url is None:
        state_dir = settings.resolved_state_dir
        print(f"redis: embedded, under {state_dir}")
    else:
        client = connect(settings.redis_url, max_connections=2)
        try:
            version = await asyncio.wait_for(check_server(client, Keys(settings.bot_id)), 10)
            print(f"redis: ok (Redis {version})")
        except (RedisError, OSError, TimeoutError, SchemaError) as exc:
            print(f"redis: unreachable ({type(exc).__name__}: {exc})")
            return EXIT_RUNTIME
        finally:
            await client.aclose()
    if probe:
        return await _probe(settings)
    return EXIT_OK


async def _probe(settings: Settings) -> int:
    """Ask the upstream a one-word question, through the same adapter `run` uses."""
    import aiohttp

    from adapters.upstream import create_upstream
    from bridge.events import Done, TextDelta, UpstreamError
    from bridge.http import UpstreamFailure, UpstreamHTTP
    from bridge.interfaces import Turn

    class _MemoryKV(dict[str, str]):
        async def get(self, name: str) -> str | None:  # type: ignore[override]
            return super().get(name)

        async def set(self, name: str, value: str) -> None:
            self[name] = value

    async with aiohttp.ClientSession() as session:
        http = UpstreamHTTP(
            session,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            idle_timeout_s=settings.upstream_idle_timeout_s,
            total_timeout_s=60,
            retries=0,
        )
        upstream = create_upstream(settings, http, _MemoryKV())
        text = ""
        try:
            turn = Turn(text="ping", sender=TERMINAL_USER, chat_session_id="check:probe")
            async for event in upstream.stream(turn):
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, UpstreamError):
                    raise UpstreamFailure(event.message)
                elif isinstance(event, Done):
                    break
        except UpstreamFailure as exc:
            print(f"upstream: failed ({exc.kind.value}: {exc.message})")
            return EXIT_RUNTIME
        finally:
            await upstream.aclose()
    print(f"upstream: ok ({settings.upstream} answered {len(text)} characters)")
    return EXIT_OK


# chat and demo


def _demo_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`demo`: the replay upstream on the shipped recordings, a throwaway embedded Redis."""
    recordings = resources.files("bridge") / "recordings"
    demo = {key: value for key, value in env.items() if not key.startswith("BRIDGE_")}
    demo.update(
        BRIDGE_UPSTREAM="replay",
        BRIDGE_REPLAY_FILE=str(recordings),
        BRIDGE_REPLAY_CPS=env.get("BRIDGE_REPLAY_CPS", "400"),
        BRIDGE_LOG_LEVEL=env.get("BRIDGE_LOG_LEVEL", "warning"),
        BRIDGE_LANG=env.get("BRIDGE_LANG", "zh"),
        BRIDGE_BOT_ID="demo",
        BRIDGE_YACH_INSECURE="1",
        BRIDGE_THINKING_NOTICE_S="0",
        BRIDGE_USER_RATE="0",
    )
    return demo


def _terminal(env: Mapping[str, str], command: str) -> int:
    with tempfile.TemporaryDirectory(prefix="chatbridge-demo-") as tmp:
        if command == "demo":
            env = {**env, "BRIDGE_STATE_DIR": tmp}
        settings = _settings_or_exit(env, command)
        if isinstance(settings, int):
            return settings
        level = env.get("BRIDGE_LOG_LEVEL") or "warning"
        _setup_logging(settings, sys.stderr, level=level)
        try:
            return asyncio.run(_converse(settings, sys.stdin, sys.stdout))
        except KeyboardInterrupt:
            return EXIT_OK


async def _converse(settings: Settings, stdin: TextIO, stdout: TextIO) -> int:
    """Read questions line by line, run each through the whole pipeline, print the answer."""
    app = build_app(settings, im_factory=lambda _bridge: TerminalIM(stdout))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    bridge = app[STATE]
    assert bridge.worker is not None and bridge.inbox is not None
    finished = asyncio.Event()
    bridge.worker.on_done = lambda _entry: finished.set()
    loop = asyncio.get_running_loop()
    stdout.write(
        f"chatbridge {__version__} — {settings.upstream}. /help for commands, Ctrl-D to quit.\n"
    )
    try:
        while True:
            stdout.write("\n> ")
            stdout.flush()
            line = await loop.run_in_executor(None, stdin.readline)
            if not line:
                break
            if not line.strip():
                continue
            finished.clear()
            message = _terminal_message(line.strip())
            verdict = judge(message, settings)
            await bridge.inbox.put(message, verdict.kind or EntryKind.TURN, verdict.chat_session_id)
            await finished.wait()
            stdout.write("\n")
    finally:
        stdout.write("\n")
        stdout.flush()
        await drain(app)
        await runner.cleanup()
    return EXIT_OK


def _terminal_message(text: str) -> InboundMessage:
    return InboundMessage(
        im_msg_id=uuid.uuid4().hex,
        text=text,
        sender=TERMINAL_USER,
        conversation_id=TERMINAL_USER.id,
        is_direct=True,
    )
