"""Tenants are walls: another tenant posting colliding ids changes nothing in a tenant's answers.

Tenant ``evil`` knows acme's ids (they leak in tickets and logs) and posts, each backdated before acme's events:
an approval under acme's approval id, a child of acme's refund, a revocation of acme's export credential, and a
use of acme's support credential id by a client of its own. acme's delegation paths, findings and taint are
compared before and after, both as acme's analysts see them and as an admin of every tenant does; the crossed
links are reported as ``cross_tenant_link`` findings of evil's tenant, and never followed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ingest.sdk import rfc3339
from query.blast import forward_taint
from query.findings import findings
from query.lake import LakeReader
from query.paths import delegation_path
from tests import scenario
from tests.conftest import Harness

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL


def acme_answers(reader: LakeReader, s: scenario.Scenario, tenant: str | None) -> dict[str, Any]:
    path = delegation_path(reader, s.id("refund"), tenant=tenant)
    return {
        "chain": [(node.kind, node.label) for node in path.chain()],
        "approval": path.approval and (path.approval["event_id"], path.approval["approval_approved_by"]),
        "ancestors": [event["event_id"] for event in path.ancestors],
        "descendants": [event["event_id"] for event in path.descendants],
        "findings": sorted(
            (f.kind, f.subject, tuple(f.evidence), f.first_seen, f.last_seen, str(f.details))
            for f in findings(reader, tenant=tenant)
            if f.tenant == "acme"
        ),
        "taint": [
            event["event_id"]
            for event in forward_taint(
                reader, "agent", "support-agent", scenario.BASE - timedelta(days=1), tenant=tenant
            ).events
        ],
    }


def post_colliding_ids(harness: Harness, s: scenario.Scenario) -> dict[str, str]:
    evil = harness.emitter("gw-evil", "evil")
    before = rfc3339(scenario.BASE - timedelta(hours=1))  # backdated before all of acme's events
    posted = {
        "approval": evil.emit(
            type="task.approval",
            occurred_at=before,
            approval={"id": "appr-1", "approved_by": "mallory@evil.example", "scopes": ["*"], "task": "anything"},
        ).event_id,
        "child": evil.emit(
            **scenario.invocation(
                scenario.Scenario(),
                "evil-child",
                13,
                ["mallory@evil.example", "evil-agent"],
                scenario.credential("tok-evil", "agent_token", "evil-agent", ["x"]),
                "steal",
                "evil-mcp",
                "x",
                ("record", "R-1", "evil"),
                approval="appr-1",
            )
            | {"parent_event_id": s.id("refund")}
        ).event_id,
        "revocation": evil.emit(
            type="credential.revoked",
            occurred_at=before,
            revoked_at=before,
            credential=scenario.credential("tok-export", "agent_token", "export-subagent", []),
        ).event_id,
        "shared": evil.emit(
            **scenario.invocation(
                scenario.Scenario(),
                "evil-shared",
                20,
                ["mallory@evil.example", "evil-agent"],
                scenario.credential("tok-support", "agent_token", "evil-agent", ["x"]),
                "read",
                "evil-mcp",
                "x",
                ("record", "R-2", "evil"),
            )
        ).event_id,
    }
    evil.flush()
    harness.flush()
    return posted


def test_colliding_ids_from_another_tenant_change_nothing_in_a_tenants_answers(harness: Harness) -> None:
    s = scenario.build(harness)
    reader = LakeReader(harness.data_dir)
    before = {tenant: acme_answers(reader, s, tenant) for tenant in ("acme", None)}
    assert before["acme"]["approval"][1] == "alice@acme.example"
    posted = post_colliding_ids(harness, s)
    after = {tenant: acme_answers(reader, s, tenant) for tenant in ("acme", None)}
    for tenant in before:
        for question in before[tenant]:
            assert after[tenant][question] == before[tenant][question], (tenant, question)

    # The admin sees the crossed links reported, and listed on the path, never followed.
    path = delegation_path(reader, s.id("refund"))
    assert {(link["link"], link["other_tenant"], link["other_event_id"]) for link in path.crossed_links} == {
        ("child", "evil", posted["child"])
    }
    links = {(f.tenant, f.subject): f for f in findings(reader, kinds=("cross_tenant_link",))}
    assert set(links) == {
        ("evil", "events of evil name parents in tenant acme"),
        ("evil", "evil revoked credentials only tenant acme holds"),
    }
    assert links[("evil", "events of evil name parents in tenant acme")].evidence == [posted["child"]]
    assert links[("evil", "evil revoked credentials only tenant acme holds")].evidence == [posted["revocation"]]
    assert all(f.severity == "high" for f in links.values())
    # An acme analyst's answers name no other tenant.
    assert [f for f in findings(reader, tenant="acme") if f.kind == "cross_tenant_link"] == []


def test_an_approval_only_another_tenant_holds_is_reported_and_not_followed(harness: Harness) -> None:
    gateway = harness.emitter("gw-acme", "acme")
    evil = harness.emitter("gw-evil", "evil")
    approval = evil.emit(
        type="task.approval",
        occurred_at=rfc3339(scenario.BASE),
        approval={"id": "appr-9", "approved_by": "mallory@evil.example", "scopes": ["*"], "task": "anything"},
    )
    evil.flush()
    credential = scenario.credential("tok-1", "agent_token", "agent-1", ["records:read"])
    fields = scenario.invocation(
        scenario.Scenario(),
        "use",
        5,
        ["bob@acme.example", "agent-1"],
        credential,
        "read",
        "records-mcp",
        "records:read",
        ("record", "R-1", "acme"),
        approval="appr-9",
    )
    used = gateway.emit(**fields)
    gateway.flush()
    harness.flush()
    reader = LakeReader(harness.data_dir)
    path = delegation_path(reader, used.event_id)
    assert path.approval is None
    assert path.crossed_links == [
        {"link": "approval", "event_id": used.event_id, "other_tenant": "evil", "other_event_id": approval.event_id}
    ]
    [finding] = findings(reader, kinds=("cross_tenant_link",))
    assert (finding.tenant, finding.subject, finding.evidence) == (
        "acme",
        "events of acme name approvals only tenant evil holds",
        [used.event_id],
    )
    [bound] = findings(reader, tenant="acme", kinds=("cross_tenant_link",))
    assert bound.subject == "events of acme name approvals only another tenant holds"
    assert bound.details == {"detail": None}  # no event id of the other tenant
