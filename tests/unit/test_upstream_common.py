"""What the streaming adapters share (adapters/upstream/_common.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from adapters.upstream._common import (
    ConversationIds,
    as_id,
    as_int,
    body_failure,
    json_object,
    relay,
    reported_error,
    require,
    usage_from,
)
from adapters.upstream.coze import api_error
from adapters.upstream.openai import stream_error
from bridge.config import ConfigError, load_settings
from bridge.events import ConversationRef, Done, ErrorKind, Event, TextDelta, UpstreamError, Usage
from bridge.http import (
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
)
from bridge.logging import mask_text, register_secrets
from bridge.sse import SSEEvent


class Echo:
    """A parser for tests: `text` → TextDelta, `end` → Done, `fail` → error, `{` → JSON (its
    `choices`, when present, read as a list of objects)."""

    def feed(self, message: SSEEvent) -> list[Event]:
        if message.data == "end":
            return [Done()]
        if message.data == "fail":
            return [UpstreamError(ErrorKind.REJECTED, "no")]
        if message.data.startswith("{"):
            chunk = json_object(message.data, upstream="echo")
            return [TextDelta(str(choice.get("text"))) for choice in chunk.get("choices", [])]
        return [TextDelta(message.data)]


class Source:
    """An SSE source that records how far it was read and whether it was closed."""

    def __init__(self, *data: str) -> None:
        self.data = data
        self.read = 0
        self.closed = False

    async def messages(self) -> AsyncIterator[SSEEvent]:
        try:
            for item in self.data:
                self.read += 1
                yield SSEEvent(data=item)
        finally:
            self.closed = True


async def run(source: Source) -> list[Event]:
    return [event async for event in relay(source.messages(), Echo(), upstream="echo")]


@pytest.mark.parametrize("end", ["end", "fail"])
async def test_relay_stops_at_the_end_marker_and_closes_the_stream(end: str) -> None:
    source = Source("a", "b", end, "after")
    events = await run(source)

    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("a"), TextDelta("b")]
    assert source.read == 3
    assert source.closed


async def test_relay_without_end_marker_is_broken() -> None:
    source = Source("a", "b")
    with pytest.raises(UpstreamBroken, match="before its end marker"):
        await run(source)
    assert source.closed


async def test_torn_last_message_is_a_broken_stream() -> None:
    with pytest.raises(UpstreamBroken, match="inside a message") as caught:
        await run(Source("a", '{"event": "mess'))
    assert isinstance(caught.value.__cause__, UpstreamProtocolError)


async def test_unreadable_message_mid_stream_is_a_protocol_error() -> None:
    source = Source("a", '{"event": "mess', "b", "end")
    with pytest.raises(UpstreamProtocolError):
        await run(source)
    assert source.closed


@pytest.mark.parametrize("data", [
    '{"choices": "not a list"}',  # AttributeError: 'str' object has no attribute 'get'
    '{"choices": 5}',  # TypeError: not iterable
    '{"choices": [["a"]]}',  # AttributeError on the list
])
async def test_a_message_of_an_unexpected_shape_is_a_protocol_error(data: str) -> None:
    """Valid JSON the parser cannot read is as unreadable as JSON that does not parse: a
    typed protocol error that ends the turn (closing the stream), never a bare exception."""
    source = Source("a", data, "b", "end")
    with pytest.raises(UpstreamProtocolError, match="echo: unexpected message") as caught:
        await run(source)
    assert data[:20] in str(caught.value)
    assert source.closed


def test_conversation_ids_announce_the_whole_reference_when_it_changes() -> None:
    ids = ConversationIds({"AppConversationID": "app"})

    assert ids.update(conversation_id=None) is None
    assert ids.update(conversation_id="") is None
    assert ids.update(conversation_id="c1") == ConversationRef(
        {"AppConversationID": "app", "conversation_id": "c1"}
    )
    assert ids.update(conversation_id="c1") is None
    assert ids.update(conversation_id=7) == ConversationRef(
        {"AppConversationID": "app", "conversation_id": "7"}
    )
    assert ids.get("conversation_id") == "7"
    assert ids.get("missing") == ""


@pytest.mark.parametrize(("value", "number"), [
    (3, 3), ("2618", 2618), (" 12 ", 12), (3.0, 3), ("", None), (None, None), (True, None),
    ("1.5", None), (1.5, None),
])
def test_as_int(value: object, number: int | None) -> None:
    assert as_int(value) == number


def test_usage_total_is_the_sum_when_not_given() -> None:
    assert usage_from({"in": "3", "out": 4, "t": 1.5}, prompt="in", completion="out",
                      latency="t") == Usage(3, 4, 7, 1.5)
    assert usage_from({"in": 3}, prompt="in", completion="out") == Usage(3, None, None, None)
    assert usage_from({"out": 3}, prompt="in", completion="out") == Usage(None, 3, None, None)


def test_usage_total_and_latency_as_given() -> None:
    """A total the upstream gives is its own (cached or tool tokens make it more than the
    sum); a latency that is no number is none."""
    data = {"in": 3, "out": 4, "all": 10, "t": "2.5"}
    assert usage_from(data, prompt="in", completion="out", total="all", latency="t") == Usage(
        3, 4, 10, 2.5
    )
    for latency in (True, "slow", [1.0], None):
        usage = usage_from({"t": latency}, prompt="in", completion="out", latency="t")
        assert usage.latency_s is None


@pytest.mark.parametrize(("value", "text"), [
    ("m1", "m1"), (7, "7"), (True, ""), (None, ""), (1.5, ""), ({"id": 1}, ""),
])
def test_as_id(value: object, text: str) -> None:
    assert as_id(value) == text


def test_reported_error_labels_the_code_else_the_status() -> None:
    assert reported_error("x", {"status": 503, "message": "m"}).message == "x error 503: m"
    assert reported_error("x", {"code": "", "message": "m"}).message == "x error: m"


def test_reported_error_message_is_short() -> None:
    error = reported_error("dify", {"code": "x", "message": "m" * 1000})

    assert error.kind is ErrorKind.REJECTED
    assert error.message.startswith("dify error x: mmm")
    assert len(error.message) < 400
    assert reported_error("coze", None).message == "coze error: no message"


@pytest.mark.parametrize(("data", "kind"), [
    # OpenAI (and what serves its API: vLLM's numeric code, LiteLLM's as a string)
    ({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                "code": "invalid_api_key"}}, ErrorKind.AUTH),
    ({"error": {"message": "Rate limit reached for gpt-4o", "type": "requests",
                "code": "rate_limit_exceeded"}}, ErrorKind.RATE_LIMITED),
    ({"error": {"message": "The engine is currently overloaded", "type": "server_error"}},
     ErrorKind.RATE_LIMITED),
    ({"error": {"message": "The server had an error", "type": "server_error"}},
     ErrorKind.UNAVAILABLE),
    ({"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}},
     ErrorKind.UNAVAILABLE),
    ({"error": {"message": "slow down", "type": "None", "code": "429"}}, ErrorKind.RATE_LIMITED),
    ({"error": {"message": "This model's maximum context length is 4096 tokens",
                "type": "invalid_request_error", "code": "context_length_exceeded"}},
     ErrorKind.REJECTED),
    ({"error": "upstream overloaded"}, ErrorKind.RATE_LIMITED),
    # Dify: its `status` and `code`, and the model provider's failure in its message
    ({"status": 401, "code": "unauthorized", "message": "Access token is invalid"},
     ErrorKind.AUTH),
    ({"status": 400, "code": "completion_request_error",
      "message": "[openai] Rate Limit Error, Error code: 429"}, ErrorKind.RATE_LIMITED),
    ({"status": 400, "code": "completion_request_error",
      "message": "[openai_api_compatible] Server Unavailable Error, Connection refused"},
     ErrorKind.UNAVAILABLE),
    ({"status": 400, "code": "completion_request_error",
      "message": "[openai] Incorrect model credentials provided"}, ErrorKind.AUTH),
    ({"status": 400, "code": "invalid_param", "message": "query is required"},
     ErrorKind.REJECTED),
    ({"status": 404, "code": "not_found", "message": "Conversation Not Exists."},
     ErrorKind.NOT_FOUND),
    ({"status": 500, "code": "internal_server_error",
      "message": "Internal Server Error, please contact support."}, ErrorKind.UNAVAILABLE),
    # HiAgent, RuoYi, Yach: a numeric `code` that is an HTTP status, or the platform's own
    ({"code": 503, "message": "no healthy upstream"}, ErrorKind.UNAVAILABLE),
    ({"code": 401, "msg": "认证失败,无法访问系统资源"}, ErrorKind.AUTH),
    ({"code": 429, "msg": "请求过于频繁"}, ErrorKind.RATE_LIMITED),
    ({"code": 1001, "message": "busy"}, ErrorKind.RATE_LIMITED),
    ({"code": 50010, "msg": "智能体不存在"}, ErrorKind.REJECTED),
    ({"error": "LLM request timeout"}, ErrorKind.TIMEOUT),
])
def test_reported_error_is_of_the_kind_its_words_else_its_status_say(
    data: dict[str, object], kind: ErrorKind
) -> None:
    assert reported_error("x", data).kind is kind


def test_a_plain_status_says_only_that_there_was_an_error() -> None:
    """RuoYi's `code: 500` is every exception of the app: its words decide, else rejected."""
    ruoyi_error = frozenset({500})
    assert reported_error("x", {"code": 500, "msg": "场景不存在"},
                          plain_statuses=ruoyi_error).kind is ErrorKind.REJECTED
    assert reported_error("x", {"code": 500, "msg": "系统繁忙"},
                          plain_statuses=ruoyi_error).kind is ErrorKind.RATE_LIMITED
    assert reported_error("x", {"code": 503, "msg": ""},
                          plain_statuses=ruoyi_error).kind is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize(("text", "failure"), [
    ('{"error": {"message": "bad key", "code": "invalid_api_key"}}', UpstreamAuthError),
    ('{"code": "too_many_requests", "status": 429, "message": "slow"}', UpstreamRateLimited),
    ('{"code": 502, "message": "bad gateway"}', UpstreamUnavailable),
    ('{"code": "invalid_param", "status": 400, "message": "no"}', UpstreamRejected),
    ('{"id": "chatcmpl-1", "choices": []}', UpstreamProtocolError),  # no error in it
    ('{"code": 0, "data": {}}', UpstreamProtocolError),
    ('{"status": 503, "message": "down"}', UpstreamUnavailable),  # an error status alone
    ("<html>maintenance</html>", UpstreamProtocolError),
])
def test_body_failure_is_what_a_json_answer_in_place_of_the_stream_reports(
    text: str, failure: type[UpstreamFailure]
) -> None:
    assert type(body_failure("x", 200, text)) is failure


@pytest.mark.parametrize("data", ["[1, 2]", "nope", '"[DONE]"'])
def test_json_object_refuses_anything_but_an_object(data: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        json_object(data, upstream="x")


def test_require_names_the_missing_variables() -> None:
    settings = load_settings({"BRIDGE_COZE_TOKEN": "pat_x"}, command="demo")

    assert require(settings, "coze_token") == ("pat_x",)
    with pytest.raises(ConfigError, match="BRIDGE_COZE_BOT_ID"):
        require(settings, "coze_token", "coze_bot_id")


@pytest.mark.parametrize("upstream", ["openai", "coze", "common"])
def test_an_echoed_key_across_the_cut_of_an_upstream_error_is_masked(upstream: str) -> None:
    """The adapters quote the first 300 characters of an upstream's own error: a key it
    echoes across that cut must not leave its head behind (masked first, then cut)."""
    key = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex
    register_secrets([key])
    message = "Incorrect API key provided: ".rjust(290) + key
    if upstream == "openai":
        error: object = stream_error({"error": {"message": message}})
    elif upstream == "coze":
        error = api_error({"code": 4100, "msg": message})
    else:
        error = reported_error("dify", {"code": "invalid_param", "message": message})
    assert key[:8] not in mask_text(str(error))
