"""Configuration: typed, validated, every problem listed, secrets never shown."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest

from adapters.upstream.replay import FORMATS
from bridge.config import (
    REPLAY_FORMATS,
    ConfigError,
    Rate,
    Settings,
    given_value,
    load_settings,
    masked_settings,
    shadowed_files,
    unknown_variables,
)
from bridge.logging import mask_text

OPENAI = {
    "BRIDGE_UPSTREAM": "openai",
    "BRIDGE_OPENAI_API_KEY": "sk-secret-value-123",
    "BRIDGE_OPENAI_MODEL": "m",
    "BRIDGE_YACH_SECRET": "SEC-yach-secret-456",
}


def problems(env: dict[str, str], command: str = "run") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, command=command)
    return caught.value.problems


def test_defaults_match_the_spec() -> None:
    settings = load_settings(OPENAI)
    assert (settings.host, settings.port, settings.bot_id) == ("127.0.0.1", 8080, "default")
    assert settings.redis_url is None
    assert settings.session_scope == "group_user"
    assert settings.session_ttl_s == 604800
    assert settings.history_turns == 20
    assert settings.reply_mode == "stream"
    assert (settings.flush_min_chars, settings.flush_max_wait_s) == (300, 6)
    assert settings.thinking_notice_s == 4
    assert (settings.workers, settings.session_queue_max, settings.max_attempts) == (32, 5, 3)
    assert (settings.claim_idle_s, settings.drain_timeout_s) == (60, 25)
    assert (settings.max_body_bytes, settings.max_input_chars) == (1048576, 8000)
    assert settings.user_rate == Rate(20, 60) and settings.yach_send_rate == Rate(20, 60)
    assert settings.resolved_image_pipeline == "vision"
    assert settings.yach_api_base == "https://yach-oapi.zhiyinlou.com"
    assert settings.key_prefix == "chatbridge:{default}:"
    assert (settings.im, settings.log_level, settings.lang) == ("yach", "info", "zh")
    assert (settings.show_reasoning, settings.yach_msg_format) == ("off", "markdown")
    assert (settings.upstream_retries, settings.max_image_bytes) == (3, 10485760)
    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert settings.coze_base_url == "https://api.coze.cn"
    assert settings.chatgpt_base_url == "https://chatgpt.com/backend-api"
    assert settings.hiagent_page_path == "/product/llm/chat/{app_key}"
    assert settings.resolved_log_format == "json"  # (stdout is no TTY under pytest)
    assert load_settings({**OPENAI, "BRIDGE_UPSTREAM": "coze", "BRIDGE_COZE_TOKEN": "t",
                          "BRIDGE_COZE_BOT_ID": "b"}).resolved_image_pipeline == "none"


def test_derived_settings_follow_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/chatbridge/a:/var/lib/other")
    settings = load_settings({**OPENAI, "BRIDGE_LOG_FORMAT": "console",
                              "BRIDGE_YACH_ROBOT_SECRET": "SEC-robot"})
    assert settings.resolved_state_dir == Path("/var/lib/chatbridge/a")
    assert settings.resolved_log_format == "console"
    assert settings.yach_sign_secret == "SEC-robot"
    shown = dict(masked_settings(load_settings({**OPENAI, "BRIDGE_ALLOW_GROUPS": "g2,g1"})))
    assert shown["BRIDGE_ALLOW_GROUPS"] == "g1,g2"


def test_every_problem_is_listed_with_the_variable_and_an_example() -> None:
    found = problems({"BRIDGE_PORT": "eighty", "BRIDGE_USER_RATE": "fast", "BRIDGE_LANG": "fr"})
    by_name = {line.split(":")[0]: line for line in found}
    assert set(by_name) == {
        "BRIDGE_PORT", "BRIDGE_USER_RATE", "BRIDGE_LANG", "BRIDGE_UPSTREAM", "BRIDGE_YACH_SECRET",
    }
    for line in found:
        assert "example: BRIDGE_" in line
    assert "20/60" in by_name["BRIDGE_USER_RATE"]


def test_upstream_requirements_follow_the_chosen_upstream() -> None:
    env = {"BRIDGE_UPSTREAM": "coze", "BRIDGE_YACH_SECRET": "s"}
    assert {line.split(":")[0] for line in problems(env)} == {
        "BRIDGE_COZE_TOKEN", "BRIDGE_COZE_BOT_ID",
    }


def test_an_invalid_value_is_one_problem_not_also_a_missing_one() -> None:
    found = problems({"BRIDGE_UPSTREAM": "gpt", "BRIDGE_YACH_SECRET": "s"})
    assert len(found) == 1 and found[0].startswith("BRIDGE_UPSTREAM: invalid value 'gpt'")
    env = {**OPENAI, "BRIDGE_IMAGE_PIPELINE": "ocr", "BRIDGE_OCR_MODEL": "m",
           "BRIDGE_OCR_BASE_URL": "ftp://ocr.example"}
    found = problems(env)
    assert len(found) == 1 and found[0].startswith("BRIDGE_OCR_BASE_URL: invalid value")


@pytest.mark.parametrize(
    ("upstream", "pipeline"),
    [("dify", "native"), ("coze", "vision"), ("openai", "native"), ("hiagent", "vision")],
)
def test_a_pipeline_handing_images_to_an_upstream_that_ignores_them_is_refused(
    upstream: str, pipeline: str
) -> None:
    """`native` and `vision` pass the image itself on: to an upstream that does not read it
    the question would arrive without it, and be answered as if none had been sent."""
    env = {"BRIDGE_UPSTREAM": upstream, "BRIDGE_IMAGE_PIPELINE": pipeline,
           "BRIDGE_YACH_SECRET": "s", "BRIDGE_PORT": "eighty"}
    found = problems(env, command="check")
    unread = [line for line in found if line.startswith("BRIDGE_IMAGE_PIPELINE:")]
    assert unread == [
        f"BRIDGE_IMAGE_PIPELINE: {pipeline} hands images to the upstream, and {upstream} does "
        f"not read them (only {'yach-agent' if pipeline == 'native' else 'openai and yach-agent'}"
        f": with {upstream} a question's image would be dropped unseen); example: "
        f"BRIDGE_IMAGE_PIPELINE=ocr"
    ]
    assert any(line.startswith("BRIDGE_PORT:") for line in found)  # listed with the others


@pytest.mark.parametrize(
    ("upstream", "pipeline"),
    [("yach-agent", "native"), ("openai", "vision"), ("yach-agent", "vision"), ("dify", "none"),
     ("coze", "ocr"), ("dify", None), ("hiagent", None)],
)
def test_a_pipeline_the_upstream_can_use_is_accepted(upstream: str, pipeline: str | None) -> None:
    env = {"BRIDGE_UPSTREAM": upstream, "BRIDGE_YACH_SECRET": "s", "BRIDGE_OCR_MODEL": "m",
           "BRIDGE_OCR_BASE_URL": "https://ocr.example/v1"}
    if pipeline is not None:
        env["BRIDGE_IMAGE_PIPELINE"] = pipeline
    found = problems(env)  # the upstream's own credentials are missing here, nothing else
    assert not any(line.startswith("BRIDGE_IMAGE_PIPELINE") for line in found), found


def test_a_replay_file_needs_its_format_listed_with_the_other_problems(tmp_path: Path) -> None:
    recording = tmp_path / "answer.sse"
    recording.write_text("data: [DONE]\n\n")
    env = {"BRIDGE_UPSTREAM": "replay", "BRIDGE_REPLAY_FILE": str(recording),
           "BRIDGE_YACH_SECRET": "s", "BRIDGE_PORT": "eighty"}
    assert {line.split(":")[0] for line in problems(env)} == {
        "BRIDGE_PORT", "BRIDGE_REPLAY_FORMAT",
    }
    folder = tmp_path / "recordings"  # a folder's files are named by their format
    folder.mkdir()
    (folder / "openai-answer.sse").write_text("data: [DONE]\n\n")
    assert load_settings({**env, "BRIDGE_PORT": "0", "BRIDGE_REPLAY_FILE": str(folder)})


def test_a_replay_folder_without_recordings_is_a_problem_of_its_variable(tmp_path: Path) -> None:
    """A folder holding no `<format>-….sse` file: `run` and `check` said "BRIDGE_UPSTREAM=replay
    cannot be set up: nothing to replay", naming another variable and giving no example
    (SPEC §1: one line per problem naming the variable, what is wrong and an example)."""
    (tmp_path / "answer.sse").write_text("data: [DONE]\n\n")  # no format in its name
    (tmp_path / "openai-folder.sse").mkdir()  # named as one, and no file
    env = {"BRIDGE_UPSTREAM": "replay", "BRIDGE_REPLAY_FILE": str(tmp_path),
           "BRIDGE_YACH_SECRET": "s", "BRIDGE_PORT": "eighty"}
    found = problems(env)
    assert [line.split(":")[0] for line in found] == ["BRIDGE_PORT", "BRIDGE_REPLAY_FILE"]
    assert "no recordings" in found[1] and "example: BRIDGE_REPLAY_FILE=" in found[1]
    assert set(REPLAY_FORMATS) == set(FORMATS)  # the formats the adapter plays


def test_a_replay_file_that_does_not_exist_is_listed_with_the_other_problems(
    tmp_path: Path,
) -> None:
    """Not only once every other problem is fixed, by the adapter, naming BRIDGE_UPSTREAM."""
    env = {"BRIDGE_UPSTREAM": "replay", "BRIDGE_REPLAY_FILE": str(tmp_path / "missing.sse"),
           "BRIDGE_REPLAY_FORMAT": "openai", "BRIDGE_YACH_SECRET": "s", "BRIDGE_PORT": "eighty"}
    found = problems(env)
    assert [line.split(":")[0] for line in found] == ["BRIDGE_PORT", "BRIDGE_REPLAY_FILE"]
    assert "no such file or folder" in found[1] and "example: BRIDGE_REPLAY_FILE=" in found[1]


def test_placeholder_and_empty_values_count_as_missing() -> None:
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY": "change-me", "BRIDGE_OPENAI_MODEL": ""}
    names = {line.split(":")[0] for line in problems(env)}
    assert names == {"BRIDGE_OPENAI_API_KEY", "BRIDGE_OPENAI_MODEL"}


def test_run_refuses_without_the_webhook_secret_unless_insecure() -> None:
    env = {key: value for key, value in OPENAI.items() if key != "BRIDGE_YACH_SECRET"}
    assert [line.split(":")[0] for line in problems(env)] == ["BRIDGE_YACH_SECRET"]
    assert load_settings({**env, "BRIDGE_YACH_INSECURE": "1"}).yach_secret is None
    assert load_settings(env, command="chat").upstream == "openai"


def test_secret_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("  sk-from-file \n")
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY": "", "BRIDGE_OPENAI_API_KEY_FILE": str(secret_file)}
    assert load_settings(env).openai_api_key == "sk-from-file"
    missing = {**env, "BRIDGE_OPENAI_API_KEY_FILE": str(tmp_path / "nope")}
    [line] = [line for line in problems(missing) if line.startswith("BRIDGE_OPENAI_API_KEY_FILE")]
    assert "example: BRIDGE_OPENAI_API_KEY_FILE=/" in line  # every problem has an example
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    binary = {**env, "BRIDGE_OPENAI_API_KEY_FILE": str(tmp_path / "binary")}
    assert "BRIDGE_OPENAI_API_KEY_FILE" in [line.split(":")[0] for line in problems(binary)]


def test_a_secret_file_that_is_no_regular_file_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    """A FIFO (or a device) named as a secret's file: reading it would wait for a writer that
    never comes (or never end), and `check` and `run` with it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY": "", "BRIDGE_OPENAI_API_KEY_FILE": str(fifo)}
    [line] = problems(env)
    assert line.startswith("BRIDGE_OPENAI_API_KEY_FILE: cannot read")
    assert "not a regular file" in line
    assert given_value("openai_api_key", env) is None


