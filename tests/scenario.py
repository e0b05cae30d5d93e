"""A hand-built incident, posted through the real ingest API, whose forensic answers are known in advance.

acme: alice approves a ticket task; support-agent (tickets + refunds + admin:all) reads T-1, issues a refund on
INV-1, delegates to export-subagent (escalating to customers:export), which exports the customer list through a
different gateway, then delegates further down a chain deeper than 3 agents. Beside it: billing-agent borrows
bob's session; one service-account key is presented by billing-agent and intern-agent; intern-agent calls an
unmapped debug tool, bursts 6 denied calls and keeps using its token after it was revoked. globex: sales-agent
reads an acme resource. Clean counterparts exist for every finding (see the negative controls in the tests).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.sdk import Emitter, rfc3339
from tests.conftest import Harness

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)


def at(minutes: float) -> str:
    return rfc3339(BASE + timedelta(minutes=minutes))


SUPPORT_SCOPES = ["tickets:read", "tickets:write", "refunds:write", "admin:all"]


@dataclass
class Scenario:
    ids: dict[str, str] = field(default_factory=dict)

    def id(self, name: str) -> str:
        return self.ids.setdefault(name, str(uuid.uuid5(uuid.NAMESPACE_URL, f"custody-scenario/{name}")))


def invocation(
    scenario: Scenario,
    name: str,
    minute: float,
    chain: list[str],
    credential: dict[str, Any],
    tool: str,
    server: str,
    scope: str | None,
    resource: tuple[str, str, str],
    *,
    result: str = "allow",
    parent: str | None = None,
    approval: str | None = None,
    trace: str = "trace-incident",
) -> dict[str, Any]:
    delegation: dict[str, Any] = {"sub": chain[0]}
    act: dict[str, Any] | None = None
    for agent in chain[1:]:
        act = {"sub": agent} if act is None else {"sub": agent, "act": act}
    if act is not None:
        delegation["act"] = act
    fields: dict[str, Any] = {
        "event_id": scenario.id(name),
        "type": "tool.invocation",
        "occurred_at": at(minute),
        "delegation": delegation,
        "credential": credential,
        "tool": {"name": tool, "server": server},
        "resource": {"type": resource[0], "id": resource[1], "tenant": resource[2]},
        "decision": {
            "result": result,
            "required_scope": scope,
            "policy": "default-deny",
            "reason": None if result == "allow" else f"{scope} not granted",
        },
        "outcome": "success" if result == "allow" else None,
        "trace_id": trace,
    }
    if parent:
        fields["parent_event_id"] = scenario.id(parent)
    if approval:
        fields["approval_id"] = approval
    return fields


def credential(id_: str, kind: str, client: str, scopes: list[str]) -> dict[str, Any]:
    return {"id": id_, "kind": kind, "client_id": client, "scopes": scopes}


def build(harness: Harness) -> Scenario:
    s = Scenario()
    help_gw: Emitter = harness.emitter("gw-help", "acme")
    bill_gw: Emitter = harness.emitter("gw-bill", "acme")
    globex_gw: Emitter = harness.emitter("gw-globex", "globex")
    support = credential("tok-support", "agent_token", "support-agent", SUPPORT_SCOPES)
    export = credential("tok-export", "agent_token", "export-subagent", ["customers:export"])
    help_gw.emit(
        event_id=s.id("approval"),
        type="task.approval",
        occurred_at=at(0),
        approval={
            "id": "appr-1",
            "approved_by": "alice@acme.example",
            "scopes": ["tickets:read", "tickets:write", "refunds:write"],
            "task": "work the ticket queue",
        },
    )
    help_gw.emit(
        event_id=s.id("issue-support"),
        type="credential.issued",
        occurred_at=at(1),
        credential=support,
        delegation={"sub": "alice@acme.example", "act": {"sub": "support-agent"}},
    )
    help_gw.emit(
        **invocation(
            s,
            "read-ticket",
            10,
            ["alice@acme.example", "support-agent"],
            support,
            "read_ticket",
            "helpdesk-mcp",
            "tickets:read",
            ("ticket", "T-1", "acme"),
            approval="appr-1",
        )
    )
    help_gw.emit(
        **invocation(
            s,
            "refund",
            12,
            ["alice@acme.example", "support-agent"],
            support,
            "issue_refund",
            "billing-mcp",
            "refunds:write",
            ("invoice", "INV-1", "acme"),
            parent="read-ticket",
            approval="appr-1",
        )
    )
    help_gw.emit(
        event_id=s.id("delegate-export"),
        type="agent.delegation",
        occurred_at=at(13),
        delegation={"sub": "alice@acme.example", "act": {"sub": "support-agent"}},
        credential=support,
        delegate={"agent": "export-subagent", "credential_id": "tok-export", "scopes": ["customers:export"]},
        parent_event_id=s.id("refund"),
        trace_id="trace-incident",
    )
    bill_gw.emit(
        **invocation(
            s,
            "export",
            14,
            ["alice@acme.example", "support-agent", "export-subagent"],
            export,
            "export_customers",
            "crm-mcp",
            "customers:export",
            ("customer_list", "all", "acme"),
            parent="refund",
        )
    )
    help_gw.emit(
        event_id=s.id("delegate-ok"),
        type="agent.delegation",
        occurred_at=at(15),
        delegation={"sub": "alice@acme.example", "act": {"sub": "support-agent"}},
        credential=support,
        delegate={"agent": "billing-agent", "credential_id": "tok-billing", "scopes": ["refunds:write"]},
        trace_id="trace-other",
    )
    deep_chain = ["alice@acme.example", "support-agent", "export-subagent", "deep-1", "deep-2"]
    bill_gw.emit(
        **invocation(
            s,
            "deep",
            16,
            deep_chain,
            credential("tok-deep", "agent_token", "deep-2", ["customers:read"]),
            "read_customer",
            "crm-mcp",
            "customers:read",
            ("customer", "C-9", "acme"),
            parent="export",
        )
    )
    billing = credential("tok-billing", "agent_token", "billing-agent", ["invoices:read", "refunds:write"])
    bill_gw.emit(
        **invocation(
            s,
            "billing-clean",
            20,
            ["bob@acme.example", "billing-agent"],
            billing,
            "read_invoice",
            "billing-mcp",
            "invoices:read",
            ("invoice", "INV-2", "acme"),
            trace="trace-b",
        )
    )
    session = credential("sess-bob", "user_session", "billing-agent", ["invoices:read", "refunds:write"])
    bill_gw.emit(
        **invocation(
            s,
            "borrowed",
            21,
            ["bob@acme.example", "billing-agent"],
            session,
            "read_invoice",
            "billing-mcp",
            "invoices:read",
            ("invoice", "INV-3", "acme"),
            trace="trace-b",
        )
    )
    shared = credential("sa-shared", "service_account", "billing-agent", ["invoices:read"])
    bill_gw.emit(
        **invocation(
            s,
            "shared-1",
            22,
            ["svc-batch", "billing-agent"],
            shared,
            "read_invoice",
            "billing-mcp",
            "invoices:read",
            ("invoice", "INV-4", "acme"),
            trace="trace-s",
        )
    )
    shared_intern = credential("sa-shared", "service_account", "intern-agent", ["invoices:read"])
    bill_gw.emit(
        **invocation(
            s,
            "shared-2",
            23,
            ["svc-batch", "intern-agent"],
            shared_intern,
            "read_invoice",
            "billing-mcp",
            "invoices:read",
            ("invoice", "INV-5", "acme"),
            trace="trace-s",
        )
    )
    intern = credential("tok-intern", "agent_token", "intern-agent", ["tickets:read"])
    help_gw.emit(
        **invocation(
            s,
            "debug",
            30,
            ["carl@acme.example", "intern-agent"],
            intern,
            "debug_shell",
            "ops-mcp",
            None,
            ("host", "db-1", "acme"),
            trace="trace-i",
        )
    )
    for index in range(6):
        help_gw.emit(
            **invocation(
                s,
                f"denied-{index}",
                40 + index,
                ["carl@acme.example", "intern-agent"],
                intern,
                "update_ticket",
                "helpdesk-mcp",
                "tickets:write",
                ("ticket", f"T-{index}", "acme"),
                result="deny",
                trace="trace-i",
            )
        )
    help_gw.emit(
        **invocation(
            s,
            "denied-lone",
            70,
            ["bob@acme.example", "billing-agent"],
            billing,
            "update_ticket",
            "helpdesk-mcp",
            "tickets:write",
            ("ticket", "T-9", "acme"),
            result="deny",
            trace="trace-b",
        )
    )
    help_gw.emit(
        event_id=s.id("revoke-intern"),
        type="credential.revoked",
        occurred_at=at(50),
        credential=intern,
        revoked_at=at(50),
        reason="intern offboarded",
    )
    help_gw.emit(
        **invocation(
            s,
            "after-revoke",
            55,
            ["carl@acme.example", "intern-agent"],
            intern,
            "read_ticket",
            "helpdesk-mcp",
            "tickets:read",
            ("ticket", "T-7", "acme"),
            trace="trace-i",
        )
    )
    sales = credential("tok-sales", "agent_token", "sales-agent", ["customers:read"])
    globex_gw.emit(
        **invocation(
            s,
            "cross",
            60,
            ["dana@globex.example", "sales-agent"],
            sales,
            "read_customer",
            "crm-mcp",
            "customers:read",
            ("customer", "C-1", "acme"),
            trace="trace-g",
        )
    )
    globex_gw.emit(
        **invocation(
            s,
            "globex-clean",
            61,
            ["dana@globex.example", "sales-agent"],
            sales,
            "read_customer",
            "crm-mcp",
            "customers:read",
            ("customer", "C-2", "globex"),
            trace="trace-g",
        )
    )
    for gateway in (help_gw, bill_gw, globex_gw):
        gateway.flush()
    harness.flush()
    return s
