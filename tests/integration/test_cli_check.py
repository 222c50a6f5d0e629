"""`chatbridge check` as an operator runs it: a real `python -m bridge check` process (SPEC §1, §2).

Exit 0 on a good configuration, printing every variable with its secrets masked; exit 2 with one
line per problem (the variable and an example); unknown `BRIDGE_*` variables are warnings; a Redis
that refuses is exit 1; `--probe` asks the upstream (a FakeOpenAI on loopback) one word.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import quote

from bridge.config import Settings, env_name
from tests.fakes.chatgpt_web import FakeChatGPT
from tests.fakes.openai import FakeOpenAI
from tests.fakes.scripted import unanswered_url

REPO = Path(__file__).resolve().parents[2]

SECRET_FIELDS = [spec.name for spec in fields(Settings) if spec.metadata["secret"]]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def check(env: dict[str, str], *args: str) -> Result:
    """`python -m bridge check ARGS` with exactly `env` as its BRIDGE_* environment."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "check", *args, env=full, cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def secret_values() -> dict[str, str]:
    """A distinctive value for every secret variable (the robot URL carries its token)."""
    values = {
        env_name(name): f"s3cret-{name.replace('_', '-')}-value-7f3a" for name in SECRET_FIELDS
    }
    values["BRIDGE_YACH_ROBOT_URL"] = (
        "https://yach-oapi.example/robot/send?access_token=s3cret-robot-access-token-7f3a"
    )
    return values


def hidden(value: str) -> list[str]:
    """The forms of a secret that must never be printed."""
    token = value.rpartition("access_token=")[2]
    return [value, token, quote(value, safe="")]


def good_env(state_dir: Path, upstream_url: str = "https://api.openai.com/v1",
             **extra: str) -> dict[str, str]:
    return {
        **secret_values(),
        "BRIDGE_UPSTREAM": "openai",
        "BRIDGE_OPENAI_BASE_URL": upstream_url,
        "BRIDGE_OPENAI_MODEL": "fake-model",
        "BRIDGE_STATE_DIR": str(state_dir),
        "BRIDGE_BOT_ID": "check-bot",
        **extra,
    }


