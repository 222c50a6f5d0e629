"""bridge/http.py without a network: Retry-After, the status → error mapping, the retry policy."""

from __future__ import annotations

import email.utils
import time
import uuid
from typing import Any

import pytest
from multidict import CIMultiDict
from tenacity import RetryCallState

from bridge.events import ErrorKind
from bridge.http import (
    MAX_RETRY_AFTER_S,
    RETRYABLE,
    UpstreamAuthError,
    UpstreamBroken,
    UpstreamFailure,
    UpstreamHTTP,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_for_status,
    http_status,
    parse_retry_after,
    reported_kind,
)
from bridge.logging import mask_text, register_secrets


@pytest.mark.parametrize(("header", "seconds"), [
    ("0", 0.0), ("5", 5.0), ("1.5", 1.5), (" 7 ", 7.0),
    ("60", 60.0), ("61", MAX_RETRY_AFTER_S), ("3600", MAX_RETRY_AFTER_S),  # capped at 60 s
    ("-3", 0.0),
    (None, None), ("", None), ("soon", None), ("nan", None), ("inf", None),
])
def test_parse_retry_after_delta_seconds(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_http_date() -> None:
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert parse_retry_after(in_30_s) == pytest.approx(30, abs=2)
    in_an_hour = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert parse_retry_after(in_an_hour) == MAX_RETRY_AFTER_S
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


@pytest.mark.parametrize(("status", "error", "kind"), [
    (401, UpstreamAuthError, ErrorKind.AUTH),
    (403, UpstreamAuthError, ErrorKind.AUTH),
    (429, UpstreamRateLimited, ErrorKind.RATE_LIMITED),
    (408, UpstreamUnavailable, ErrorKind.UNAVAILABLE),
    (500, UpstreamUnavailable, ErrorKind.UNAVAILABLE),
    (502, UpstreamUnavailable, ErrorKind.UNAVAILABLE),
    (503, UpstreamUnavailable, ErrorKind.UNAVAILABLE),
    (400, UpstreamRejected, ErrorKind.REJECTED),
    (404, UpstreamNotFound, ErrorKind.NOT_FOUND),
    (410, UpstreamNotFound, ErrorKind.NOT_FOUND),
    (422, UpstreamRejected, ErrorKind.REJECTED),
])
def test_error_for_status(status: int, error: type[UpstreamFailure], kind: ErrorKind) -> None:
    failure = error_for_status(status, "body text", {})
    assert type(failure) is error
    assert failure.kind is kind
    assert failure.message.startswith(f"HTTP {status}: body text")


@pytest.mark.parametrize(("value", "status"), [
    (429, 429), ("503", 503), (400, 400), (599, 599),
    (200, None), (0, None), (4013, None), (40014, None), ("unauthorized", None), (True, None),
    (None, None), (429.0, None),
])
def test_http_status_of_a_body(value: object, status: int | None) -> None:
    assert http_status(value) == status


@pytest.mark.parametrize(("status", "texts", "kind"), [
    (None, ("invalid_api_key",), ErrorKind.AUTH),
    (None, ("Too Many Requests",), ErrorKind.RATE_LIMITED),
    (None, ("The model is overloaded",), ErrorKind.RATE_LIMITED),
    (None, ("系统繁忙",), ErrorKind.RATE_LIMITED),
    (None, ("server_error", "The server had an error"), ErrorKind.UNAVAILABLE),
    (None, ("LLM request timed out",), ErrorKind.TIMEOUT),
    (None, ("something else",), ErrorKind.REJECTED),
    (None, (None, ""), ErrorKind.REJECTED),
    (400, ("Rate Limit Error",), ErrorKind.RATE_LIMITED),  # the words before a generic status
    (401, ("",), ErrorKind.AUTH),
    (429, ("",), ErrorKind.RATE_LIMITED),
    (503, ("",), ErrorKind.UNAVAILABLE),
    (404, ("",), ErrorKind.NOT_FOUND),
    (422, ("",), ErrorKind.REJECTED),
])
def test_reported_kind(status: int | None, texts: tuple[object, ...], kind: ErrorKind) -> None:
    assert reported_kind(status, *texts) is kind


def test_error_for_status_keeps_retry_after_and_truncates_the_body() -> None:
    headers = CIMultiDict({"retry-after": "9"})  # header names are case-insensitive
    assert error_for_status(429, "", headers).retry_after == 9.0
    assert error_for_status(503, "", headers).retry_after == 9.0
    assert error_for_status(429, "", {}).retry_after is None
    assert len(error_for_status(400, "x" * 10_000, {}).message) < 400


def test_only_unavailable_and_rate_limited_are_retried() -> None:
    assert set(RETRYABLE) == {UpstreamUnavailable, UpstreamRateLimited}
    for never in (UpstreamAuthError, UpstreamRejected, UpstreamProtocolError, UpstreamTimeout,
                  UpstreamBroken):
        assert not issubclass(never, RETRYABLE)


def _wait_after(http: UpstreamHTTP, exc: BaseException, attempt: int = 1) -> float:
    retrying = http.retrying()
    state = RetryCallState(retry_object=retrying, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    wait: Any = retrying.wait
    return float(wait(state))


def test_retry_waits_the_advised_time_else_backs_off() -> None:
    http = UpstreamHTTP(session=None, backoff_s=0.01)  # type: ignore[arg-type]
    assert _wait_after(http, UpstreamRateLimited("429", retry_after=7.0)) == 7.0
    assert _wait_after(http, UpstreamUnavailable("503", retry_after=0.0)) == 0.0
    for attempt in (1, 2, 3):
        assert 0 <= _wait_after(http, UpstreamUnavailable("refused"), attempt) <= 0.01 * 2**attempt


def test_retry_stops_after_the_configured_attempts() -> None:
    http = UpstreamHTTP(session=None, retries=2)  # type: ignore[arg-type]
    retrying = http.retrying()
    state = RetryCallState(retry_object=retrying, fn=None, args=(), kwargs={})
    stop: Any = retrying.stop
    state.attempt_number = 2
    assert not stop(state)
    state.attempt_number = 3  # the first try and two retries
    assert stop(state)


def test_timeouts_are_handed_to_aiohttp_but_the_total() -> None:
    """The total timeout is kept by the bridge's own watch: aiohttp's enters a timer around
    every wait for data, a token's worth of CPU each."""
    http = UpstreamHTTP(session=None, connect_timeout_s=3, idle_timeout_s=4,  # type: ignore[arg-type]
                        total_timeout_s=600)
    assert (http.timeout.sock_connect, http.timeout.sock_read, http.timeout.total) == (3, 4, None)


@pytest.mark.parametrize("cut_inside", [10, 30])
def test_a_key_echoed_across_the_cut_of_an_error_body_is_masked(cut_inside: int) -> None:
    """Servers echo the key they refuse ("Incorrect API key provided: sk-…"). The detail
    keeps the first 300 characters of the body: cut before masking, the head of a key that
    straddles the cut was no longer the registered value, and reached the log unmasked."""
    key = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex
    register_secrets([key])
    prefix = '{"error": {"message": "Incorrect API key provided: '
    body = prefix.rjust(300 - cut_inside, " ") + key + '"}}'
    logged = mask_text(str(error_for_status(401, body, {})))
    assert key[:8] not in logged