def test_a_file_beside_its_variable_is_left_unread_and_said() -> None:
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY_FILE": "/run/credentials/key",
           "BRIDGE_YACH_SECRET_FILE": "/run/credentials/yach", "BRIDGE_YACH_SECRET": "change-me",
           "BRIDGE_DIFY_API_KEY_FILE": "/run/credentials/dify",
           "BRIDGE_DIFY_API_KEY": ""}  # fmt: skip
    # the variable wins (it is set); a placeholder or an empty one leaves the file to be read
    assert shadowed_files(env) == ["BRIDGE_OPENAI_API_KEY_FILE"]
    assert shadowed_files(OPENAI) == []


def test_a_bad_secret_value_is_not_echoed() -> None:
    env = {**OPENAI, "BRIDGE_YACH_ROBOT_URL": "ftp://robot?access_token=very-secret-token"}
    [line] = problems(env)
    assert line.startswith("BRIDGE_YACH_ROBOT_URL") and "very-secret-token" not in line


def test_masked_settings_hide_every_secret() -> None:
    env = {**OPENAI, "BRIDGE_YACH_ROBOT_URL": "https://h/robot/send?access_token=tok-abc-999"}
    shown = dict(masked_settings(load_settings(env)))
    text = "\n".join(shown.values())
    for secret in ("sk-secret-value-123", "SEC-yach-secret-456", "tok-abc-999"):
        assert secret not in text
    assert shown["BRIDGE_OPENAI_MODEL"] == "m"
    assert len(shown) == len(fields(Settings))