def refused_port() -> int:
    """A loopback port where nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])



async def test_good_configuration_prints_every_variable_masked(
    tmp_path: Path, redis_url: str
) -> None:
    env = good_env(tmp_path, BRIDGE_REDIS_URL=redis_url)
    result = await check(env)
    assert result.code == 0, result.out + result.err
    names = {line.split()[0] for line in result.lines if line.startswith("BRIDGE_")}
    assert names == {env_name(spec.name) for spec in fields(Settings)}
    for value in secret_values().values():
        for form in hidden(value):
            assert form not in result.out + result.err
    shown = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.lines
             if line.startswith("BRIDGE_")}
    for name in secret_values():
        assert "set" in shown[name] and "***" in shown[name]
    assert shown["BRIDGE_OPENAI_MODEL"] == "fake-model"
    assert shown["BRIDGE_PORT"] == "8080"
    assert any(line.startswith("redis: ok") for line in result.lines), result.out


async def test_a_secret_read_from_a_file_is_masked_too(tmp_path: Path) -> None:
    secret_file = tmp_path / "yach-secret"
    secret_file.write_text("  SEC-from-a-credential-file-91ab\n")
    env = good_env(tmp_path)
    del env["BRIDGE_YACH_SECRET"]
    env["BRIDGE_YACH_SECRET_FILE"] = str(secret_file)
    result = await check(env)
    assert result.code == 0, result.out
    assert "SEC-from-a-credential-file-91ab" not in result.out + result.err
    assert re.search(r"^BRIDGE_YACH_SECRET\s+\*+", result.out, re.MULTILINE), result.out


async def test_bad_configuration_lists_every_problem_with_an_example(tmp_path: Path) -> None:
    env = {
        "BRIDGE_UPSTREAM": "openai",
        "BRIDGE_OPENAI_API_KEY": "change-me",  # as left from the example file: missing
        "BRIDGE_PORT": "eighty",
        "BRIDGE_USER_RATE": "fast",
        "BRIDGE_LOG_LEVEL": "loud",
        "BRIDGE_SESSION_TTL_S": "-1",
        "BRIDGE_YACH_ROBOT_URL": "ftp://robot.example/send?access_token=s3cret-bad-url-token",
        "BRIDGE_STATE_DIR": str(tmp_path),
    }
    result = await check(env)
    assert result.code == 2, result.out
    errors = [line for line in result.lines if line.startswith("error: ")]
    expected = ["BRIDGE_PORT", "BRIDGE_USER_RATE", "BRIDGE_LOG_LEVEL", "BRIDGE_SESSION_TTL_S",
                "BRIDGE_YACH_ROBOT_URL", "BRIDGE_OPENAI_API_KEY", "BRIDGE_OPENAI_MODEL",
                "BRIDGE_YACH_SECRET"]
    assert sorted(line.split()[1].rstrip(":") for line in errors) == sorted(expected)
    for line in errors:
        name = line.split()[1].rstrip(":")
        assert f"example: {name}=" in line, line
    assert "s3cret-bad-url-token" not in result.out + result.err
    # The example of a secret is an example to follow, not masked as if it were the secret.
    assert "example: BRIDGE_OPENAI_API_KEY=sk-..." in result.out, result.out
    # Nothing was started or printed as if it were: no settings table, no Redis line.
    assert not any(line.startswith(("BRIDGE_", "redis:")) for line in result.lines)


async def test_unknown_variables_are_warnings_not_errors(tmp_path: Path) -> None:
    env = good_env(tmp_path, BRIDGE_OPENAI_MODLE="gpt-4o", BRIDGE_WHATEVER="1")
    result = await check(env)
    assert result.code == 0, result.out
    warnings = [line for line in result.lines if line.startswith("warning: ")]
    assert len(warnings) == 2, warnings
    assert any("BRIDGE_OPENAI_MODLE" in w and "BRIDGE_OPENAI_MODEL" in w for w in warnings)
    assert any("BRIDGE_WHATEVER" in w for w in warnings)


async def test_chats_without_a_reply_route_are_warnings(tmp_path: Path) -> None:
    """Without the app credentials a robot URL answers into its one group: said, not refused
    (a sessionWebhook may still come with every message)."""
    env = good_env(tmp_path, BRIDGE_YACH_APP_KEY="", BRIDGE_YACH_APP_SECRET="")
    result = await check(env)
    assert result.code == 0, result.out + result.err
    warnings = [line for line in result.lines if line.startswith("warning: ")]
    assert [w.split(":")[1].split()[0] for w in warnings] == [
        "BRIDGE_YACH_APP_KEY/BRIDGE_YACH_APP_SECRET", "without",
    ], warnings
    assert "s3cret" not in result.out


async def test_a_timestamp_window_that_refuses_every_webhook_is_a_warning(tmp_path: Path) -> None:
    result = await check(good_env(tmp_path, BRIDGE_YACH_MAX_SKEW_S="0"))
    assert result.code == 0, result.out + result.err
    warnings = [line for line in result.lines if line.startswith("warning: ")]
    assert [w.split()[1] for w in warnings] == ["BRIDGE_YACH_MAX_SKEW_S=0"], warnings


async def test_a_secret_file_beside_its_set_variable_is_a_warning(tmp_path: Path) -> None:
    env = good_env(tmp_path, BRIDGE_OPENAI_API_KEY_FILE=str(tmp_path / "key"))
    result = await check(env)
    assert result.code == 0, result.out + result.err
    assert ("warning: BRIDGE_OPENAI_API_KEY_FILE is not read: BRIDGE_OPENAI_API_KEY is set "
            "too, and wins") in result.lines, result.out


async def test_an_unknown_variable_is_not_matched_to_an_unrelated_one(tmp_path: Path) -> None:
    """The `BRIDGE_` every name shares made unrelated names look alike: BRIDGE_TIMEOUT
    got "did you mean BRIDGE_IM?", BRIDGE_FOO "did you mean BRIDGE_PORT?"."""
    env = good_env(tmp_path, BRIDGE_TIMEOUT="30", BRIDGE_FOO="1", BRIDGE_LOGLEVEL="debug")
    result = await check(env)
    assert result.code == 0, result.out
    warnings = {line.split()[1]: line for line in result.lines if line.startswith("warning: ")}
    assert "did you mean" not in warnings["BRIDGE_TIMEOUT"], warnings
    assert "did you mean" not in warnings["BRIDGE_FOO"], warnings
    assert "did you mean BRIDGE_LOG_LEVEL?" in warnings["BRIDGE_LOGLEVEL"], warnings


async def test_a_redis_that_refuses_is_exit_1_without_its_password(tmp_path: Path) -> None:
    port = refused_port()
    url = f"redis://:hunter2-redis-password@127.0.0.1:{port}/0"
    result = await check(good_env(tmp_path, BRIDGE_REDIS_URL=url))
    assert result.code == 1, result.out
    redis_lines = [line for line in result.lines if line.startswith("redis:")]
    assert len(redis_lines) == 1 and "does not answer" in redis_lines[0], result.out
    assert f"127.0.0.1:{port}" in redis_lines[0]
    assert "hunter2-redis-password" not in result.out + result.err


async def test_embedded_redis_needs_a_writable_state_directory(tmp_path: Path) -> None:
    ok = await check(good_env(tmp_path / "state"))
    assert ok.code == 0, ok.out
    assert any(line.startswith("redis: embedded") for line in ok.lines), ok.out
    assert not (tmp_path / "state").exists()  # check starts nothing and creates nothing
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = await check(good_env(blocker / "state"))
    assert bad.code == 1, bad.out
    assert any(line.startswith("redis: embedded") and "BRIDGE_STATE_DIR" in line
               for line in bad.lines), bad.out


async def test_probe_asks_the_upstream_one_word(tmp_path: Path, redis_url: str,
                                                upstream: FakeOpenAI) -> None:
    env = good_env(tmp_path, upstream.base_url, BRIDGE_REDIS_URL=redis_url,
                   BRIDGE_OPENAI_API_KEY="sk-test-placeholder")
    result = await check(env, "--probe")
    assert result.code == 0, result.out + result.err
    assert [body["messages"][-1]["content"] for body in upstream.bodies] == ["ping"]
    assert any(line.startswith("upstream: ok") for line in result.lines), result.out
    assert "sk-test-placeholder" not in result.out + result.err


async def test_what_the_probe_logs_goes_to_stderr_masked(tmp_path: Path) -> None:
    """The chatgpt-web probe finds both sockets its answer names dead and logs it: the line
    goes to stderr through the bridge's masking renderer, not (unmasked, with structlog's
    default renderer) into check's report on stdout."""
    async with FakeChatGPT() as fake:
        fake.answer_mode, fake.wss_target = "ws", "all_dead"
        env = {**good_env(tmp_path), **fake.env(), "BRIDGE_LOG_FORMAT": "json"}
        result = await check(env, "--probe")
    assert result.code == 1, result.out + result.err
    assert "chatgpt_socket_unreachable" not in result.out
    lines = [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines] == ["chatgpt_socket_unreachable"] * 2
    assert all(line["bot"] == "check-bot" for line in lines)
    assert env["BRIDGE_CHATGPT_ACCESS_TOKEN"] not in result.out + result.err


