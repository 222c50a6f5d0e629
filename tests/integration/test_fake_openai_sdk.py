"""The fake OpenAI server, read by the official SDK: if the SDK cannot read it, the fake —
and every test built on it — is wrong (STYLE.md, Tests)."""

from __future__ import annotations

import pytest

from tests.fakes.openai import FakeOpenAI

openai = pytest.importorskip("openai")


async def test_official_client_reads_the_fake_stream(upstream: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test-placeholder")
    try:
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hello there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
    finally:
        await client.close()
    assert text == "You said: hello there. (history: 0 messages)"
    assert usage is not None and usage.prompt_tokens == 11
