"""The OpenAI-compatible adapter against a fake `/v1/chat/completions` on loopback: what real
servers put inside a 200 stream besides chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.events import Done, ErrorKind, UpstreamError
from bridge.http import UpstreamHTTP
from bridge.interfaces import Sender, Turn
from tests.fakes.scripted import Script, ScriptedFake, answer_text, collect, connect, sse_payloads
from tests.harness import openai_env


class OpenAIStreams(ScriptedFake):
    """`POST /v1/chat/completions` answered with `stream` (re-chunked at random)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stream = b""
        self.script = Script(self.answer())
        self.app.router.add_post("/v1/chat/completions", self.script.handle)

    def env(self, url: str | None = None, **overrides: str) -> dict[str, str]:
        return {**openai_env((url or self.url) + "/v1"), **overrides}


@pytest.fixture(params=[0, 1, 2])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[OpenAIStreams]:
    async with OpenAIStreams(seed=request.param) as server:
        yield server


def turn() -> Turn:
    return Turn(text="hi", sender=Sender("u1"), chat_session_id="yach:g:1")


def chunk(content: str) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


# vLLM, LiteLLM and OpenAI itself report a failure after the headers as an `error` object in
# the stream; vLLM then still ends it with `[DONE]`.
# Its kind is what its type, code and message say: an outage or an overload is no rejection
# of the question.
@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}},
         ErrorKind.UNAVAILABLE),
        ({"error": {"message": "The server had an error", "type": "server_error"}},
         ErrorKind.UNAVAILABLE),
        ({"error": "upstream overloaded"}, ErrorKind.RATE_LIMITED),
        ({"error": {"message": "Rate limit reached", "type": "requests",
                    "code": "rate_limit_exceeded"}}, ErrorKind.RATE_LIMITED),
        ({"error": {"message": "Invalid prompt", "type": "invalid_request_error"}},
         ErrorKind.REJECTED),
    ],
)
@pytest.mark.parametrize("then_done", [True, False], ids=["then-DONE", "then-EOF"])
async def test_error_object_inside_the_stream_ends_the_turn_as_an_error(
    fake: OpenAIStreams, http: UpstreamHTTP, error: dict[str, object], kind: ErrorKind,
    then_done: bool,
) -> None:
    payloads: list[object] = [chunk("Half an"), chunk(" answer"), error]
    if then_done:
        payloads.append("[DONE]")
    fake.stream = sse_payloads(payloads)

    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == "Half an answer"  # what arrived is kept
    assert not any(isinstance(event, Done) for event in events)  # not a finished answer
    assert isinstance(events[-1], UpstreamError)
    assert events[-1].kind is kind


async def test_error_null_in_a_chunk_is_no_error(fake: OpenAIStreams, http: UpstreamHTTP) -> None:
    with_null = {**chunk(" there"), "error": None}
    fake.stream = sse_payloads([chunk("Hello"), with_null, "[DONE]"])

    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == "Hello there"
    assert events[-1] == Done()


@pytest.mark.parametrize("keep_alive", ["data:\n\n", "data: \n\n", "data:\r\n\r\n"])
async def test_an_empty_data_event_is_a_keep_alive(
    fake: OpenAIStreams, http: UpstreamHTTP, keep_alive: str
) -> None:
    """Some proxies keep an idle stream open with empty `data:` events: no chunk, no error."""
    hello, there = sse_payloads([chunk("Hello")]), sse_payloads([chunk(" there"), "[DONE]"])
    fake.stream = keep_alive.encode() + hello + keep_alive.encode() + there

    events = await collect(connect(http, fake.env()), turn())

    assert answer_text(events) == "Hello there"
    assert events[-1] == Done()
