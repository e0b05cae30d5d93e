"""A wrong data dir is one clear error everywhere: exit 2, never a created key, never an answer over nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from custody.cli import main
from tests.conftest import Harness

EVENT_ID = "00000000-0000-4000-8000-000000000000"
COMMANDS = [
    ["verify", "--no-progress"],
    ["verify", "--no-progress", "--hash-chain-only"],  # printed "OK: 0 events from 0 emitters", exit 0
    ["verify", "--no-progress", "--incremental"],
    ["events"],  # printed "0 of 0 events", exit 0
    ["findings"],  # printed "0 findings", exit 0
    ["path", EVENT_ID],
    ["blast-radius", "--agent", "x"],
    ["taint", "--agent", "x", "--since", "2026-01-01T00:00:00Z"],
    ["compact"],
    ["quarantine", "list"],
    ["quarantine", "reingest"],
    ["log", "key"],
    ["bundle", "write", "--event", "x", "--output", "b.json"],
    ["recert", "write", "--tenant", "acme", "--format", "json"],
    ["serve-query", "--tokens", "missing.json"],
    ["dashboard", "--tokens", "missing.json"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command[:2]))
def test_a_path_that_is_not_a_data_dir_is_exit_2(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"
    assert main([*command, "--data-dir", str(typo)]) == 2
    captured = capsys.readouterr()
    assert f"FAIL: not a Custody data dir: {typo} (no state/ or lake/)" in captured.err
    assert "OK" not in captured.out
    assert not typo.exists()


def test_recert_verify_never_creates_a_server_key(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    assert main(["recert", "write", "--data-dir", str(harness.data_dir), "--tenant", "acme", "--format", "json",
                 "--output", str(report)]) == 0  # fmt: skip
    # A dir that is not a data dir: exit 2 (was a raw FileNotFoundError traceback).
    assert main(["recert", "verify", str(report), "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "not a Custody data dir" in capsys.readouterr().err
    # A data dir without its key: refused, and no key is made up to check the report against (one used to be).
    keyless = tmp_path / "keyless"
    (keyless / "lake" / "events").mkdir(parents=True)
    assert main(["recert", "verify", str(report), "--data-dir", str(keyless)]) == 1
    assert "server_key.pem does not exist" in capsys.readouterr().err
    assert not (keyless / "state").exists()
    # The real data dir pins the key that signed it.
    assert main(["recert", "verify", str(report), "--data-dir", str(harness.data_dir)]) == 0


def test_verify_refuses_two_modes_at_once(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # ran one of them silently
        main(["verify", "--data-dir", str(harness.data_dir), "--incremental", "--hash-chain-only"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_data_dir_comes_from_the_environment_when_not_given(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(harness.data_dir))
    assert main(["events", "--json"]) == 0
    assert '"total": 0' in capsys.readouterr().out  # a real, empty data dir: an answer, not an error
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(harness.data_dir.parent / "typo"))
    assert main(["findings"]) == 2
    monkeypatch.delenv("CUSTODY_DATA_DIR")
    with pytest.raises(SystemExit) as exited:
        main(["findings"])
    assert exited.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_control_characters_from_the_log_reach_the_terminal_escaped(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent named with an ANSI sequence (clear screen) and a right-to-left override prints as escapes."""
    gateway = harness.emitter("gw-1", "acme")
    credential = {"id": "tok-1", "kind": "agent_token", "client_id": "a", "scopes": ["r"]}
    gateway.emit(
        type="credential.issued",
        credential=credential,
        delegation={"sub": "alice", "act": {"sub": "evil\x1b[2J\u202eagent"}},
    )
    gateway.flush()
    harness.flush()
    assert main(["events", "--data-dir", str(harness.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "[alice > evil\\x1b[2J\\u202eagent]" in out
