"""bridge.systemd against a real unix datagram socket, as systemd's own would receive it."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.systemd import notify, watchdog_interval_s, watchdog_loop


@pytest.fixture(autouse=True)
def _no_inherited_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may themselves run under systemd: start from a clean slate."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    sock = _bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_ready_reaches_a_path_socket(notify_socket: socket.socket) -> None:
    assert notify("READY=1") is True
    assert notify("STATUS=listening on 127.0.0.1:8080\nMAINPID=1") is True
    assert _received(notify_socket) == ["READY=1", "STATUS=listening on 127.0.0.1:8080\nMAINPID=1"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"chatbridge-test-{uuid.uuid4().hex}"
    sock = _bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert _received(sock) == ["STOPPING=1"]
    finally:
        sock.close()


def test_without_notify_socket_it_is_a_no_op() -> None:
    assert notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "vsock:2:1234", "relative/path"])
def test_unsupported_addresses_are_a_no_op(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert watchdog_interval_s() == expected


async def test_watchdog_pings_at_half_the_interval(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.1 s
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(stop))
    arrivals = []
    for _ in range(4):
        message = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), timeout=2)
        assert message == b"WATCHDOG=1"
        arrivals.append(time.monotonic())
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.08 <= gap <= 0.5 for gap in gaps), gaps


async def test_watchdog_stops_at_once_not_at_the_next_ping(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")  # pings every 30 s
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(stop))
    first = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), timeout=2)
    assert first == b"WATCHDOG=1"  # the first ping goes out at once
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert _received(notify_socket) == []


async def test_watchdog_loop_returns_at_once_without_a_watchdog(
    notify_socket: socket.socket,
) -> None:
    await asyncio.wait_for(watchdog_loop(asyncio.Event()), timeout=1)
    assert _received(notify_socket) == []


async def test_watchdog_loop_with_stop_already_set_sends_nothing(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(watchdog_loop(stop), timeout=1)
    assert _received(notify_socket) == []