async def test_probe_with_a_refused_key_is_exit_1_and_says_so(tmp_path: Path,
                                                              upstream: FakeOpenAI) -> None:
    env = good_env(tmp_path, upstream.base_url, BRIDGE_OPENAI_API_KEY="sk-wrong-key-0a1b2c")
    result = await check(env, "--probe")
    assert result.code == 1, result.out
    line = [line for line in result.lines if line.startswith("upstream:")][-1]
    assert "openai" in line and "auth" in line and "credentials" in line, line
    assert "sk-wrong-key-0a1b2c" not in result.out + result.err
    assert upstream.bodies == []  # the fake refused it before reading the question


async def test_probe_of_a_wrong_base_url_is_exit_1_and_names_the_variable(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    """A BASE_URL missing its `/v1` (a 404 from the server): the probe says what to check."""
    env = good_env(tmp_path, upstream.base_url.removesuffix("/v1") + "/wrong",
                   BRIDGE_OPENAI_API_KEY="sk-test-placeholder")  # fmt: skip
    result = await check(env, "--probe")
    assert result.code == 1, result.out
    line = [line for line in result.lines if line.startswith("upstream:")][-1]
    assert "not_found" in line and "BASE_URL" in line, line


async def test_a_check_stopped_by_sigterm_midway_does_not_exit_0(
    tmp_path: Path, redis_url: str
) -> None:
    """`check --probe` stopped while it waits on the upstream (a deploy step timing out, a
    job cancelled) must not exit 0, "the configuration is good". The entry point's handler,
    meant for the program's loading (`bridge.launch`), stayed installed for all of `check`
    and made it exit 0 (found by review); it dies of the signal, as it did before."""
    code, _ = await _probe_stopped(tmp_path, redis_url, signal.SIGTERM)
    assert code == -signal.SIGTERM


def _sigint_default() -> None:
    """In the child: Ctrl-C as a terminal delivers it (a background job's SIGINT is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _probe_stopped(tmp_path: Path, redis_url: str, signum: int) -> tuple[int, str]:
    """`check --probe` against an upstream that never answers, sent `signum` while it waits
    for the probe's answer: its exit status and what it wrote to stderr."""
    with unanswered_url() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(good_env(tmp_path, url + "/v1", BRIDGE_REDIS_URL=redis_url,
                            BRIDGE_OPENAI_API_KEY="sk-test-placeholder",
                            BRIDGE_UPSTREAM_CONNECT_TIMEOUT_S="30"))  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "check", "--probe", env=env, cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_sigint_default,
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            async with asyncio.timeout(30):  # the probe starts once Redis has answered
                while not (line := await process.stdout.readline()).startswith(b"redis:"):
                    assert line, "check ended before probing"
            await asyncio.sleep(0.2)  # into the probe's wait
            process.send_signal(signum)
            err = await asyncio.wait_for(process.stderr.read(), 10)
            await asyncio.wait_for(process.wait(), 10)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_the_upstream_adapter_is_built_as_run_builds_it(tmp_path: Path) -> None:
    """Settings only the adapter can judge are configuration errors too, without --probe."""
    recording = tmp_path / "answer.sse"
    recording.write_text("data: [DONE]\n\n")
    env = {"BRIDGE_UPSTREAM": "replay", "BRIDGE_REPLAY_FILE": str(recording),
           "BRIDGE_YACH_INSECURE": "1", "BRIDGE_STATE_DIR": str(tmp_path)}
    result = await check(env)  # a single recording needs its format
    assert result.code == 2, result.out
    assert any(line.startswith("error: ") and "BRIDGE_REPLAY_FORMAT" in line
               for line in result.lines), result.out
    fixed = await check({**env, "BRIDGE_REPLAY_FORMAT": "openai"})
    assert fixed.code == 0, fixed.out
    assert any(line.startswith("upstream: replay") for line in fixed.lines), fixed.out
    # without a secret, unsigned webhooks are taken: said, as it must not go unnoticed
    assert any(line.startswith("warning: BRIDGE_YACH_INSECURE=1 without BRIDGE_YACH_SECRET")
               for line in fixed.lines), fixed.out


async def test_a_check_interrupted_by_ctrl_c_prints_no_traceback(
    tmp_path: Path, redis_url: str
) -> None:
    """Ctrl-C while `check --probe` waits on the upstream: the operator stopped it, nothing
    failed. It printed a Python traceback (KeyboardInterrupt out of asyncio.run); it ends
    as the SIGTERM case does, by the signal, without exiting 0."""
    code, err = await _probe_stopped(tmp_path, redis_url, signal.SIGINT)
    assert "Traceback" not in err, err
    assert code != 0
