"""Acceptance tests written from SPEC §4 and §7 alone, for what the earlier tests left out:
each drives a real bridge on loopback against the fakes and checks the bytes they receive."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.yach import FakeYach
from tests.fakes.yach_agent import ANSWER, CHAT, GETTOKEN, FakeYachAgent
from tests.harness import bridge_env, group_message, running_bridge, wait_until


@pytest.fixture
async def agent() -> AsyncIterator[FakeYachAgent]:
    async with FakeYachAgent() as server:
        yield server


async def test_one_app_token_serves_the_agent_and_the_replies(
    redis_url: str, bot_id: str, yach: FakeYach, agent: FakeYachAgent, redis_client: object,
) -> None:
    """SPEC §4: the app access token is fetched, then cached. The yach-agent upstream and
    the app-API replies take the same token (SPEC §2: "the agent API takes the app access
    token"): a process asks `/gettoken` once for both, not once for each."""
    env = bridge_env(redis_url, bot_id, yach, **agent.env())
    async with running_bridge(env) as bridge:
        for asked, question in enumerate(("你是谁", "再说一遍"), start=1):
            assert (await bridge.post(group_message(question)))[0] == 200
            await wait_until(lambda n=asked: len(agent.shown) >= n)
    assert [shown.text for shown in agent.shown] == [ANSWER, ANSWER]
    assert len([r for r in agent.server.on(CHAT) if r.method == "POST"]) == 2
    assert len(agent.server.on(GETTOKEN)) == 1
