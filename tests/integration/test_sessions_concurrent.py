"""Different sessions run concurrently (SPEC §5): messages waiting behind a busy session of
their own wait for that session's turn, not for a worker, and must not keep another
session's message unread while this process has a turn slot free."""

from __future__ import annotations

import asyncio
import time

from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until
from tests.procs import PacedOpenAI

LONG_S = 6.0


async def test_a_session_runs_at_once_while_other_sessions_queues_fill_the_process(
    redis_url: str, bot_id: str, yach: FakeYach
) -> None:
    """BRIDGE_WORKERS=3: two sessions run a long turn each, with five and four messages
    queued behind them (within BRIDGE_SESSION_QUEUE_MAX): one turn slot is free. A third
    session's message is answered at once, not after one of the long turns."""
    upstream = await PacedOpenAI(pace=lambda q: LONG_S if q.startswith("long") else 0.0).start()
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(upstream.base_url),
        BRIDGE_LANG="en", BRIDGE_WORKERS="3", BRIDGE_SESSION_QUEUE_MAX="5",
    )  # fmt: skip
    try:
        async with running_bridge(env) as bridge:
            for sender, count in (("ua", 6), ("ub", 5)):
                for n in range(count):
                    text = f"long {sender}" if n == 0 else f"wait {sender} {n}"
                    assert (await bridge.post(group_message(text, sender=sender)))[0] == 200
            await wait_until(lambda: len(upstream.started) == 2, timeout=5)
            await asyncio.sleep(0.3)  # every queued message has found its place
            posted = time.monotonic()
            assert (await bridge.post(group_message("other", sender="uc")))[0] == 200
            await wait_until(lambda: any("other" in t for t in yach.texts()), timeout=LONG_S + 5)
            waited = time.monotonic() - posted
            assert upstream.started[2] == "other", upstream.started
            assert waited < LONG_S / 2, waited
    finally:
        await upstream.close()
