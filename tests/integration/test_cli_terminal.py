"""`chatbridge demo` and `chatbridge chat` used as a person uses them: in a terminal.

The program runs as a real `python -m bridge` process on a pseudo-terminal of its own (its
controlling terminal, so Ctrl-C is the terminal's SIGINT), with stderr apart: we type a
question, read the answer as it streams, type `/status` and `/reset`, stop an answer with
Ctrl-C, and quit with Ctrl-D. stdout (the terminal) must carry the conversation only; logs go
to stderr, at `warning` unless BRIDGE_LOG_LEVEL says otherwise. The pty tests always run; one
test drives `demo` in tmux too, when tmux is installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.cli import _demo_environment
from bridge.messages import MESSAGES
from tests.fakes.openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
ZH = MESSAGES["zh"]
PROMPT = "you> "
# The first demo answer is the aimaster recording's; the second the hiagent one's.
AIMASTER_ANSWER = "@企业变更助手 企业迁址所需材料的清单。"
HIAGENT_ANSWER_START = "OpenStack 是一个开源的云计算管理平台项目"
HIAGENT_ANSWER_END = "它被广泛用于企业级云基础设施的部署和管理。"
# What a log line looks like, in either renderer: not allowed on the terminal's stdout.
LOG_LINE = re.compile(r"\[(?:debug|info|warning|error|critical)\s*\]|\"event\":|Traceback")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _controlling_terminal() -> None:
    """In the child, after setsid: make the pty (its stdin) its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A program on a pty: what it wrote (with when), what we type, how it ended."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                args, stdin=slave, stdout=slave, stderr=stderr, env=env, cwd=REPO,
                start_new_session=True, preexec_fn=_controlling_terminal,
            )
        os.close(slave)
        self.chunks: list[tuple[float, str]] = []
        self._raw = b""
        self._arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._read)
        self._open = True

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed the terminal (it exited)
            data = b""
        if not data:
            self._stop_reading()
        else:
            self._raw += data
            text = self._raw.decode("utf-8", errors="ignore")
            done = len(text.encode("utf-8"))  # keep an incomplete character for later
            self._raw = self._raw[done:]
            self.chunks.append((time.monotonic(), ANSI.sub("", text.replace("\r", ""))))
        self._arrived.set()

    def _stop_reading(self) -> None:
        if self._open:
            self._loop.remove_reader(self.master)
            self._open = False

    @property
    def output(self) -> str:
        return "".join(text for _, text in self.chunks)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def expect(self, predicate: Callable[[str], bool], since: int = 0,
                     timeout: float = 15.0, what: str = "") -> str:
        """Wait until the output after character `since` satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output[since:]):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not self._open and not predicate(self.output[since:])):
                raise AssertionError(
                    f"not seen{': ' + what if what else ''}\n--- terminal:\n{self.output}"
                    f"\n--- stderr:\n{self.stderr}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))
        return self.output[since:]

    async def expect_text(self, text: str, since: int = 0, timeout: float = 15.0) -> str:
        return await self.expect(lambda out: text in out, since, timeout, repr(text))

    async def ask(self, line: str, until: str | None = None) -> str:
        """Type a line, wait for the next prompt (after `until`, if given); what came between."""
        mark = len(self.output)
        self.type(line + "\n")

        def answered(out: str) -> bool:
            start = out.find(until) if until else 0
            return start >= 0 and out.rstrip(" ").endswith(PROMPT.rstrip()) and (
                out.rfind(PROMPT) > start
            )

        out = await self.expect(answered, mark, what=f"the answer to {line!r}")
        return out

    async def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout} s"
            await asyncio.sleep(0.05)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._stop_reading()
        os.close(self.master)


@contextlib.asynccontextmanager
async def terminal(command: str, env: dict[str, str], tmp_path: Path) -> AsyncIterator[Terminal]:
    program = Terminal([sys.executable, "-m", "bridge", command], env,
                       tmp_path / f"{command}-{uuid.uuid4().hex[:6]}.stderr")
    try:
        yield program
    finally:
        program.close()


def answer_reads(program: Terminal, start: float, answer: str,
                 question: str) -> list[tuple[float, str]]:
    """The reads, after `start`, that carried part of `answer` (not the echo of `question`)."""
    return [(at, chunk) for at, chunk in program.chunks
            if at >= start and any(part.strip() and part != question and part in answer
                                   for part in chunk.split("\n"))]


def assert_conversation_only(program: Terminal) -> None:
    match = LOG_LINE.search(program.output)
    assert match is None, f"a log line on the conversation's stdout:\n{program.output}"


# demo


async def test_demo_in_a_terminal(tmp_path: Path) -> None:
    env = clean_env(HOME=str(tmp_path), BRIDGE_REPLAY_CPS="100")
    async with terminal("demo", env, tmp_path) as demo:
        banner = await demo.expect_text(PROMPT)
        assert "chatbridge" in banner and "Ctrl-D" in banner
        asked = time.monotonic()
        answer = await demo.ask("企业迁址需要什么材料？", until=AIMASTER_ANSWER)
        assert AIMASTER_ANSWER in answer
        # Streamed: the answer grew over several reads, not in one write at the end.
        reads = answer_reads(demo, asked, answer, "企业迁址需要什么材料？")
        assert len(reads) >= 4, reads
        assert reads[-1][0] - reads[0][0] > 0.1, reads
        # The prompt comes back on a line of its own, after a blank line.
        assert answer.endswith("\n\n" + PROMPT), repr(answer[-40:])

        status = await demo.ask("/status", until="上游")
        assert "上游：replay" in status and "对话轮数：1" in status, status
        reset = await demo.ask("/reset", until=ZH["reset_done"])
        assert ZH["reset_done"] in reset

        # The next recording plays; Ctrl-C (the terminal's SIGINT) stops it midway.
        mark = len(demo.output)
        demo.type("介绍一下 OpenStack\n")
        await demo.expect_text("OpenStack 是", since=mark)
        demo.type("\x03")
        stopped = await demo.expect(
            lambda out: ZH["stopped"] in out and out.endswith("\n\n" + PROMPT), mark,
            what="the stop notice, then the prompt")
        assert HIAGENT_ANSWER_END not in stopped  # cut short
        assert f"\n{ZH['stopped']}\n" in stopped  # the notice on a line of its own

        demo.type("\x04")  # Ctrl-D at the prompt
        assert await demo.wait() == 0
        assert_conversation_only(demo)
        assert demo.stderr == ""  # logs: stderr, `warning` and up by default, and none came


async def test_demo_reads_a_piped_transcript(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", env=clean_env(HOME=str(tmp_path)), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    typed = "你好\n/status\n介绍一下 OpenStack\n"
    out, err = await asyncio.wait_for(process.communicate(typed.encode()), 20)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    # Not a terminal: each question is shown after its prompt, so the output reads as a
    # transcript; the answers and replies follow. The recordings play in turn.
    assert f"{PROMPT}你好\n{AIMASTER_ANSWER}" in text, text
    assert f"{PROMPT}/status\n上游：replay" in text, text
    assert f"{PROMPT}介绍一下 OpenStack\n{HIAGENT_ANSWER_START}" in text, text
    assert text.endswith(PROMPT + "\n"), repr(text[-40:])  # the end of input quits
    assert err.decode() == ""


async def test_demo_piped_into_a_reader_that_stops_early_exits_quietly(tmp_path: Path) -> None:
    """`chatbridge demo | head -1`: once the reader had gone, Python's final flush of stdout
    printed "Exception ignored in: <_io.TextIOWrapper name='<stdout>'…> BrokenPipeError" and
    the exit status was 120, no code of SPEC §1's."""
    env = clean_env(HOME=str(tmp_path))
    env.pop("PYTHONUNBUFFERED", None)  # an operator's shell: stdout buffered, as by default
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", env=env, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()  # the banner: the demo is under way; then the reader goes
    assert first.startswith(b"chatbridge ")
    _, err = await asyncio.wait_for(process.communicate("你好\n你好\n".encode()), 20)
    assert "BrokenPipeError" not in err.decode() and "Exception ignored" not in err.decode()
    assert process.returncode == 0, err.decode()