SECRETS = [  # every credential SPEC §2 names
    "BRIDGE_YACH_SECRET", "BRIDGE_YACH_ROBOT_SECRET", "BRIDGE_YACH_APP_KEY",
    "BRIDGE_YACH_APP_SECRET", "BRIDGE_OPENAI_API_KEY", "BRIDGE_OCR_API_KEY",
    "BRIDGE_AUTOCUT_TOKEN", "BRIDGE_HIAGENT_APP_KEY", "BRIDGE_HIAGENT_VISITOR_KEY",
    "BRIDGE_COZE_TOKEN", "BRIDGE_DIFY_API_KEY", "BRIDGE_AIMASTER_TOKEN",
    "BRIDGE_CHATGPT_ACCESS_TOKEN",
]


def test_check_shows_no_credential_of_any_upstream() -> None:
    env = {**OPENAI, **{name: f"secret-{i}-of-{name.lower()}" for i, name in enumerate(SECRETS)}}
    shown = dict(masked_settings(load_settings(env)))
    text = "\n".join(shown.values())
    for name in SECRETS:
        assert env[name] not in text, name
        assert shown[name] == "****** (set)", name


def test_unknown_variables_are_reported_as_typos() -> None:
    env = {**OPENAI, "BRIDGE_OPENAI_MODLE": "x", "BRIDGE_YACH_SECRET_FILE": "/x", "HOME": "/"}
    assert unknown_variables(env) == ["BRIDGE_OPENAI_MODLE"]


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("0", Rate(0, 0)), ("20/60", Rate(20, 60)), ("5/0.5", Rate(5, 0.5)), ("0/60", Rate(0, 60))],
)
def test_rates(raw: str, rate: Rate) -> None:
    assert load_settings({**OPENAI, "BRIDGE_USER_RATE": raw}).user_rate == rate


