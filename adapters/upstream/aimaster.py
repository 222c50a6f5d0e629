"""AI Master multi-agent scenario stream (math-graph-external-apis.md, "题目分析api").

`POST {base}/aimaster/scenario/open/api` with `chatId`, `scenarioInfoId`,
`latestMessageContent` and `params`, `Authorization: Bearer <token>`; the answer is
OpenAI-style `chat.completion.chunk`s behind `data:` with the agent hand-off in `agent_id`,
`agent_name` and `agent_step`, ending in `data: [DONE]`.

Decisions the notes leave open:
- `chatId` is a fresh uuid4 in hex (the note's example has no dashes), made on a session's
  first turn and kept in the conversation reference as `chatId` (SPEC §5).
- Every change of agent (by `agent_id`, else `agent_name`) is an `AgentSwitch`, the first
  agent included; the renderer decides which to show.
- Each agent reports its own *cumulative* `usage` on every chunk, so the turn's usage is the
  sum of each agent's last report, sent once just before `Done`.
- The backend is RuoYi-style (the notes' `/dev-api/` prefix is RuoYi-Vue's): an error may
  come as HTTP 200 with a JSON body `{"code": 401, "msg": …}` instead of a stream, or as
  such an object inside the stream; the `code` is read like an HTTP status (and, a 429 or
  another 5xx, retried), and an in-stream one becomes an `UpstreamError`. But `code: 500`
  is RuoYi's answer to every exception of the app (a wrong scenario id, a failed check, a
  model call that failed): asking again gets the same answer, after the whole retry
  schedule. So it is read only for its words ("系统繁忙" is an overload, and retried), and
  is a rejection of the question otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from adapters.upstream._common import (
    body_failure,
    is_done,
    is_error_report,
    json_object,
    relay,
    reported_error,
    require,
)
from adapters.upstream.openai import parse_chunk
from bridge.config import Settings
from bridge.events import (
    AgentSwitch,
    ConversationRef,
    Done,
    Event,
    UpstreamError,
    Usage,
)
from bridge.http import UpstreamFailure, UpstreamHTTP, iter_sse
from bridge.interfaces import KeyValue, Turn
from bridge.sse import SSEEvent

__all__ = ["AimasterParser", "AimasterUpstream", "create", "error_of"]

NAME = "aimaster"
API_PATH = "/aimaster/scenario/open/api"
_RUOYI_ERROR = frozenset({500})  # `AjaxResult.error()`: "an error", whatever went wrong
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def error_of(payload: Mapping[str, Any]) -> UpstreamError | None:
    """The error an answer object reports instead of a chunk, if any."""
    if "choices" in payload and not payload.get("error"):
        return None
    if not is_error_report(payload):
        return None
    return reported_error(NAME, payload, plain_statuses=_RUOYI_ERROR)


class AimasterParser:
    """The events of one AI Master answer, message by message. Pure: no I/O."""

    def __init__(self) -> None:
        self._agent: str | None = None
        self._usage_by_agent: dict[str, Usage] = {}
        self.finished = False

    def feed(self, message: SSEEvent) -> list[Event]:
        if is_done(message.data):
            self.finished = True
            usage = self.usage()
            return [usage, Done()] if usage is not None else [Done()]
        return self.feed_chunk(json_object(message.data, upstream=NAME))

    def feed_chunk(self, chunk: Mapping[str, Any]) -> list[Event]:
        error = error_of(chunk)
        if error is not None:
            self.finished = True
            return [error]
        events: list[Event] = []
        agent_key = chunk.get("agent_id") or chunk.get("agent_name")
        if isinstance(agent_key, str) and agent_key and agent_key != self._agent:
            self._agent = agent_key
            name = chunk.get("agent_name")
            events.append(AgentSwitch(name if isinstance(name, str) and name else agent_key))
        # The choice/delta part is plain OpenAI; its usage is the agent's running total.
        for event in parse_chunk(chunk):
            if isinstance(event, Usage):
                self._usage_by_agent[self._agent or ""] = event
            else:
                events.append(event)
        return events

    def usage(self) -> Usage | None:
        """The turn's usage: the sum of every agent's last report."""
        if not self._usage_by_agent:
            return None
        totals: dict[str, int | None] = {}
        for name in _USAGE_FIELDS:
            counts = [getattr(u, name) for u in self._usage_by_agent.values()]
            known = [count for count in counts if count is not None]
            totals[name] = sum(known) if known else None
        return Usage(**totals)


class AimasterUpstream:
    name = NAME
    keeps_history = True

    def __init__(
        self,
        settings: Settings,
        http: UpstreamHTTP,
        *,
        new_chat_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        base_url, token, scenario_id = require(
            settings, "aimaster_base_url", "aimaster_token", "aimaster_scenario_id"
        )
        self._http = http
        self._url = f"{base_url}{API_PATH}"
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        self._scenario_id = scenario_id
        self._params = settings.aimaster_params
        self._new_chat_id = new_chat_id

    async def stream(self, turn: Turn) -> AsyncIterator[Event]:
        chat_id = (turn.conversation or {}).get("chatId")
        if not chat_id:
            chat_id = self._new_chat_id()
            yield ConversationRef({"chatId": chat_id})
        body = {
            "chatId": chat_id,
            "scenarioInfoId": self._scenario_id,
            "latestMessageContent": turn.text,
            "params": self._params,
        }
        async with self._http.open(
            "POST", self._url, json=body, headers=self._headers, not_a_stream=error_from_body
        ) as resp:
            events = relay(iter_sse(resp), AimasterParser(), upstream=self.name)
            async with aclosing(events):
                async for event in events:
                    yield event

    async def reset(self, conversation: Mapping[str, str], chat_session_id: str) -> None:
        """Nothing to delete upstream: the notes have no such call; a new chatId starts afresh."""

    async def aclose(self) -> None:
        """The shared HTTP session is closed by its owner."""


def error_from_body(status: int, text: str) -> UpstreamFailure:
    """A typed error for a non-stream answer (RuoYi's `{"code", "msg"}` on HTTP 200); read
    before the first streamed byte, a 429 or 5xx `code` (but 500) is retried as that status
    is."""
    return body_failure(NAME, status, text, plain_statuses=_RUOYI_ERROR)


def create(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> AimasterUpstream:
    return AimasterUpstream(settings, http)
