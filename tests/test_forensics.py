"""Forensics on a hand-built incident (tests/scenario.py) posted through the ingest API: exact answers."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import orjson
import pytest

from query.blast import forward_taint, identity_blast_radius
from query.findings import KINDS, findings
from query.lake import LakeReader
from query.paths import delegation_path
from query.search import EventFilter, search
from store.ground.errors import InvalidInput, NotFound
from tests import scenario
from tests.conftest import Harness


@pytest.fixture
def incident(harness: Harness) -> tuple[LakeReader, scenario.Scenario]:
    return LakeReader(harness.data_dir), scenario.build(harness)


def names(s: scenario.Scenario, ids: list[str]) -> list[str]:
    reverse = {value: key for key, value in s.ids.items()}
    return [reverse.get(event_id, event_id) for event_id in ids]


def test_path_of_a_sub_agents_call_across_gateways(incident) -> None:
    reader, s = incident
    path = delegation_path(reader, s.id("export"))
    assert [(node.kind, node.label) for node in path.chain()] == [
        ("user", "alice@acme.example"),
        ("agent", "support-agent"),
        ("agent", "export-subagent"),
        ("tool", "export_customers (crm-mcp)"),
        ("resource", "customer_list all (acme)"),
    ]
    assert path.event["emitter"] == "gw-bill"
    assert names(s, [e["event_id"] for e in path.ancestors]) == ["read-ticket", "refund"]
    assert {e["emitter"] for e in path.ancestors} == {"gw-help"}
    assert names(s, [e["event_id"] for e in path.descendants]) == ["deep"]
    caused = {(edge.source, edge.target) for edge in path.edges if edge.kind == "caused"}
    assert (f"event:{s.id('refund')}", f"event:{s.id('export')}") in caused
    assert (f"event:{s.id('export')}", f"event:{s.id('deep')}") in caused
    delegated = {(edge.source, edge.target, edge.event_id) for edge in path.edges if edge.kind == "delegated"}
    assert ("agent:support-agent", "agent:export-subagent", s.id("export")) in delegated


def test_path_text_and_approval(incident) -> None:
    reader, s = incident
    path = delegation_path(reader, s.id("refund"))
    assert path.text().splitlines()[0] == (
        "user alice@acme.example -> approval appr-1 by alice@acme.example -> agent support-agent"
        " -> tool issue_refund (billing-mcp) -> resource invoice INV-1 (acme)"
    )
    assert names(s, [e["event_id"] for e in path.descendants]) == ["delegate-export", "export", "deep"]
    assert names(s, [e["event_id"] for e in path.ancestors]) == ["read-ticket"]


def test_path_respects_the_tenant_and_unknown_events(incident) -> None:
    reader, s = incident
    with pytest.raises(NotFound, match="in tenant globex"):
        delegation_path(reader, s.id("export"), tenant="globex")
    with pytest.raises(NotFound):
        delegation_path(reader, "00000000-0000-4000-8000-000000000000")


def test_identity_blast_radius_of_the_over_broad_support_agent(incident) -> None:
    reader, _ = incident
    reach = identity_blast_radius(reader, "agent", "support-agent")
    assert reach.scopes_granted == ["admin:all", "refunds:write", "tickets:read", "tickets:write"]
    assert reach.scopes_used == {"refunds:write": 1, "tickets:read": 1}
    assert reach.scopes_unused == ["admin:all", "tickets:write"]
    assert reach.tools_reachable == [
        "billing-mcp/issue_refund",
        "helpdesk-mcp/read_ticket",
        "helpdesk-mcp/update_ticket",
    ]
    assert reach.tools_used == {"billing-mcp/issue_refund": 1, "helpdesk-mcp/read_ticket": 1}
    assert [(r["type"], r["id"]) for r in reach.resources] == [("invoice", "INV-1"), ("ticket", "T-1")]
    assert reach.tenants == ["acme"]
    assert reach.users == ["alice@acme.example"]
    assert [d["agent"] for d in reach.delegates] == ["billing-agent", "export-subagent"]
    with reader.connect() as connection:  # every event it acted in, of every type
        assert (
            reach.events
            == connection.execute("SELECT count(*) FROM events WHERE agent = 'support-agent'").fetchall()[0][0]
            > 2
        )
    export = reach.delegates[1]
    assert export["tools_reachable"] == ["crm-mcp/export_customers"]
    # A delegate's reach is as whole as its delegator's: resources, tenants, users and scopes, transitively.
    alone = identity_blast_radius(reader, "agent", "export-subagent")
    assert export == {"agent": "export-subagent", **alone.as_json()}
    assert [(r["type"], r["id"]) for r in export["resources"]] == [("customer_list", "all")]
    assert (export["tenants"], export["users"]) == (["acme"], ["alice@acme.example"])
    assert "customers:export" in export["scopes_granted"]
    assert reach.headline == "agent support-agent: could reach 3 tools, used 2; 2 of 4 granted scopes never used"


def test_identity_blast_radius_of_a_shared_credential(incident) -> None:
    reader, _ = incident
    reach = identity_blast_radius(reader, "credential", "sa-shared")
    assert reach.scopes_granted == ["invoices:read"]
    assert reach.scopes_used == {"invoices:read": 2}
    assert reach.tools_used == {"billing-mcp/read_invoice": 2}
    assert [r["id"] for r in reach.resources] == ["INV-4", "INV-5"]
    assert reach.users == ["svc-batch"]
    with pytest.raises(InvalidInput):
        identity_blast_radius(reader, "tool", "x")  # type: ignore[arg-type]


def test_forward_taint_of_the_compromised_support_token(incident) -> None:
    reader, s = incident
    taint = forward_taint(reader, "credential", "tok-support", scenario.BASE + timedelta(minutes=11))
    assert sorted(names(s, [e["event_id"] for e in taint.events])) == sorted(
        [
            "refund",
            "delegate-export",
            "export",
            "delegate-ok",
            "deep",  # its own, and descendants
            "billing-clean",
            "borrowed",
            "shared-1",
            "denied-lone",  # billing-agent, delegated to at minute 15
        ]
    )
    tools = {row["tool"]: row["events"] for row in taint.summary["tool"]}
    assert tools == {
        "billing-mcp/read_invoice": 3,
        "billing-mcp/issue_refund": 1,
        "crm-mcp/export_customers": 1,
        "crm-mcp/read_customer": 1,
        "helpdesk-mcp/update_ticket": 1,
    }
    assert {row["decision"]: row["events"] for row in taint.summary["decision"]} == {"allow": 6, "deny": 1}
    exported = list(csv.DictReader(io.StringIO(taint.as_csv())))
    assert len(exported) == 9
    assert exported[0]["event_id"] == s.id("refund")
    assert orjson.loads(taint.as_json())["subject"] == "tok-support"
    later = forward_taint(reader, "credential", "tok-support", scenario.BASE + timedelta(minutes=100))
    assert later.events == []


def test_forward_taint_of_an_agent_and_a_trace(incident) -> None:
    reader, s = incident
    agent = forward_taint(reader, "agent", "export-subagent", scenario.BASE)
    assert sorted(names(s, [e["event_id"] for e in agent.events])) == ["deep", "export"]
    trace = forward_taint(reader, "trace", "trace-g", scenario.BASE)
    assert sorted(names(s, [e["event_id"] for e in trace.events])) == ["cross", "globex-clean"]


EXPECTED = {
    "borrowed_session": {"billing-agent with sess-bob": ["borrowed"]},
    "shared_credential": {"sa-shared": ["shared-1", "shared-2"]},
    "unregistered_tool": {"ops-mcp/debug_shell": ["debug"]},
    "action_after_revocation": {"tok-intern": ["after-revoke"]},
    "cross_tenant": {"sales-agent (globex -> acme)": ["cross"]},
    "scope_escalation": {"support-agent -> export-subagent": ["delegate-export"]},
    "deep_delegation": {"alice@acme.example": ["deep"]},
    "over_privileged": {"billing-agent": None, "support-agent": None},
    "denied_burst": {"intern-agent": [f"denied-{i}" for i in range(6)]},
    "cross_tenant_link": {},  # the scenario posts no link across tenants
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_finding_fires_exactly_on_its_planted_incident(incident, kind: str) -> None:
    """The negative controls are the scenario's clean twins: billing-clean, globex-clean, delegate-ok, ..."""
    reader, s = incident
    found = {f.subject: f for f in findings(reader, kinds=(kind,))}
    assert set(found) == set(EXPECTED[kind])
    for subject, evidence in EXPECTED[kind].items():
        finding = found[subject]
        assert finding.owasp
        assert finding.owasp[0] == "ASI03"
        assert finding.severity in ("critical", "high", "medium")
        if evidence is not None:
            assert names(s, finding.evidence) == evidence
            assert finding.evidence_total == len(evidence)


