"""The "thinking" notice of a turn (`bridge.relay._ThinkingNotice`): a timer, on a real loop."""

from __future__ import annotations

import asyncio
import time

from bridge.relay import _ThinkingNotice


async def _notice(delay_s: float) -> tuple[_ThinkingNotice, list[str]]:
    sent: list[str] = []

    async def send() -> None:
        sent.append("thinking")

    return _ThinkingNotice(send, delay_s), sent


async def test_it_is_sent_once_due_and_goes_before_the_first_message() -> None:
    notice, sent = await _notice(0.05)
    await asyncio.sleep(0.1)
    await notice.before_first_message()
    await notice.aclose()
    assert sent == ["thinking"]


async def test_no_notice_once_answer_text_showed_before_it_was_due() -> None:
    notice, sent = await _notice(0.05)
    notice.not_needed()
    await asyncio.sleep(0.1)
    await notice.aclose()
    assert sent == []


async def test_no_notice_when_the_answer_text_comes_in_the_tick_it_fell_due() -> None:
    """The process stalls (a GC pause, a busy CPU, SIGSTOP) past the notice's due time, and
    on resuming the answer's text is there too: both run in the same turn of the loop. The
    timer started the notice's send as it fired, which `not_needed()` could no longer stop:
    "thinking…" went out right before the answer it stands in for (found by review)."""
    notice, sent = await _notice(0.05)
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.05, notice.not_needed)  # the text, at resumption
    time.sleep(0.2)  # the stall: the notice and the text are both due when the loop runs
    await asyncio.sleep(0.05)
    await notice.before_first_message()
    await notice.aclose()
    assert sent == []