def test_durations_accept_decimals_and_json_must_be_an_object() -> None:
    assert load_settings({**OPENAI, "BRIDGE_CLAIM_IDLE_S": "1.5"}).claim_idle_s == 1.5
    env = {**OPENAI, "BRIDGE_UPSTREAM": "dify", "BRIDGE_DIFY_BASE_URL": "https://d/v1",
           "BRIDGE_DIFY_API_KEY": "k", "BRIDGE_DIFY_INPUTS": "[1]"}
    assert [line.split(":")[0] for line in problems(env)] == ["BRIDGE_DIFY_INPUTS"]


@pytest.mark.parametrize("raw", ["0", "0.01", "0.5"])
def test_a_claim_idle_time_under_a_second_is_refused(raw: str) -> None:
    """A live worker renews its claims every BRIDGE_CLAIM_IDLE_S/3 (at most every 50 ms):
    with 0 (or 0.01) the claim loop of a second process took every entry from the live one
    at once, each process restarted the turn in turn, and after three starts the message was
    dead-lettered ("failed repeatedly") without an answer."""
    [line] = problems({**OPENAI, "BRIDGE_CLAIM_IDLE_S": raw})
    assert line.startswith("BRIDGE_CLAIM_IDLE_S: invalid value") and "at least 1" in line
    assert "example: BRIDGE_CLAIM_IDLE_S=60" in line
    assert load_settings({**OPENAI, "BRIDGE_CLAIM_IDLE_S": "1"}).claim_idle_s == 1


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_a_duration_or_rate_that_is_not_a_finite_number_is_refused(raw: str) -> None:
    env = {**OPENAI, "BRIDGE_FLUSH_MAX_WAIT_S": raw, "BRIDGE_USER_RATE": f"20/{raw}",
           "BRIDGE_OPENAI_TEMPERATURE": raw}
    assert {line.split(":")[0] for line in problems(env)} == {
        "BRIDGE_FLUSH_MAX_WAIT_S", "BRIDGE_USER_RATE", "BRIDGE_OPENAI_TEMPERATURE",
    }


