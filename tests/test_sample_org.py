"""The demo organisation: deterministic, posted through the real API, and its answer key is what forensics finds.

A reduced organisation (30 days, 60 tasks a weekday, about 10k events) is posted through the in-process ingest
API with the SDK; the findings, delegation paths and blast radius computed from its lake must match the answer
key, and the clean parts of the organisation must raise no finding of the planted kinds.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from query.blast import forward_taint, identity_blast_radius
from query.findings import findings
from query.lake import LakeReader
from query.paths import delegation_path
from sample_data.demo import post_generated
from sample_data.generate import generate
from tests.conftest import ADMIN_TOKEN, ORG_END, open_harness, read_lake

pytestmark = pytest.mark.slow  # the demo organisation, ~9k events posted through the API

END = ORG_END


def incident(org: dict[str, Any], name: str) -> dict[str, Any]:
    return next(i for i in org["key"]["incidents"] if i["name"] == name)


def test_the_same_seed_gives_the_same_events_and_another_seed_does_not() -> None:
    first = generate(11, end=END, days=3, tasks_per_day=40)
    again = generate(11, end=END, days=3, tasks_per_day=40)
    other = generate(12, end=END, days=3, tasks_per_day=40)
    assert first.events == again.events
    assert first.answer_key == again.answer_key
    assert first.events != other.events


def test_the_same_seed_signs_into_the_same_hashes(tmp_path: Path) -> None:
    hashes = []
    for run in ("a", "b"):
        generated = generate(11, end=END, days=3, tasks_per_day=40)
        with open_harness(tmp_path / run, max_events=1000) as harness:
            post_generated("http://testserver", ADMIN_TOKEN, generated, client=harness.client)
            harness.flush()
        rows = read_lake(tmp_path / run, "emitter, seq, event_id, event_hash, jws")
        hashes.append(sorted(row for row in rows if row[0] != "custody.server"))
    assert len(hashes[0]) > 500
    assert hashes[0] == hashes[1]


def test_the_full_size_organisation_has_the_shape_the_issue_asks_for() -> None:
    from sample_data.org import AGENTS, GATEWAYS, TOOLS, users_of

    generated = generate(7, end=END)
    assert 230_000 <= len(generated.events) <= 270_000
    assert len({u for t in ("acme", "globex", "initech") for u in users_of(t)}) == 60
    assert len(AGENTS) == 25
    assert len(GATEWAYS) == 8
    assert len(TOOLS) == 40
    assert len({tool.server for tool in TOOLS.values()}) == 6
    by_hour: dict[int, int] = defaultdict(int)
    types: dict[str, int] = defaultdict(int)
    for _, fields in generated.events:
        by_hour[int(fields["occurred_at"][11:13])] += 1
        types[fields["type"]] += 1
    assert by_hour[10] > 5 * by_hour[2]  # busy mornings, quiet nights
    assert set(types) == {
        "tool.invocation",
        "agent.delegation",
        "task.approval",
        "credential.issued",
        "credential.revoked",
    }
    denied = sum(1 for _, f in generated.events if f.get("decision", {}).get("result") == "deny")
    assert 0.005 < denied / types["tool.invocation"] < 0.03


PLANTED = [
    "borrowed_session",
    "shared_credential",
    "action_after_revocation",
    "cross_tenant",
    "unregistered_tool",
    "scope_escalation",
]


@pytest.mark.parametrize("name", PLANTED)
def test_each_planted_incident_is_found_with_its_evidence(org: dict[str, Any], name: str) -> None:
    expected = incident(org, name)
    found = [f for f in findings(LakeReader(org["data"])) if f.kind == expected["finding"]]
    assert [f.subject for f in found] == [expected["subject"]], "only the planted subject raises this kind"
    assert sorted(found[0].evidence) == expected["evidence"]


def test_the_over_broad_support_agent_is_the_only_over_privileged_agent(org: dict[str, Any]) -> None:
    expected = incident(org, "prompt_injection")
    found = [f for f in findings(LakeReader(org["data"])) if f.kind == "over_privileged"]
    assert [f.subject for f in found] == ["support-agent"]
    assert found[0].details["detail"] == expected["unused_scopes"]


def test_no_other_finding_kind_is_raised_by_the_clean_organisation(org: dict[str, Any]) -> None:
    kinds = {f.kind for f in findings(LakeReader(org["data"]))}
    planted = {i["finding"] for i in org["key"]["incidents"]}
    assert kinds == planted  # no denied bursts, no deep delegation anywhere


def test_the_path_of_a_planted_refund_leads_back_to_the_malicious_ticket(org: dict[str, Any]) -> None:
    expected = incident(org, "prompt_injection")
    path = delegation_path(LakeReader(org["data"]), expected["refund_events"][0])
    chain = [(node.kind, node.label) for node in path.chain()]
    assert chain[0] == ("user", "dana@acme.example")
    assert chain[1][0] == "approval"
    assert chain[1][1].endswith("by dana@acme.example")
    assert chain[2:4] == [("agent", "support-agent"), ("tool", "issue_refund (billing-mcp)")]
    assert chain[4] == ("resource", f"invoice {expected['refunded_invoices'][0]} (acme)")
    assert path.ancestors[-1]["event_id"] == expected["malicious_event"]
    assert path.ancestors[-1]["resource_id"] == "T-6613"


def test_the_blast_radius_from_t_covers_every_refund_and_export(org: dict[str, Any]) -> None:
    expected = incident(org, "prompt_injection")
    since = datetime.fromisoformat(expected["time"].removesuffix("Z")).replace(tzinfo=UTC)
    taint = forward_taint(LakeReader(org["data"]), "agent", "support-agent", since)
    ids = {event["event_id"] for event in taint.events}
    assert set(expected["refund_events"]) <= ids
    assert set(expected["export_events"]) <= ids
    assert expected["delegation_event"] in ids
    refunded = {r["resource"] for r in taint.summary["resource"] if r["resource"].startswith("acme/invoice/INV-70")}
    assert refunded == {f"acme/invoice/{invoice}" for invoice in expected["refunded_invoices"]}
    reach = identity_blast_radius(LakeReader(org["data"]), "agent", "support-agent")
    assert {"admin:all", "customers:export"} <= set(reach.scopes_unused)
    assert "export-subagent" in {d["agent"] for d in reach.delegates}
