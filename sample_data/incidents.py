"""The seven incidents planted in the demo organisation, and their machine-readable answer key.

Each entry of the answer key names the finding kind the forensics engine should raise, its subject, the time, and
the evidence: event ids worked out here in Python from the generated events, independently of the engine's SQL.

1. prompt_injection: support-agent (tickets + refunds + customers:export + admin:all) reads a malicious ticket at
   T, then issues refunds on 24 invoices and delegates to export-subagent, which exports customer lists.
2. borrowed_session: billing-agent calls billing tools with erin's browser session.
3. shared_credential: one globex service-account key presented by report-agent, research-agent and lead-agent.
4. action_after_revocation: hr-assistant's token is revoked (stolen laptop) and keeps being used.
5. cross_tenant: globex's research-agent reads acme documents.
6. unregistered_tool: initech's gateway allows devops-agent's ``debug_exec``, a tool no permission maps.
7. scope_escalation: sales-agent hands summarizer-subagent ``crm:export``, a scope it does not hold.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ingest.sdk import rfc3339
from sample_data.activity import Workload, _delegate, delegation
from sample_data.org import AGENTS, TOOLS

__all__ = ["plant"]

SHARED_KEY = "sa-globex-reports"


def plant(work: Workload, start: datetime, end: datetime) -> dict[str, Any]:
    def day_at(days_before_end: int, hour: int, minute: int = 0) -> datetime:
        moment = (end - timedelta(days=days_before_end)).replace(hour=hour, minute=minute, second=0)
        return moment if moment < end - timedelta(minutes=20) else end - timedelta(hours=5)

    incidents = [
        _prompt_injection(work, end - timedelta(hours=5)),
        _borrowed_session(work, day_at(3, 15, 30)),
        _shared_key(work, start, end),
        _after_revocation(work, day_at(4, 13, 40)),
        _cross_tenant(work, day_at(2, 11, 5)),
        _unregistered_tool(work, day_at(5, 16, 20)),
        _escalation(work, day_at(6, 9, 45)),
    ]
    revoked = next(i for i in incidents if i["name"] == "action_after_revocation")
    revoked_at = revoked["time"]
    revoked["evidence"] = sorted(
        fields["event_id"]
        for at, _, _, fields in work.rows
        if fields.get("credential", {}).get("id") == revoked["subject"]
        and fields["type"] not in ("credential.revoked", "credential.issued")
        and at > revoked_at
    )
    shared = next(i for i in incidents if i["name"] == "shared_credential")
    shared["evidence"] = sorted(
        fields["event_id"]
        for _, _, _, fields in work.rows
        if fields.get("credential", {}).get("id") == SHARED_KEY and fields["type"] == "tool.invocation"
    )
    return {"start": rfc3339(start), "end": rfc3339(end), "incidents": incidents}


def _prompt_injection(work: Workload, at: datetime) -> dict[str, Any]:
    agent = AGENTS["support-agent"]
    user = "dana@acme.example"
    trace, approval_id = "trace-incident-refunds", "appr-incident-1"
    approval = work.add(
        "idp-acme",
        at - timedelta(minutes=3),
        type="task.approval",
        approval={
            "id": approval_id,
            "approved_by": user,
            "scopes": list(agent.scopes),
            "task": "work the ticket queue",
        },
        approval_id=approval_id,
        trace_id=trace,
    )
    chain = [user, agent.name]
    token = work.token(agent, at)
    malicious = work.call(
        agent, chain, token, TOOLS["read_ticket"], at, resource=("ticket", "T-6613"), parent=approval, trace=trace,
        approval=approval_id,
    )  # fmt: skip
    refunds, invoices = [], []
    for index in range(24):
        invoice = f"INV-{70100 + index * 7}"
        invoices.append(invoice)
        refunds.append(
            work.call(
                agent,
                chain,
                token,
                TOOLS["issue_refund"],
                at + timedelta(seconds=40 + 15 * index),
                resource=("invoice", invoice),
                allowed=True,
                parent=malicious,
                trace=trace,
                approval=approval_id,
            )
        )
    handed, _ = _delegate(
        work, agent, AGENTS["export-subagent"], ("customers:export",), user, at + timedelta(minutes=8), malicious,
        trace, approval_id, calls=0,
    )  # fmt: skip
    credential = {
        "id": f"tok-export-subagent-{work.new_id()[:8]}",
        "kind": "agent_token",
        "client_id": "export-subagent",
        "scopes": ["customers:export"],
        "expires_at": rfc3339(at + timedelta(hours=1)),
    }
    exports = [
        work.call(
            AGENTS["export-subagent"],
            [user, agent.name, "export-subagent"],
            credential,
            TOOLS["export_customers"],
            at + timedelta(minutes=9, seconds=20 * index),
            resource=("customer_list", segment),
            parent=handed,
            trace=trace,
            approval=approval_id,
        )
        for index, segment in enumerate(("all-customers", "enterprise", "smb"))
    ]
    return {
        "name": "prompt_injection",
        "finding": "over_privileged",
        "subject": agent.name,
        "time": rfc3339(at),
        "malicious_event": malicious,
        "refund_events": refunds,
        "refunded_invoices": invoices,
        "delegation_event": handed,
        "delegate": "export-subagent",
        "export_events": exports,
        "unused_scopes": ["admin:all", "customers:export"],
        "evidence": sorted([malicious, *refunds, handed, *exports]),
    }


def _borrowed_session(work: Workload, at: datetime) -> dict[str, Any]:
    agent = AGENTS["billing-agent"]
    session = {"id": "sess-erin-4f2a", "kind": "user_session", "client_id": "billing-portal",
               "scopes": ["invoices:read", "refunds:write"]}  # fmt: skip
    ids = [
        work.call(agent, ["erin@acme.example", agent.name], session, TOOLS[tool], at + timedelta(minutes=2 * index))
        for index, tool in enumerate(["list_invoices", "read_invoice", "read_invoice", "apply_credit", "read_invoice"])
    ]
    return {"name": "borrowed_session", "finding": "borrowed_session", "subject": f"{agent.name} with {session['id']}",
            "agent": agent.name, "credential": session["id"], "time": rfc3339(at), "evidence": sorted(ids)}  # fmt: skip


def _shared_key(work: Workload, start: datetime, end: datetime) -> dict[str, Any]:
    agents = ["report-agent", "research-agent", "lead-agent"]
    key = {"id": SHARED_KEY, "kind": "service_account", "client_id": "svc-globex-reports", "scopes": ["docs:read"]}
    for index, day in enumerate(range(1, 28, 3)):
        at = (end - timedelta(days=day)).replace(hour=8, minute=15, second=0)
        if at <= start:
            continue
        name = agents[index % 3]
        work.call(AGENTS[name], ["svc-globex-reports", name], key, TOOLS["read_doc"], at)
    return {"name": "shared_credential", "finding": "shared_credential", "subject": SHARED_KEY, "agents": agents,
            "time": None}  # fmt: skip


def _after_revocation(work: Workload, at: datetime) -> dict[str, Any]:
    agent = AGENTS["hr-assistant"]
    token = work.token(agent, at)
    work.add("idp-initech", at, type="credential.revoked", credential=token, revoked_at=rfc3339(at),
             reason="laptop reported stolen")  # fmt: skip
    for index in range(8):
        tool = TOOLS["read_employee"] if index % 2 else TOOLS["search_employees"]
        work.call(agent, ["peggy@initech.example", agent.name], token, tool, at + timedelta(minutes=5 + 11 * index))
    return {"name": "action_after_revocation", "finding": "action_after_revocation", "subject": token["id"],
            "agent": agent.name, "time": rfc3339(at)}  # fmt: skip


def _cross_tenant(work: Workload, at: datetime) -> dict[str, Any]:
    agent = AGENTS["research-agent"]
    token = work.token(agent, at)
    ids = [
        work.call(
            agent,
            ["leo@globex.example", agent.name],
            token,
            TOOLS["read_doc"],
            at + timedelta(minutes=index),
            resource=("doc", f"D-ACME-{index}"),
            resource_tenant="acme",
        )
        for index in range(3)
    ]
    return {"name": "cross_tenant", "finding": "cross_tenant", "subject": f"{agent.name} (globex -> acme)",
            "agent": agent.name, "resource_tenant": "acme",
            "time": rfc3339(at), "evidence": sorted(ids)}  # fmt: skip


def _unregistered_tool(work: Workload, at: datetime) -> dict[str, Any]:
    agent = AGENTS["devops-agent"]
    token = work.token(agent, at)
    ids = [
        work.call(
            agent,
            ["trent@initech.example", agent.name],
            token,
            TOOLS["debug_exec"],
            at + timedelta(minutes=index),
            resource=("host", "build-03"),
            allowed=True,
            required_scope=None,
        )
        for index in range(4)
    ]
    return {"name": "unregistered_tool", "finding": "unregistered_tool", "subject": "code-mcp/debug_exec",
            "agent": agent.name, "time": rfc3339(at), "evidence": sorted(ids)}  # fmt: skip


def _escalation(work: Workload, at: datetime) -> dict[str, Any]:
    agent, sub = AGENTS["sales-agent"], AGENTS["summarizer-subagent"]
    user, trace = "kim@globex.example", "trace-incident-escalation"
    handed, _calls = _delegate(work, agent, sub, ("crm:read", "crm:export"), user, at, handed_parent(work, at), trace,
                              "appr-incident-7", calls=0)  # fmt: skip
    credential = {"id": f"tok-summarizer-subagent-{work.new_id()[:8]}", "kind": "agent_token",
                  "client_id": sub.name, "scopes": ["crm:read", "crm:export"]}  # fmt: skip
    exports = [
        work.call(
            sub,
            [user, agent.name, sub.name],
            credential,
            TOOLS["export_pipeline"],
            at + timedelta(minutes=1 + i),
            parent=handed,
            trace=trace,
        )
        for i in range(2)
    ]
    return {"name": "scope_escalation", "finding": "scope_escalation", "subject": f"{agent.name} -> {sub.name}",
            "escalated_scopes": ["crm:export"], "time": rfc3339(at), "evidence": [handed],
            "export_events": exports}  # fmt: skip


def handed_parent(work: Workload, at: datetime) -> str:
    """The approval the escalating delegation hangs from."""
    return work.add(
        "idp-globex",
        at - timedelta(minutes=1),
        type="task.approval",
        approval={
            "id": "appr-incident-7",
            "approved_by": "kim@globex.example",
            "scopes": ["crm:read", "docs:read"],
            "task": "summarise the pipeline",
        },
        approval_id="appr-incident-7",
        trace_id="trace-incident-escalation",
        delegation=delegation(["kim@globex.example"]),
    )
