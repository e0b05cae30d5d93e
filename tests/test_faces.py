"""One answer per question: the CLI's --json and the read API give the same JSON, because results serialize
themselves (``as_json``) and both faces print that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from custody.cli import main
from query.api import create_query_app
from query.tokens import TokenStore
from tests import scenario
from tests.conftest import Harness


@pytest.fixture
def faces(harness: Harness, tmp_path: Path) -> tuple[Any, ...]:
    s = scenario.build(harness)
    tokens = TokenStore(tmp_path / "tokens.json")
    admin = tokens.issue("root", "admin", None)
    with TestClient(create_query_app(harness.data_dir, tokens)) as client:
        yield client, {"Authorization": f"Bearer {admin}"}, s, harness.data_dir


def questions(s: scenario.Scenario) -> list[tuple[list[str], str, dict[str, str]]]:
    since = scenario.at(0)
    return [
        (["events", "--agent", "support-agent"], "/v1/events", {"agent": "support-agent"}),
        (["events", "--tenant", "acme", "--decision", "deny"], "/v1/events", {"tenant": "acme", "decision": "deny"}),
        (["path", s.id("export")], f"/v1/events/{s.id('export')}/path", {}),
        (["blast-radius", "--agent", "support-agent"], "/v1/blast-radius", {"agent": "support-agent"}),
        (["taint", "--credential", "tok-support", "--since", since], "/v1/taint", {"credential": "tok-support",
                                                                                    "since": since}),
        (["findings"], "/v1/findings", {}),
        (["findings", "--tenant", "globex"], "/v1/findings", {"tenant": "globex"}),
    ]  # fmt: skip


def test_every_question_gets_the_same_json_from_the_cli_and_the_api(
    faces: tuple[Any, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    client, admin, s, data_dir = faces
    for command, path, params in questions(s):
        assert main([*command, "--data-dir", str(data_dir), "--json"]) == 0, command
        from_cli = orjson.loads(capsys.readouterr().out)
        response = client.get(path, params=params, headers=admin)
        assert response.status_code == 200, (path, response.text)
        assert from_cli == response.json(), command
        assert from_cli  # a real answer, not an empty one
    path_json = orjson.loads(
        (main(["path", s.id("export"), "--data-dir", str(data_dir), "--json"]), capsys.readouterr().out)[1]
    )
    assert {"chain", "text", "nodes", "edges", "crossed_links"} <= set(path_json)  # the CLI lacked chain and text
