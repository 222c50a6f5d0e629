"""The `chatbridge` command's entry point (also `python -m bridge`).

It installs one signal handler before anything else is imported. Loading the program (aiohttp,
redis-py, structlog …) takes about 0.2 s, and until `run` installs its own handlers a SIGTERM
took the signal's default action: killed, status 143, where SPEC §1 asks a clean SIGTERM to
exit 0. Nothing has started while the program loads, so there is nothing to drain: the
handler ends the process at once, with 0. `run` replaces it with its stop-and-drain handler
before it starts anything; the other commands put the default back once loaded (a `check`
stopped midway must not exit 0).
"""

from __future__ import annotations

import signal
from types import FrameType


def _exit_while_loading(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_while_loading)
    from bridge import cli  # after the handler: this import is the slow part

    return cli.main()
