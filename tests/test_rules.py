"""The finding rules as data: a tenant tunes a threshold, a severity or turns a kind off in a file, and the answers
change for that tenant alone, on demand and in continuous detection alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from query.detect.engine import INCREMENTAL_KINDS, Detector
from query.findings import findings
from query.lake import LakeReader
from query.rules import load_rules, rules_table
from tests.conftest import REPO


def keyed(found: list[Any]) -> dict[tuple[str, str, str], tuple[str, frozenset[str]]]:
    return {(f.kind, f.tenant, f.subject): (f.severity, frozenset(f.evidence)) for f in found}


def test_a_tuned_threshold_changes_one_tenants_findings(org: dict[str, Any], tmp_path: Path) -> None:
    reader = LakeReader(org["data"])
    default = keyed(findings(reader))
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[defaults]\ndeep_delegation = { max_depth = 3 }\n"
        '[tenants.acme]\ndeep_delegation = { max_depth = 1, severity = "high" }\n'
        "borrowed_session = { enabled = false }\n"
    )
    tuned = keyed(findings(reader, settings=load_rules(rules)))
    acme_deep = {key: value for key, value in tuned.items() if key[:2] == ("deep_delegation", "acme")}
    before = {key: value for key, value in default.items() if key[:2] == ("deep_delegation", "acme")}
    assert len(acme_deep) > len(before)  # chains of 2 and 3 agents now count in acme
    assert {severity for severity, _ in acme_deep.values()} == {"high"}
    assert not any(key[:2] == ("borrowed_session", "acme") for key in tuned)
    assert any(key[:2] == ("borrowed_session", "acme") for key in default)  # it was there before
    others = {key: value for key, value in tuned.items() if key[1] != "acme"}
    assert others == {key: value for key, value in default.items() if key[1] != "acme"}  # other tenants unchanged

    # Continuous detection takes the same file and gives the same answers.
    with reader.connect() as connection:
        lake = connection.sql("SELECT * FROM all_events ORDER BY log_index").to_arrow_table()
    detector = Detector(LakeReader(org["data"], rows=lake), load_rules(rules))
    seen: dict[tuple[str, str, str], set[str]] = {}
    for start in range(0, lake.num_rows, 1000):
        for finding in detector.observe(lake.slice(start, 1000)):
            seen.setdefault((finding.kind, finding.tenant, finding.subject), set()).update(finding.evidence)
    expected = {key: set(evidence) for key, (_, evidence) in tuned.items() if key[0] in INCREMENTAL_KINDS}
    assert seen == expected


def test_the_rules_command_shows_and_checks_a_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[tenants.acme]\ndenied_burst = { count = 3, window_minutes = 2 }\n")
    out = subprocess.run(
        [sys.executable, "-m", "custody.cli", "rules", "--rules", str(rules), "--tenant", "acme", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    burst = next(rule for rule in json.loads(out.stdout) if rule["kind"] == "denied_burst")
    assert burst["parameters"] == {"count": 3, "window_minutes": 2}
    assert rules_table(load_rules(rules))[0]["enabled"]
    rules.write_text(
        "[defaults]\ndenied_burst = { count = 0, speed = 1 }\nno_such_kind = { enabled = false }\n"
        '[tenants.acme]\ndeep_delegation = { severity = "urgent" }\n[other]\n'
    )
    bad = subprocess.run(
        [sys.executable, "-m", "custody.cli", "rules", "--rules", str(rules)], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode != 0
    for problem in (
        "defaults.denied_burst.count: a whole number from 1 to 100000, not 0",
        "defaults.denied_burst.speed: unknown parameter",
        "defaults.no_such_kind: unknown kind",
        "tenants.acme.deep_delegation.severity: one of critical, high, medium, low, not 'urgent'",
        "other: unknown section",
    ):
        assert problem in bad.stderr, bad.stderr


@pytest.mark.parametrize("text", ['[tenants."Bad Tenant"]\n', "tenants = 3\n", "[defaults\n"])
def test_malformed_rules_files_are_refused(tmp_path: Path, text: str) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(text)
    with pytest.raises(ValueError, match=r"rules\.toml"):
        load_rules(rules)
