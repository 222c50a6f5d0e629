"""How an answer of Yach's open API is read (SPEC §4: success is HTTP 200 with `code == 200`,
or `errcode == 0`; a rate limit is HTTP 429 or a message saying the frequency is exceeded)."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.yach_api import YachAPIError, check_answer


@pytest.mark.parametrize("payload", [
    {"code": 200, "msg": "ok"},
    {"code": "200", "msg": "ok"},  # the same code, written as a string
    {"errcode": 0, "errmsg": "ok"},
    {"errcode": "0"},
])  # fmt: skip
def test_success_in_either_form_is_success(payload: dict[str, Any]) -> None:
    assert check_answer(200, payload, {}) == payload


@pytest.mark.parametrize(("status", "payload", "rate_limited"), [
    (200, {"code": 500, "msg": "internal error"}, False),
    (200, {"code": "2000", "msg": "ok"}, False),
    (500, {"code": 200, "msg": "ok"}, False),  # a 200 code inside an HTTP error is no success
    (200, {"code": 43004, "msg": "发送频率超过限制"}, True),
    (429, "not json", True),
])  # fmt: skip
def test_anything_else_is_a_failure(status: int, payload: Any, rate_limited: bool) -> None:
    with pytest.raises(YachAPIError) as failure:
        check_answer(status, payload, {})
    assert failure.value.rate_limited is rate_limited


def test_a_code_of_a_megabyte_is_told_in_a_few_words() -> None:
    # the code went into the reason, and so into its log line, whole
    with pytest.raises(YachAPIError) as failed:
        check_answer(200, {"code": "c" * (1 << 20), "msg": "m"}, {})
    assert len(failed.value.reason) < 500