def test_finding_details(incident) -> None:
    reader, _ = incident
    by_kind = {(f.kind, f.subject): f for f in findings(reader)}
    assert by_kind[("scope_escalation", "support-agent -> export-subagent")].details == {"detail": ["customers:export"]}
    assert by_kind[("over_privileged", "support-agent")].details == {"detail": ["admin:all", "tickets:write"]}
    assert by_kind[("over_privileged", "billing-agent")].details == {"detail": ["refunds:write"]}
    assert by_kind[("action_after_revocation", "tok-intern")].severity == "critical"


def test_findings_of_a_tenant_stay_in_it(incident) -> None:
    reader, _ = incident
    globex = findings(reader, tenant="globex")
    assert [(f.kind, f.subject) for f in globex] == [("cross_tenant", "sales-agent (globex -> acme)")]


def test_search_filters_count_and_pages(incident) -> None:
    reader, s = incident
    page = search(reader, EventFilter(agent="export-subagent"))  # at any position of the chain
    assert page.total == 2
    assert names(s, [e["event_id"] for e in page.events]) == ["deep", "export"]  # newest first
    assert search(reader, EventFilter(tenant="globex", decision="allow")).total == 2
    denied = search(reader, EventFilter(agent="intern-agent", decision="deny", tool="update_ticket"))
    assert denied.total == 6
    seen: list[str] = []
    cursor = None
    while True:
        page = search(reader, EventFilter(tenant="acme"), limit=4, cursor=cursor)
        seen += [e["event_id"] for e in page.events]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == page.total == 22
    with pytest.raises(InvalidInput, match="cursor"):
        search(reader, EventFilter(), cursor="not-a-cursor")
    with pytest.raises(InvalidInput, match="limit"):
        search(reader, EventFilter(), limit=0)