@pytest.mark.parametrize(
    "url", ["redis://localhost:notaport/0", "redis://h:99999", "http://h", "unix://", "unix://?db=1"]
)
def test_a_redis_url_that_cannot_be_used_is_a_configuration_error(url: str) -> None:
    assert [line.split(":")[0] for line in problems({**OPENAI, "BRIDGE_REDIS_URL": url})] == [
        "BRIDGE_REDIS_URL"
    ]


def test_an_invalid_redis_url_is_shown_without_its_password() -> None:
    [line] = problems({**OPENAI, "BRIDGE_REDIS_URL": "redis://:pw-secret-77@h:port/0"})
    assert line.startswith("BRIDGE_REDIS_URL") and "pw-secret-77" not in line
    assert "redis://:***@h:port/0" in line


def test_a_placeholder_left_in_the_env_file_gives_way_to_the_secret_file(tmp_path: Path) -> None:
    """env.example ships `BRIDGE_YACH_SECRET=change-me`; the unit's comments put
    `BRIDGE_YACH_SECRET_FILE` in a drop-in: the placeholder counts as missing, so the file
    gives the secret."""
    secret_file = tmp_path / "yach_secret"
    secret_file.write_text("SEC-from-credentials\n")
    env = {**OPENAI, "BRIDGE_YACH_SECRET": "change-me", "BRIDGE_YACH_SECRET_FILE": str(secret_file)}
    assert load_settings(env).yach_secret == "SEC-from-credentials"


def test_masked_settings_show_what_an_unset_derived_default_resolves_to(tmp_path: Path) -> None:
    """`check` prints the resolved settings (SPEC §1): an unset BRIDGE_IMAGE_PIPELINE is
    `vision` for openai, an unset BRIDGE_STATE_DIR is $STATE_DIRECTORY or ~/.local/state."""
    settings = load_settings(OPENAI)
    shown = dict(masked_settings(settings))
    assert shown["BRIDGE_IMAGE_PIPELINE"] == "vision (default)"
    assert shown["BRIDGE_LOG_FORMAT"] == f"{settings.resolved_log_format} (default)"
    assert shown["BRIDGE_STATE_DIR"] == f"{settings.resolved_state_dir} (default)"
    given = dict(masked_settings(load_settings({**OPENAI, "BRIDGE_IMAGE_PIPELINE": "none"})))
    assert given["BRIDGE_IMAGE_PIPELINE"] == "none"


def test_an_empty_fetch_allow_list_is_shown_as_allowing_no_host() -> None:
    """An empty BRIDGE_ALLOW_GROUPS/_USERS lets everyone in, but an empty
    BRIDGE_FETCH_ALLOW_HOSTS lets no host past the fetch guard (SPEC §8): `check` showed it
    as "(all)", telling the operator every host could be fetched from."""
    shown = dict(masked_settings(load_settings(OPENAI)))
    assert shown["BRIDGE_ALLOW_GROUPS"] == shown["BRIDGE_ALLOW_USERS"] == "(all)"
    assert "all" not in shown["BRIDGE_FETCH_ALLOW_HOSTS"]
    assert shown["BRIDGE_FETCH_ALLOW_HOSTS"] == "(none)"


