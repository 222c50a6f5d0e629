"""A fake AI Master scenario API serving the recorded fixture, re-chunked at random."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from bridge.events import Usage
from tests.fakes.base import FIXTURES
from tests.fakes.scripted import Script, ScriptedFake

FIXTURE = FIXTURES / "aimaster-scenario.sse"
ENV_PREFIX = "/dev-api"
PATH = ENV_PREFIX + "/aimaster/scenario/open/api"
TOKEN = "aimaster-test-token"
SCENARIO = "e6e822e47fa24ca380f8d2d09eb114a7"
PARAMS = {"userId": "u-42"}


class Recorded(NamedTuple):
    text: str
    reasoning: str
    agents: list[str]  # in order of hand-off
    usage: Usage  # each agent's last report, summed


def recorded(path: Path = FIXTURE) -> Recorded:
    """What a recording holds, read straight off it without the adapter."""
    text: list[str] = []
    reasoning: list[str] = []
    agents: list[str] = []
    last_usage: dict[str, dict[str, int]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if not agents or agents[-1] != chunk["agent_name"]:
            agents.append(chunk["agent_name"])
        delta = chunk["choices"][0]["delta"]
        text.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        if chunk["usage"]:
            last_usage[chunk["agent_id"]] = chunk["usage"]
    usage = Usage(*(sum(u[k] for u in last_usage.values())
                    for k in ("prompt_tokens", "completion_tokens", "total_tokens")))
    return Recorded("".join(text), "".join(reasoning), agents, usage)


class FakeAimaster(ScriptedFake):
    """`POST {base}/aimaster/scenario/open/api`; `stream` (the fixture) unless scripted."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = FIXTURE.read_bytes()
        self.script = Script(self.answer())
        self.app.router.add_post(PATH, self.script.handle)

    async def start(self) -> FakeAimaster:
        return await self.serve()

    @property
    def base_url(self) -> str:
        return self.url + ENV_PREFIX

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {
            "BRIDGE_UPSTREAM": "aimaster",
            "BRIDGE_AIMASTER_BASE_URL": (url or self.url) + ENV_PREFIX,
            "BRIDGE_AIMASTER_TOKEN": TOKEN,
            "BRIDGE_AIMASTER_SCENARIO_ID": SCENARIO,
            "BRIDGE_AIMASTER_PARAMS": json.dumps(PARAMS),
            **overrides,
        }
