"""sd_notify without libsystemd: readiness, stopping and watchdog pings to `$NOTIFY_SOCKET`.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
`$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Outside systemd the variable is
unset and every call is a no-op, so `run` works the same in a terminal.

The watchdog is pinged from the event loop itself, so a loop that blocks stops the pings and
systemd restarts the process (`WatchdogSec=` in the unit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

__all__ = ["notify", "watchdog_interval_s", "watchdog_loop"]

log = structlog.get_logger(__name__)


def _socket_address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # vsock: and other transports are not supported


def notify(state: str) -> bool:
    """Send `state` (e.g. `READY=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=…`) to systemd.

    Returns True when the datagram was sent, False outside systemd or when it could not be.
    Never blocks: the socket is non-blocking, and a full socket buffer drops the message.
    """
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify_failed", state=state, error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Seconds between watchdog pings: half of `$WATCHDOG_USEC`, or None without a watchdog.

    A `$WATCHDOG_PID` naming another process means the watchdog is not ours (the variables
    were inherited), so None as well.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID", "")
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(stop: asyncio.Event) -> None:
    """Ping `WATCHDOG=1` at `watchdog_interval_s()` until `stop` is set; return at once
    when there is no watchdog."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    log.debug("watchdog_started", interval_s=interval)
    while not stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
