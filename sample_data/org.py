"""The demo organisation: three tenants, their people, agents, MCP servers and tools, gateways and identity providers.

Everything here is fixed data; ``sample_data.activity`` turns it into 30 days of events. Orchestrators delegate to
sub-agents through token exchange, always with a subset of their own scopes (the one planted escalation aside).
Every clean agent's scopes are exactly those its tools need, so a clean agent uses everything it was granted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "AGENTS",
    "GATEWAYS",
    "IDPS",
    "TENANTS",
    "TOOLS",
    "Agent",
    "Gateway",
    "Tool",
    "gateway_for",
    "users_of",
]

TENANTS = ("acme", "globex", "initech")
_FIRST_NAMES = [
    "alice",
    "bob",
    "carol",
    "dana",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "kim",
    "leo",
    "mallory",
    "nina",
    "oscar",
    "peggy",
    "quinn",
    "rupert",
    "sybil",
    "trent",
]


def users_of(tenant: str) -> list[str]:
    """The 20 people of a tenant (60 in all)."""
    return [f"{name}@{tenant}.example" for name in _FIRST_NAMES]


@dataclass(frozen=True)
class Tool:
    name: str
    server: str
    scope: str | None  # None: no permission maps it (the gateway should deny it, and one does not)
    resource_type: str


TOOLS = {
    tool.name: tool
    for tool in [
        Tool("read_ticket", "helpdesk-mcp", "tickets:read", "ticket"),
        Tool("search_tickets", "helpdesk-mcp", "tickets:read", "ticket_queue"),
        Tool("update_ticket", "helpdesk-mcp", "tickets:write", "ticket"),
        Tool("close_ticket", "helpdesk-mcp", "tickets:write", "ticket"),
        Tool("add_comment", "helpdesk-mcp", "tickets:write", "ticket"),
        Tool("escalate_ticket", "helpdesk-mcp", "tickets:write", "ticket"),
        Tool("admin_delete_user", "helpdesk-mcp", "admin:all", "account"),
        Tool("admin_reset_mfa", "helpdesk-mcp", "admin:all", "account"),
        Tool("read_invoice", "billing-mcp", "invoices:read", "invoice"),
        Tool("list_invoices", "billing-mcp", "invoices:read", "invoice_list"),
        Tool("issue_refund", "billing-mcp", "refunds:write", "invoice"),
        Tool("apply_credit", "billing-mcp", "refunds:write", "invoice"),
        Tool("export_invoices", "billing-mcp", "invoices:export", "invoice_list"),
        Tool("read_customer", "crm-mcp", "customers:read", "customer"),
        Tool("search_customers", "crm-mcp", "customers:read", "customer_list"),
        Tool("update_customer", "crm-mcp", "customers:write", "customer"),
        Tool("log_call", "crm-mcp", "customers:write", "customer"),
        Tool("export_customers", "crm-mcp", "customers:export", "customer_list"),
        Tool("read_opportunity", "crm-mcp", "crm:read", "opportunity"),
        Tool("update_opportunity", "crm-mcp", "crm:write", "opportunity"),
        Tool("export_pipeline", "crm-mcp", "crm:export", "pipeline"),
        Tool("search_docs", "docs-mcp", "docs:read", "doc_index"),
        Tool("read_doc", "docs-mcp", "docs:read", "doc"),
        Tool("summarize_doc", "docs-mcp", "docs:read", "doc"),
        Tool("write_doc", "docs-mcp", "docs:write", "doc"),
        Tool("share_doc", "docs-mcp", "docs:share", "doc"),
        Tool("read_repo", "code-mcp", "code:read", "repo"),
        Tool("search_code", "code-mcp", "code:read", "repo"),
        Tool("open_pull_request", "code-mcp", "code:write", "pull_request"),
        Tool("comment_review", "code-mcp", "code:write", "pull_request"),
        Tool("run_ci", "code-mcp", "ci:run", "pipeline_run"),
        Tool("read_ci_logs", "code-mcp", "ci:read", "pipeline_run"),
        Tool("debug_exec", "code-mcp", None, "host"),
        Tool("read_employee", "hr-mcp", "hr:read", "employee"),
        Tool("search_employees", "hr-mcp", "hr:read", "employee_list"),
        Tool("list_openings", "hr-mcp", "hr:read", "opening"),
        Tool("update_employee", "hr-mcp", "hr:write", "employee"),
        Tool("submit_timeoff", "hr-mcp", "hr:write", "employee"),
        Tool("read_payroll", "hr-mcp", "payroll:read", "payroll"),
        Tool("read_candidate", "hr-mcp", "hr:read", "candidate"),
    ]
}


@dataclass(frozen=True)
class Agent:
    name: str
    tenant: str
    owner: str
    scopes: tuple[str, ...]
    weight: float = 1.0  # share of its tenant's tasks
    delegates: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (sub-agent, scopes handed down), by token exchange
    sub_agent: bool = False  # works only when delegated to
    service_account: str | None = None  # a key it presents instead of its own token on some calls
    extra_scopes: tuple[str, ...] = field(default=())  # granted but not needed by its work (over-privilege)

    @property
    def granted(self) -> tuple[str, ...]:
        return self.scopes + self.extra_scopes


AGENTS = {
    agent.name: agent
    for agent in [
        # acme: customer support and billing
        Agent(
            "support-agent",
            "acme",
            "dana@acme.example",
            ("tickets:read", "tickets:write", "refunds:write"),
            weight=3,
            delegates=(("triage-subagent", ("tickets:read", "tickets:write")),),
            extra_scopes=("customers:export", "admin:all"),  # planted: over-broad scopes
        ),
        Agent("triage-subagent", "acme", "dana@acme.example", ("tickets:read", "tickets:write"), sub_agent=True),
        Agent("export-subagent", "acme", "dana@acme.example", ("customers:export",), sub_agent=True),
        Agent("billing-agent", "acme", "frank@acme.example", ("invoices:read", "refunds:write"), weight=2),
        Agent("collections-agent", "acme", "frank@acme.example", ("invoices:read", "customers:read")),
        Agent("onboarding-agent", "acme", "carol@acme.example", ("customers:read", "customers:write")),
        Agent(
            "reporting-agent",
            "acme",
            "carol@acme.example",
            ("invoices:read", "invoices:export"),
            weight=0.5,
            service_account="sa-acme-reporting",
        ),
        Agent("kb-agent", "acme", "grace@acme.example", ("docs:read", "docs:write")),
        # globex: sales, research, engineering
        Agent(
            "sales-agent",
            "globex",
            "kim@globex.example",
            ("crm:read", "customers:read", "docs:read"),
            weight=3,
            delegates=(("summarizer-subagent", ("crm:read", "docs:read")),),
        ),
        Agent("summarizer-subagent", "globex", "kim@globex.example", ("crm:read", "docs:read"), sub_agent=True),
        Agent("lead-agent", "globex", "kim@globex.example", ("customers:read", "customers:write", "crm:write")),
        Agent("research-agent", "globex", "leo@globex.example", ("docs:read", "docs:write"), weight=2),
        Agent("report-agent", "globex", "leo@globex.example", ("crm:read", "docs:read")),
        Agent(
            "code-review-agent",
            "globex",
            "nina@globex.example",
            ("code:read", "code:write", "ci:run", "ci:read"),
            weight=2,
            delegates=(("ci-subagent", ("ci:run", "ci:read")),),
        ),
        Agent("ci-subagent", "globex", "nina@globex.example", ("ci:run", "ci:read"), sub_agent=True),
        Agent("docs-agent", "globex", "oscar@globex.example", ("docs:read", "docs:write", "docs:share")),
        # initech: HR and engineering
        Agent("hr-assistant", "initech", "peggy@initech.example", ("hr:read", "hr:write"), weight=2),
        Agent("payroll-agent", "initech", "peggy@initech.example", ("payroll:read", "hr:read")),
        Agent(
            "recruiting-agent",
            "initech",
            "quinn@initech.example",
            ("hr:read", "docs:read"),
            delegates=(("screening-subagent", ("hr:read", "docs:read")),),
        ),
        Agent("screening-subagent", "initech", "quinn@initech.example", ("hr:read", "docs:read"), sub_agent=True),
        Agent("it-helpdesk-agent", "initech", "rupert@initech.example", ("tickets:read", "tickets:write")),
        Agent(
            "devops-agent",
            "initech",
            "trent@initech.example",
            ("code:read", "ci:run", "ci:read"),
            weight=2,
            delegates=(("ci-runner-subagent", ("ci:run", "ci:read")),),
        ),
        Agent("ci-runner-subagent", "initech", "trent@initech.example", ("ci:run", "ci:read"), sub_agent=True),
        Agent(
            "policy-agent",
            "initech",
            "sybil@initech.example",
            ("docs:read", "docs:write"),
            delegates=(("wiki-subagent", ("docs:read",)),),
        ),
        Agent("wiki-subagent", "initech", "sybil@initech.example", ("docs:read",), sub_agent=True),
    ]
}


@dataclass(frozen=True)
class Gateway:
    emitter: str
    tenant: str
    servers: tuple[str, ...]
    kind: str = "gateway"


GATEWAYS = (
    Gateway("gw-acme-support", "acme", ("helpdesk-mcp", "docs-mcp")),
    Gateway("gw-acme-billing", "acme", ("billing-mcp", "crm-mcp")),
    Gateway("gw-globex-sales", "globex", ("crm-mcp",)),
    Gateway("gw-globex-docs", "globex", ("docs-mcp",)),
    Gateway("gw-globex-eng", "globex", ("code-mcp",)),
    Gateway("gw-initech-hr", "initech", ("hr-mcp", "helpdesk-mcp")),
    Gateway("gw-initech-eng", "initech", ("code-mcp",)),
    Gateway("gw-initech-docs", "initech", ("docs-mcp",)),
)
# Identity providers: they record approvals, credential issuance and revocation, and token exchanges.
IDPS = tuple(Gateway(f"idp-{tenant}", tenant, (), kind="idp") for tenant in TENANTS)


def gateway_for(tenant: str, server: str) -> Gateway:
    for gateway in GATEWAYS:
        if gateway.tenant == tenant and server in gateway.servers:
            return gateway
    raise KeyError(f"no gateway of {tenant} fronts {server}")


def tools_for(scopes: tuple[str, ...]) -> list[Tool]:
    """The tools these scopes allow."""
    return [tool for tool in TOOLS.values() if tool.scope in scopes]
