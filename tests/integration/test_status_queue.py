"""`/status` (SPEC §5) reports the session's queue: the messages waiting behind its running
turn. The turn being answered is not waiting: it is not counted as queued."""

from __future__ import annotations

import asyncio

from bridge.messages import MESSAGES
from tests.fakes.yach import FakeYach
from tests.harness import running_bridge, wait_until
from tests.integration.test_commands import EchoUnlessSlow, env, say

EN = MESSAGES["en"]


async def test_status_counts_only_the_messages_waiting_behind_the_running_turn(
    redis_url: str, bot_id: str, yach: FakeYach, redis_client: object
) -> None:
    fake = await EchoUnlessSlow().start()
    try:
        async with running_bridge(
            env(redis_url, bot_id, yach, fake.base_url, BRIDGE_LANG="en")
        ) as bridge:
            await say(bridge, "slow one")
            await asyncio.wait_for(fake.holding.wait(), timeout=5)
            await say(bridge, "/status")
            await wait_until(lambda: any(t.startswith("Upstream:") for t in yach.texts()))
            await say(bridge, "waiting")
            await asyncio.sleep(0.3)  # stored and queued behind the running turn
            await say(bridge, "/status")
            await wait_until(
                lambda: sum(t.startswith("Upstream:") for t in yach.texts()) == 2
            )
            await say(bridge, "/stop")
            await wait_until(lambda: EN["stopped"] in yach.texts())
    finally:
        await fake.close()
    first, second = [t for t in yach.texts() if t.startswith("Upstream:")]
    assert first.endswith("Queued: 0"), first  # only the running turn: nothing waits
    assert second.endswith("Queued: 1"), second
