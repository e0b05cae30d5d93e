"""docs/cli.md, written from the ``custody`` parser's own ``--help`` texts: ``python -m custody.cli_reference``.

``tests/test_cli_reference.py`` checks that the committed page is current, so the reference cannot drift from the
command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from custody.cli import DATA_DIR_ENV, _parser

__all__ = ["render"]

_WIDTH = "100"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    """The whole reference, as the help texts read with ``$CUSTODY_DATA_DIR`` unset and 100 columns."""
    environment = {key: value for key, value in os.environ.items() if key != DATA_DIR_ENV}
    with mock.patch.dict(os.environ, {**environment, "COLUMNS": _WIDTH}, clear=True):
        parser = _parser()
        sections = [
            "# The `custody` command\n",
            "Every command's `--help`, as the command prints it. Written by `python -m custody.cli_reference`;"
            " `./test` checks it is current.\n",
            _section("custody", parser),
        ]
        sections += [_section(name, command) for name, command in _commands(parser, "custody")]
    return "\n".join(sections)


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield f"{prefix} {name}", command
                yield from _commands(command, f"{prefix} {name}")


def _section(name: str, parser: argparse.ArgumentParser) -> str:
    return f"## `{name}`\n\n```\n{parser.format_help().rstrip()}\n```\n"


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}")
