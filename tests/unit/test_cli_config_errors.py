"""`chatbridge run` refusing a configuration: its lines mask secrets as `check`'s do
(SPEC §1, §9)."""

from __future__ import annotations

import os

import pytest

from bridge import cli


@pytest.mark.parametrize("command", ["run", "chat"])
def test_a_secret_pasted_into_another_variable_is_not_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The key pasted into the wrong variable too: `check` showed that line with `***`, `run`
    (and `chat`) printed the key itself, to the terminal and the journal."""
    key = "sk-audit-pasted-key-5d1c"
    for name in [name for name in list(os.environ) if name.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BRIDGE_UPSTREAM", "openai")
    monkeypatch.setenv("BRIDGE_OPENAI_API_KEY", key)
    monkeypatch.setenv("BRIDGE_OPENAI_MODEL", "m")
    monkeypatch.setenv("BRIDGE_OPENAI_TEMPERATURE", key)  # the wrong variable
    monkeypatch.setenv("BRIDGE_YACH_INSECURE", "1")
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's handlers
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert "BRIDGE_OPENAI_TEMPERATURE" in err and "example:" in err, err
    assert key not in err, err