@pytest.mark.parametrize(
    ("name", "raw", "said"),
    [
        ("BRIDGE_PORT", "8o80", "must be a whole number"),
        ("BRIDGE_WORKERS", "1.5", "must be a whole number"),
        ("BRIDGE_FLUSH_MAX_WAIT_S", "6s", "must be a number"),
        ("BRIDGE_USER_RATE", "a/60", "must be a whole number"),
        ("BRIDGE_USER_RATE", "20/min", "must be a number"),
    ],
)
def test_a_value_that_is_no_number_is_said_so_in_plain_words(
    name: str, raw: str, said: str
) -> None:
    """Python's own words ("invalid literal for int() with base 10: '8o80'", "could not
    convert string to float") reached the operator as the reason."""
    [line] = problems({**OPENAI, name: raw})
    assert line.startswith(f"{name}: invalid value {raw!r}: {said}")
    assert "literal" not in line and "convert" not in line and "int()" not in line


def test_an_unset_robot_secret_is_shown_as_the_chat_robot_secret_it_resolves_to() -> None:
    """BRIDGE_YACH_ROBOT_SECRET defaults to BRIDGE_YACH_SECRET (SPEC §2), and outbound robot
    sends are signed with it: `check` showed "(unset)", as if they went unsigned."""
    shown = dict(masked_settings(load_settings(OPENAI)))
    assert shown["BRIDGE_YACH_ROBOT_SECRET"] != "(unset)"
    assert "BRIDGE_YACH_SECRET" in shown["BRIDGE_YACH_ROBOT_SECRET"]
    assert "SEC-yach-secret-456" not in shown["BRIDGE_YACH_ROBOT_SECRET"]
    insecure = {"BRIDGE_UPSTREAM": "replay", "BRIDGE_REPLAY_FILE": ".", "BRIDGE_YACH_INSECURE": "1"}
    assert dict(masked_settings(load_settings(insecure, command="demo")))[
        "BRIDGE_YACH_ROBOT_SECRET"
    ] == "(unset)"


def test_an_unreadable_secret_file_is_one_problem_not_also_a_missing_secret(
    tmp_path: Path,
) -> None:
    """One line per problem (SPEC §1): the file that cannot be read, not also "required but
    not set" for a secret the operator did set, through that file."""
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY": "change-me",
           "BRIDGE_OPENAI_API_KEY_FILE": str(tmp_path / "missing")}  # fmt: skip
    [line] = problems(env)
    assert line.startswith("BRIDGE_OPENAI_API_KEY_FILE: cannot read"), line


def test_a_secret_given_in_a_file_and_pasted_elsewhere_is_hidden_without_being_registered(
    tmp_path: Path,
) -> None:
    """The secrets given are read once, before any value is parsed: a secret (here from its
    `_FILE`) pasted into another variable is hidden in that variable's problem line, also in
    its URL-encoded form, and `load_settings` leaves the process's masking as it was (tests
    and `check` call it many times; the commands register the secrets they run with)."""
    key = "sk-file-key-with/slash-9f3e"
    (tmp_path / "key").write_text(key + "\n")
    env = {"BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_API_KEY_FILE": str(tmp_path / "key"),
           "BRIDGE_OPENAI_MODEL": "m", "BRIDGE_YACH_SECRET": "s",
           "BRIDGE_OPENAI_TEMPERATURE": key, "BRIDGE_PORT": "sk-file-key-with%2Fslash-9f3e"}
    found = problems(env)
    assert [line.split(":")[0] for line in found] == ["BRIDGE_PORT", "BRIDGE_OPENAI_TEMPERATURE"]
    assert not any(key in line or "%2Fslash" in line for line in found), found
    assert mask_text(key) == key


def test_a_leading_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EnvironmentFile (or a quoted shell value) leaves `~` as it is: `~/state` was a
    folder named `~` in the working directory, and `~/key` a file that was not found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "key").write_text("sk-from-home-file\n")
    settings = load_settings({
        "BRIDGE_UPSTREAM": "openai", "BRIDGE_OPENAI_API_KEY_FILE": "~/key",
        "BRIDGE_OPENAI_MODEL": "m", "BRIDGE_YACH_SECRET": "s", "BRIDGE_STATE_DIR": "~/state",
    })  # fmt: skip
    assert settings.resolved_state_dir == tmp_path / "state"
    assert settings.openai_api_key == "sk-from-home-file"