@pytest.mark.parametrize("level", [" warning ", "WARNING", "change-me"])
async def test_demo_takes_the_log_level_as_the_configuration_reads_it(tmp_path: Path,
                                                                      level: str) -> None:
    """BRIDGE_LOG_LEVEL as validated (surrounding spaces stripped, any case; the
    placeholder counts as unset, so `warning`): a value `check` accepts was a traceback."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo",
        env=clean_env(HOME=str(tmp_path), BRIDGE_LOG_LEVEL=level), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(b"/help\n"), 20)
    assert process.returncode == 0, err.decode()
    assert f"{PROMPT}/help\n{ZH['help']}" in out.decode()
    assert err.decode() == ""


# chat


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI(delay_s=0.01).start()  # a pause between chunks, as a model has
    yield fake
    await fake.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_chat_with_an_openai_upstream_keeps_the_history(tmp_path: Path,
                                                              upstream: FakeOpenAI) -> None:
    state = tmp_path / "state"
    env = clean_env(
        HOME=str(tmp_path), BRIDGE_STATE_DIR=str(state), BRIDGE_UPSTREAM="openai",
        BRIDGE_OPENAI_BASE_URL=upstream.base_url, BRIDGE_OPENAI_API_KEY="sk-test-placeholder",
        BRIDGE_OPENAI_MODEL="fake-model", BRIDGE_LANG="en", BRIDGE_LOG_LEVEL="info",
    )
    assert "BRIDGE_REDIS_URL" not in env  # the embedded Redis, under BRIDGE_STATE_DIR
    async with terminal("chat", env, tmp_path) as chat:
        banner = await chat.expect_text(PROMPT)
        assert "openai" in banner
        asked = time.monotonic()
        first = await chat.ask("what is OpenStack?", until="history")
        assert "You said: what is OpenStack?. (history: 0 messages)" in first, first
        reads = answer_reads(chat, asked, first, "what is OpenStack?")
        assert len(reads) >= 3, reads  # tokens shown as they arrive

        second = await chat.ask("and Nova?", until="history")
        assert "You said: and Nova?. (history: 2 messages)" in second, second
        status = await chat.ask("/status", until="Upstream")
        assert "Upstream: openai" in status and "Turns: 2" in status, status
        reset = await chat.ask("/reset", until=MESSAGES["en"]["reset_done"])
        assert MESSAGES["en"]["reset_done"] in reset
        third = await chat.ask("hello again", until="history")
        assert "(history: 0 messages)" in third, third

        chat.type("\x04")
        assert await chat.wait() == 0
        assert_conversation_only(chat)
        # BRIDGE_LOG_LEVEL=info: the log is on stderr, and only there.
        assert "turn_started" in chat.stderr and "command" in chat.stderr, chat.stderr
    assert [len(body["messages"]) for body in upstream.bodies] == [1, 3, 1]
    # The embedded Redis kept its data under the state directory, and stopped with the chat.
    redis_dir = state / "redis"
    assert any(redis_dir.glob("appendonly*")), list(redis_dir.iterdir())
    pidfile = redis_dir / "redis.pid"
    if pidfile.exists():
        assert not _alive(int(pidfile.read_text().strip()))


async def test_chat_without_an_upstream_is_a_configuration_error(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "chat", env=clean_env(HOME=str(tmp_path)), cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert out == b""
    assert "BRIDGE_UPSTREAM" in err.decode() and "example" in err.decode()


async def test_ctrl_c_while_chat_waits_for_a_silent_redis_quits_at_once(tmp_path: Path) -> None:
    """A Redis that accepts and never answers held the start for its timeouts (~20 s, then
    exit 1), Ctrl-C included: Ctrl-C before the banner now quits at once, exit 0. (One run in
    three or four under load, the start swallowed the cancel (Python 3.11's `wait_for`
    around a redis-py write) and went on for 40 s and more: it is cancelled until it ends.)"""

    asked = asyncio.Event()
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.set()
        accepted.append(writer)
        await reader.read()  # every command, never an answer, until the client has gone
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = clean_env(
        HOME=str(tmp_path), BRIDGE_UPSTREAM="openai", BRIDGE_OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        BRIDGE_OPENAI_API_KEY="sk-test-placeholder", BRIDGE_OPENAI_MODEL="fake-model",
        BRIDGE_REDIS_URL=f"redis://127.0.0.1:{port}",
    )
    try:
        async with terminal("chat", env, tmp_path) as chat:
            # Started (its Ctrl-C handler installed), waiting for Redis's answer: a fixed
            # sleep could end before a loaded machine had got that far (exit -2).
            await asyncio.wait_for(asked.wait(), 30)
            assert chat.process.poll() is None
            pressed = time.monotonic()
            chat.type("\x03")
            assert await chat.wait(timeout=10) == 0
            assert time.monotonic() - pressed < 3
            assert PROMPT not in chat.output and "Traceback" not in chat.stderr, chat.stderr
    finally:
        for writer in accepted:  # left open, the next test on this worker met their sockets
            writer.close()
        server.close()
        await server.wait_closed()


# tmux: the same, through a real terminal emulator


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_demo_in_tmux(tmp_path: Path) -> None:
    server = f"chatbridge-test-{uuid.uuid4().hex[:8]}"
    env = clean_env(HOME=str(tmp_path), BRIDGE_REPLAY_CPS="200", TERM="xterm-256color")
    env.pop("TMUX", None)
    stderr = tmp_path / "demo.stderr"
    script = (f"{sys.executable} -m bridge demo 2>{stderr}; "
              f"echo DEMO-EXIT=$?; sleep 60")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", server, *args], env=env, cwd=REPO, check=True,
                              capture_output=True, text=True, timeout=10).stdout

    async def screen_shows(text: str, timeout: float = 15.0, prompt: bool = True) -> str:
        """Wait until the screen shows `text` and (with `prompt`) the prompt after it."""
        deadline = time.monotonic() + timeout
        while True:
            screen = tmux("capture-pane", "-p", "-J", "-t", "demo", "-S", "-200")
            lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
            if text in screen and (not prompt or (lines and lines[-1] == PROMPT.strip())):
                return screen
            assert time.monotonic() < deadline, f"{text!r} not on the screen:\n{screen}"
            await asyncio.sleep(0.1)

    tmux("new-session", "-d", "-s", "demo", "-x", "120", "-y", "50", script)
    try:
        await screen_shows(PROMPT.strip())
        tmux("send-keys", "-t", "demo", "-l", "hello there")
        tmux("send-keys", "-t", "demo", "Enter")
        screen = await screen_shows(AIMASTER_ANSWER)
        tmux("send-keys", "-t", "demo", "-l", "/reset")
        tmux("send-keys", "-t", "demo", "Enter")
        screen = await screen_shows(ZH["reset_done"])
        tmux("send-keys", "-t", "demo", "C-c")  # at the prompt, Ctrl-C quits too
        screen = await screen_shows("DEMO-EXIT=", timeout=20, prompt=False)
        assert "DEMO-EXIT=0" in screen, screen
        lines = [line.rstrip() for line in screen.splitlines()]
        # Each question sits on its prompt; the reset confirmation on a line of its own.
        assert f"{PROMPT}hello there" in lines and f"{PROMPT}/reset" in lines, screen
        assert ZH["reset_done"] in lines, screen
        assert LOG_LINE.search(screen) is None, screen
        assert stderr.read_text() == ""
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            tmux("kill-server")


@pytest.mark.parametrize("given", ["", " ", "change-me"])
def test_demo_defaults_stand_for_an_empty_or_placeholder_value(given: str) -> None:
    """The demo's own defaults (400 characters per second, warning, zh) apply where the
    operator's variable is empty or the placeholder, as the configuration reads those: an
    empty BRIDGE_REPLAY_CPS played the demo at full speed."""
    names = ("BRIDGE_REPLAY_CPS", "BRIDGE_LOG_LEVEL", "BRIDGE_LANG")
    demo = _demo_environment(dict.fromkeys(names, given))
    assert [demo[name] for name in names] == ["400", "warning", "zh"]
    assert _demo_environment({"BRIDGE_REPLAY_CPS": " 0 "})["BRIDGE_REPLAY_CPS"] == "0"
