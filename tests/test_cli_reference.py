"""docs/cli.md is the command's own help, and current."""

from __future__ import annotations

from custody.cli_reference import PAGE, render


def test_docs_cli_md_is_current() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), "run: .venv/bin/python -m custody.cli_reference"


def test_every_command_and_subcommand_is_in_it() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for command in (
        "serve",
        "verify",
        "events",
        "path",
        "recert write",
        "recert verify",
        "quarantine list",
        "quarantine reingest",
        "log key",
        "bundle write",
        "bundle verify",
        "witness",
        "token issue",
    ):
        assert f"## `custody {command}`" in page
