"""The max-wait flush (SPEC §4, BRIDGE_FLUSH_MAX_WAIT_S): text that waited that long goes
out while the upstream is silent, for every streaming turn at once (one ticker serves
them all), and the ticker starts again for the turns after it stopped."""

from __future__ import annotations

import asyncio

from tests.fakes import yach as fake_yach
from tests.fakes.openai import SilentMidway
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env, running_bridge, wait_until


async def test_text_that_waited_max_wait_goes_out_for_every_turn_while_upstream_is_silent(
    redis_url: str, bot_id: str, yach: FakeYach, silent: SilentMidway
) -> None:
    env = bridge_env(
        redis_url, bot_id, yach, **openai_env(silent.base_url),
        BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY, BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
        BRIDGE_REPLY_MODE="stream", BRIDGE_FLUSH_MIN_CHARS="1000",
        BRIDGE_FLUSH_MAX_WAIT_S="0.3", BRIDGE_THINKING_NOTICE_S="0",
    )  # fmt: skip
    async with running_bridge(env) as bridge:
        for round_ in range(2):  # the second round: the ticker stopped with the first's turns
            silent.release.clear()
            shown = len(yach.shown)
            for n in range(3):
                message = group_message(f"q{round_}{n}", sender=f"u{n}", group=f"g{n}")
                assert (await bridge.post(message))[0] == 200
            await wait_until(lambda at=shown + 3: len(yach.shown) >= at, timeout=10)
            assert all(s.text.endswith("Alpha beta. ") for s in yach.shown[shown:]), yach.texts()
            silent.release.set()
            await wait_until(lambda at=shown + 6: len(yach.shown) >= at, timeout=10)
            await asyncio.sleep(0.5)  # every turn finished: the ticker has nothing to tick