@pytest.mark.parametrize(("name", "raw", "attr", "value"), [
    ("BRIDGE_PORT", "0", "port", 0),
    ("BRIDGE_PORT", "65535", "port", 65535),
    ("BRIDGE_SESSION_TTL_S", "0", "session_ttl_s", 0.0),
    ("BRIDGE_FLUSH_MAX_WAIT_S", "2.5", "flush_max_wait_s", 2.5),
    ("BRIDGE_HISTORY_TURNS", "0", "history_turns", 0),
    ("BRIDGE_WORKERS", "1", "workers", 1),
    ("BRIDGE_YACH_INSECURE", "1", "yach_insecure", True),
    ("BRIDGE_YACH_INSECURE", " Off ", "yach_insecure", False),
    ("BRIDGE_YACH_INSECURE", "false", "yach_insecure", False),
    *[("BRIDGE_YACH_INSECURE", raw, "yach_insecure", True) for raw in ("true", "yes", "on")],
    *[("BRIDGE_YACH_INSECURE", raw, "yach_insecure", False) for raw in ("0", "no")],
    ("BRIDGE_ALLOW_GROUPS", " cid1, ,cid2,", "allow_groups", frozenset({"cid1", "cid2"})),
    ("BRIDGE_DIFY_INPUTS", '{"k": "v"}', "dify_inputs", {"k": "v"}),
    ("BRIDGE_REDIS_URL", "redis://127.0.0.1:6379/0", "redis_url", "redis://127.0.0.1:6379/0"),
    ("BRIDGE_REDIS_URL", "unix:///run/redis.sock", "redis_url", "unix:///run/redis.sock"),
    ("BRIDGE_OPENAI_BASE_URL", "https://llm.example/v1/", "openai_base_url",
     "https://llm.example/v1"),
])
def test_a_valid_value_is_read_as_spec_says(name: str, raw: str, attr: str, value: object) -> None:
    assert getattr(load_settings({**OPENAI, name: raw}), attr) == value


@pytest.mark.parametrize(("name", "raw"), [
    ("BRIDGE_PORT", "65536"), ("BRIDGE_PORT", "-1"),
    ("BRIDGE_SESSION_TTL_S", "-0.5"), ("BRIDGE_HISTORY_TURNS", "-1"), ("BRIDGE_WORKERS", "0"),
    ("BRIDGE_YACH_INSECURE", "maybe"), ("BRIDGE_USER_RATE", "-1/60"),
    ("BRIDGE_USER_RATE", "5/0"), ("BRIDGE_USER_RATE", "5"),
    ("BRIDGE_REDIS_URL", "http://127.0.0.1:6379"), ("BRIDGE_REDIS_URL", "unix://"),
])
def test_an_invalid_value_is_a_problem_of_its_variable(name: str, raw: str) -> None:
    assert [line.split(":")[0] for line in problems({**OPENAI, name: raw})] == [name]


@pytest.mark.parametrize("upstream", [
    "openai", "hiagent", "coze", "dify", "aimaster", "yach-agent", "chatgpt-web", "replay",
])
def test_every_upstream_the_spec_names_is_accepted(upstream: str) -> None:
    assert load_settings({"BRIDGE_UPSTREAM": upstream}, command="demo").upstream == upstream


@pytest.mark.parametrize("pipeline", ["none", "native", "vision", "ocr", "autocut+ocr"])
def test_every_image_pipeline_the_spec_names_is_accepted(pipeline: str) -> None:
    env = {"BRIDGE_IMAGE_PIPELINE": pipeline}
    assert load_settings(env, command="demo").resolved_image_pipeline == pipeline


def test_an_ocr_pipeline_needs_its_model_and_the_autocut_its_url() -> None:
    ocr = {name.split(":")[0] for name in problems({**OPENAI, "BRIDGE_IMAGE_PIPELINE": "ocr"})}
    assert ocr == {"BRIDGE_OCR_BASE_URL", "BRIDGE_OCR_MODEL"}
    env = {**OPENAI, "BRIDGE_IMAGE_PIPELINE": "autocut+ocr"}
    assert {name.split(":")[0] for name in problems(env)} == {
        "BRIDGE_OCR_BASE_URL", "BRIDGE_OCR_MODEL", "BRIDGE_AUTOCUT_URL",
    }