@pytest.mark.slow
def test_the_cli_faces(incident, tmp_path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    reader, s = incident

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "custody.cli", *args, "--data-dir", str(reader.data_dir)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "user alice@acme.example -> agent support-agent -> agent export-subagent" in run("path", s.id("export"))
    assert run("blast-radius", "--agent", "support-agent").startswith(
        "agent support-agent: could reach 3 tools, used 2; 2 of 4 granted scopes never used"
    )
    evidence = tmp_path / "taint.csv"
    since = scenario.at(11)
    assert "9 events" in run("taint", "--credential", "tok-support", "--since", since, "--csv", str(evidence))
    assert len(evidence.read_text().splitlines()) == 10
    assert "CRITICAL action_after_revocation" in run("findings")
    assert orjson.loads(run("events", "--tenant", "globex", "--json"))["total"] == 2


def test_readers_spill_to_a_private_temp_dir_not_the_working_directory(tmp_path) -> None:
    from query.lake import SPILL_DIR, LakeReader

    with LakeReader(tmp_path).connect() as connection:
        assert connection.execute("SELECT current_setting('temp_directory')").fetchone() == (str(SPILL_DIR),)
        assert connection.execute("SELECT current_setting('memory_limit')").fetchone()[0].startswith("953")  # 1 GB
    assert SPILL_DIR.stat().st_mode & 0o777 == 0o700
