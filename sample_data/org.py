"""A small, seeded sample organisation and its tool invocations (the full demo organisation is a later issue).

``sample_events`` yields ``(emitter_id, fields)`` pairs ready for ``Emitter.emit``: users approve tasks, agents
call tools through gateways with delegated tokens, sub-agents are delegated to, some calls are denied.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ingest.sdk import rfc3339

__all__ = ["GATEWAYS", "TOOLS", "Gateway", "sample_events"]


@dataclass(frozen=True)
class Gateway:
    emitter: str
    tenant: str


GATEWAYS = (
    Gateway("gw-acme-helpdesk", "acme"),
    Gateway("gw-acme-billing", "acme"),
    Gateway("gw-globex-crm", "globex"),
)
TOOLS = {
    "read_ticket": ("helpdesk-mcp", "tickets:read", "ticket"),
    "update_ticket": ("helpdesk-mcp", "tickets:write", "ticket"),
    "issue_refund": ("billing-mcp", "refunds:write", "invoice"),
    "read_invoice": ("billing-mcp", "invoices:read", "invoice"),
    "export_customers": ("crm-mcp", "customers:export", "customer_list"),
    "read_customer": ("crm-mcp", "customers:read", "customer"),
}
AGENTS = {
    "acme": ["support-agent", "billing-agent", "triage-subagent"],
    "globex": ["sales-agent", "research-subagent"],
}


def sample_events(count: int, *, seed: int = 7, end: datetime) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    start = end - timedelta(hours=24)
    for index in range(count):
        gateway = GATEWAYS[index % len(GATEWAYS)]
        agents = AGENTS[gateway.tenant]
        user = f"user{rng.randrange(20):02d}@{gateway.tenant}.example"
        agent = rng.choice(agents)
        delegation: dict[str, Any] = {"sub": user, "act": {"sub": agent}}
        if agent.endswith("subagent"):
            delegation = {"sub": user, "act": {"sub": agent, "act": {"sub": agents[0]}}}
        tool = rng.choice(sorted(TOOLS))
        server, scope, resource_type = TOOLS[tool]
        granted = sorted(rng.sample(sorted({s for _, s, _ in TOOLS.values()}), 3))
        allowed = scope in granted
        occurred = start + timedelta(seconds=index * 86400 / max(count, 1))
        yield (
            gateway.emitter,
            {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "type": "tool.invocation",
                "occurred_at": rfc3339(occurred),
                "delegation": delegation,
                "credential": {
                    "id": f"tok-{agent}-{rng.randrange(5)}",
                    "kind": "agent_token",
                    "client_id": agent,
                    "scopes": granted,
                },
                "tool": {"name": tool, "server": server},
                "resource": {
                    "type": resource_type,
                    "id": f"{resource_type}-{rng.randrange(500)}",
                    "tenant": gateway.tenant,
                },
                "decision": {
                    "result": "allow" if allowed else "deny",
                    "required_scope": scope,
                    "policy": "default-deny",
                    "reason": None if allowed else f"{scope} not granted",
                },
                "outcome": "success" if allowed else None,
                "trace_id": f"trace-{index // 5}",
            },
        )