def test_the_error_reads_one_problem_a_line_and_an_unlimited_rate_is_zero() -> None:
    assert str(ConfigError(["A: bad", "B: worse"])) == "A: bad\nB: worse"
    assert Rate(0, 0).unlimited and not Rate(1, 60).unlimited
    assert str(Rate(0, 0)) == "0" and str(Rate(20, 60)) == "20/60"
    assert given_value("openai_model", {"BRIDGE_OPENAI_MODEL": "  gpt  "}) == "gpt"
    assert given_value("openai_model", {"BRIDGE_OPENAI_MODEL": "change-me"}) is None


@pytest.mark.parametrize(("upstream", "required"), [
    ("openai", {"BRIDGE_OPENAI_API_KEY", "BRIDGE_OPENAI_MODEL"}),
    ("hiagent", {"BRIDGE_HIAGENT_BASE_URL", "BRIDGE_HIAGENT_APP_KEY"}),
    ("dify", {"BRIDGE_DIFY_BASE_URL", "BRIDGE_DIFY_API_KEY"}),
    ("aimaster", {"BRIDGE_AIMASTER_BASE_URL", "BRIDGE_AIMASTER_TOKEN",
                  "BRIDGE_AIMASTER_SCENARIO_ID"}),
    ("yach-agent", {"BRIDGE_YACH_APP_KEY", "BRIDGE_YACH_APP_SECRET"}),
    ("chatgpt-web", {"BRIDGE_CHATGPT_ACCESS_TOKEN"}),
    ("replay", {"BRIDGE_REPLAY_FILE"}),
])
def test_each_upstream_names_what_it_cannot_start_without(
    upstream: str, required: set[str]
) -> None:
    """`run` is the default command; each missing variable is one line with its own
    example, not another variable's."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_UPSTREAM": upstream, "BRIDGE_YACH_SECRET": "s"})
    lines = caught.value.problems
    assert {line.split(":")[0] for line in lines} == required
    for line in lines:
        name = line.split(":")[0]
        assert f"example: {name}=" in line
        assert f"example: {name}=0.0.0.0" not in line


def test_a_variable_set_beside_its_file_wins(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("sk-from-file\n")
    env = {**OPENAI, "BRIDGE_OPENAI_API_KEY_FILE": str(secret_file)}
    assert load_settings(env).openai_api_key == OPENAI["BRIDGE_OPENAI_API_KEY"]


def test_an_image_pipeline_without_an_upstream_is_only_the_upstream_missing() -> None:
    env = {"BRIDGE_IMAGE_PIPELINE": "vision", "BRIDGE_YACH_SECRET": "s"}
    assert [line.split(":")[0] for line in problems(env)] == ["BRIDGE_UPSTREAM"]


@pytest.mark.parametrize(("name", "values"), [
    ("BRIDGE_LOG_LEVEL", ["debug", "info", "warning", "error"]),
    ("BRIDGE_LOG_FORMAT", ["json", "console"]),
    ("BRIDGE_LANG", ["zh", "en"]),
    ("BRIDGE_SESSION_SCOPE", ["group", "user", "group_user"]),
    ("BRIDGE_REPLY_MODE", ["stream", "final"]),
    ("BRIDGE_SHOW_REASONING", ["off", "quote"]),
    ("BRIDGE_YACH_MSG_FORMAT", ["markdown", "text"]),
    ("BRIDGE_IM", ["yach"]),
])
def test_every_choice_the_spec_names_is_accepted(name: str, values: list[str]) -> None:
    attr = name.removeprefix("BRIDGE_").lower()
    for value in values:
        assert getattr(load_settings({**OPENAI, name: value.upper()}), attr) == value


def test_chat_needs_an_upstream_and_the_state_dir_defaults_under_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert [line.split(":")[0] for line in problems({}, command="chat")] == ["BRIDGE_UPSTREAM"]
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert load_settings(OPENAI).resolved_state_dir == Path.home() / ".local/state/chatbridge"
