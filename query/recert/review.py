"""Access recertification: for each agent of a tenant, what it holds against what it uses, and what to do about it.

Like an Entra ID access review or IAM Access Analyzer's unused-access findings, for agents and their delegation
chains. One review per agent: owner, emitters, credentials held, scopes granted / used (count, last use) / unused,
denied attempts, findings, delegations given and received, users it acted for and their approvals, and a
recommendation with its justification:

- ``investigate``: an open high or critical finding names it (e.g. use of a revoked credential, a borrowed
  session): whatever else is true of it, it is never ``keep`` until someone has looked;
- ``revoke``: it made no allowed call in the window: its access is not needed;
- ``reduce``: it holds scopes it never used in the window: reduce to the used ones;
- ``keep``: it uses everything it holds (medium or low findings are listed in the justification to investigate).

A finding is open unless the triage queue (``query.detect.records``, ``state/findings.sqlite``) has it resolved or
suppressed; a closed finding is still listed, with its status.

The review is computed over one snapshot of the lake (one file list for every query), and states that position:
every emitter's head (seq, hash) and the event count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from query.detect.loop import findings_store_path
from query.detect.records import triage_statuses
from query.findings import Finding, findings
from query.lake import LakeReader
from store.ground.errors import InvalidInput

__all__ = ["AgentReview", "Review", "access_review", "parse_window"]

REVIEWER_COLUMNS = ("decision", "reviewer", "date", "comment")


@dataclass
class AgentReview:
    agent: str
    owner: str | None
    emitters: list[str]
    credentials: list[dict[str, Any]]  # id, kind, issued, expires, revoked
    scopes_granted: list[str]
    scopes_used: list[dict[str, Any]]  # scope, count, last_used
    scopes_unused: list[str]
    denied: int
    findings: list[dict[str, Any]]  # kind, severity, title, status (open, acknowledged, resolved, suppressed)
    delegations_given: list[dict[str, Any]]  # agent, count, scopes
    delegations_received: list[dict[str, Any]]  # agent, count, scopes
    users: list[dict[str, Any]]  # user, events, approvals
    recommendation: str
    justification: str
    review: dict[str, str] = field(default_factory=lambda: dict.fromkeys(REVIEWER_COLUMNS, ""))


@dataclass
class Review:
    tenant: str
    window_days: int
    since: str
    until: str
    generated_at: str
    events: int
    heads: dict[str, dict[str, Any]]  # emitter -> {"seq", "hash"}
    agents: list[AgentReview]

    def summary(self) -> dict[str, int]:
        # in alphabetical order: the signed copy is canonical JSON (sorted keys), and a renderer shows it as it reads
        counts = {"agents": len(self.agents), "investigate": 0, "keep": 0, "reduce": 0, "revoke": 0}
        for agent in self.agents:
            counts[agent.recommendation] += 1
        counts["unused_scopes"] = sum(len(agent.scopes_unused) for agent in self.agents)
        return counts


def parse_window(text: str) -> int:
    """``90d`` -> 90 (days)."""
    if not (text.endswith("d") and text[:-1].isdigit() and 0 < int(text[:-1]) <= 3650):
        raise InvalidInput(f"window must be a number of days like 90d (1-3650), got {text!r}")
    return int(text[:-1])


def access_review(data_dir: Path, tenant: str, *, window_days: int = 90, now: datetime | None = None) -> Review:
    reader = LakeReader(data_dir).pinned()  # one snapshot of the file list for every query of the review
    until = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    since = until - timedelta(days=window_days)
    params = {"tenant": tenant, "since": since, "until": until}
    scoped = "tenant = $tenant AND occurred_at >= $since AND occurred_at < $until"
    with reader.connect() as connection:

        def rows(sql: str, **extra: Any) -> list[tuple[Any, ...]]:
            bound = {**params, **extra}
            return connection.execute(sql, {k: v for k, v in bound.items() if f"${k}" in sql}).fetchall()

        heads = {
            emitter: {"seq": seq, "hash": digest}
            for emitter, seq, digest in rows(
                "SELECT emitter, max(seq), arg_max(event_hash, seq) FROM events WHERE tenant = $tenant"
                " GROUP BY emitter ORDER BY emitter"
            )
        }
        total = rows("SELECT count(*) FROM events WHERE tenant = $tenant")[0][0]
        names = [
            r[0]
            for r in rows(
                f"SELECT DISTINCT name FROM (SELECT agent AS name FROM events WHERE {scoped} AND agent IS NOT NULL"
                f" UNION SELECT delegate_agent FROM events WHERE {scoped} AND delegate_agent IS NOT NULL) ORDER BY 1"
            )
        ]
        per_agent = _agent_facts(rows, scoped, names)
        for facts in per_agent.values():  # a sub-agent has no credential of its own: its owner is its delegator's
            if facts["owner"] is None:
                owners = [f"{per_agent[d['agent']]['owner']} (via {d['agent']})" for d in facts["received"]
                          if d["agent"] in per_agent and per_agent[d["agent"]]["owner"]]  # fmt: skip
                facts["owner"] = owners[0] if owners else None
        found = findings(reader, tenant=tenant, since=since, until=until)
        finding_agents = {
            index: {r[0] for r in rows(_FINDING_AGENTS, ids=finding.evidence)} | _named_in(finding, names)
            for index, finding in enumerate(found)
        }
    statuses = triage_statuses(findings_store_path(data_dir), tenant)
    agents = []
    for name in names:
        mine = [found[i] for i, members in finding_agents.items() if name in members]
        agents.append(_review(name, per_agent[name], mine, statuses))
    return Review(
        tenant=tenant,
        window_days=window_days,
        since=_stamp(since),
        until=_stamp(until),
        generated_at=_stamp(until),
        events=int(total),
        heads=heads,
        agents=agents,
    )


_FINDING_AGENTS = """
    SELECT DISTINCT name FROM (
        SELECT unnest(delegation_chain[2:]) AS name FROM events WHERE list_contains($ids, event_id)
        UNION SELECT credential_client_id FROM events WHERE list_contains($ids, event_id)
    ) WHERE name IS NOT NULL"""


def _named_in(finding: Finding, names: list[str]) -> set[str]:
    detail = finding.details.get("detail")
    listed = set(detail) if isinstance(detail, list) else set()
    return {name for name in names if name == finding.subject or name in listed}


def _agent_facts(rows: Any, scoped: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every agent's facts, each kind of fact in one grouped query (a fixed number of scans, however many agents)."""
    facts: dict[str, dict[str, Any]] = {
        name: {"owner": None, "emitters": [], "credentials": [], "granted": set(), "used": [], "allowed": 0,
               "denied": 0, "given": [], "received": [], "users": []}
        for name in names
    }  # fmt: skip

    def each(sql: str) -> list[tuple[Any, ...]]:
        return [row for row in rows(sql) if row[0] in facts]

    for name, owner in each(
        f'SELECT credential_client_id, arg_max("user", occurred_at) FROM events WHERE {scoped}'
        " AND type = 'credential.issued' GROUP BY 1"
    ):
        facts[name]["owner"] = owner
    for name, emitters in each(
        f"SELECT agent, list_sort(list_distinct(list(emitter))) FROM events WHERE {scoped} AND agent IS NOT NULL"
        " GROUP BY 1"
    ):
        facts[name]["emitters"] = emitters
    for name, cid, kind, issued, expires, revoked in each(
        "SELECT holder, c.credential_id, any_value(c.credential_kind),"
        " coalesce(min(c.occurred_at) FILTER (WHERE c.type = 'credential.issued'), any_value(d.handed)),"
        " max(c.credential_expires_at),"
        " min(coalesce(c.revoked_at, c.occurred_at)) FILTER (WHERE c.type = 'credential.revoked')"
        f" FROM (SELECT *, unnest(list_distinct([agent, credential_client_id])) AS holder FROM events WHERE {scoped}"
        " AND credential_id IS NOT NULL) c"
        f" LEFT JOIN (SELECT delegate_credential_id, min(occurred_at) AS handed FROM events WHERE {scoped}"
        " GROUP BY 1) d ON c.credential_id = d.delegate_credential_id"
        " WHERE holder IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 4 NULLS LAST, 2"
    ):
        facts[name]["credentials"].append(
            {"id": cid, "kind": kind, "issued": _iso(issued), "expires": _iso(expires), "revoked": _iso(revoked)}
        )
    for name, scopes in each(
        "SELECT holder, list_distinct(flatten(list(credential_scopes))) FROM (SELECT credential_scopes,"
        " CASE WHEN type = 'credential.issued' THEN credential_client_id ELSE agent END AS holder"
        f" FROM events WHERE {scoped} AND credential_scopes IS NOT NULL) GROUP BY 1"
    ) + each(
        "SELECT delegate_agent, list_distinct(flatten(list(delegate_scopes))) FROM events"
        f" WHERE {scoped} AND delegate_agent IS NOT NULL GROUP BY 1"
    ):
        facts[name]["granted"] |= set(scopes or [])
    for name, scope, count, last in each(
        f"SELECT agent, decision_required_scope, count(*), max(occurred_at) FROM events WHERE {scoped}"
        " AND type = 'tool.invocation' AND decision_result = 'allow' AND decision_required_scope IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        facts[name]["used"].append({"scope": scope, "count": count, "last_used": _iso(last)})
    for name, allowed, denied in each(
        "SELECT agent, count(*) FILTER (WHERE decision_result = 'allow'),"
        f" count(*) FILTER (WHERE decision_result = 'deny') FROM events WHERE {scoped}"
        " AND type = 'tool.invocation' GROUP BY 1"
    ):
        facts[name]["allowed"], facts[name]["denied"] = allowed, denied
    delegations = (
        "SELECT {me}, {other}, count(*), list_sort(list_distinct(flatten(list(delegate_scopes)))) FROM events"
        f" WHERE {scoped} AND type = 'agent.delegation' GROUP BY 1, 2 ORDER BY 1, 2"
    )
    for name, other, count, scopes in each(delegations.format(me="agent", other="delegate_agent")):
        facts[name]["given"].append({"agent": other, "count": count, "scopes": scopes})
    for name, other, count, scopes in each(delegations.format(me="delegate_agent", other="agent")):
        facts[name]["received"].append({"agent": other, "count": count, "scopes": scopes})
    for name, user, events, approvals, approved_by in each(
        'SELECT e.agent, e."user", count(*), count(DISTINCT e.approval_id),'
        " list_sort(list_distinct(list(a.approval_approved_by) FILTER (WHERE a.approval_approved_by IS NOT NULL)))"
        f' FROM (SELECT agent, "user", approval_id FROM events WHERE {scoped} AND agent IS NOT NULL'
        ' AND "user" IS NOT NULL) e'
        " LEFT JOIN (SELECT approval_id, any_value(approval_approved_by) AS approval_approved_by FROM events"
        f" WHERE {scoped} AND type = 'task.approval' GROUP BY 1) a ON e.approval_id = a.approval_id"
        " GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
    ):
        facts[name]["users"].append(
            {"user": user, "events": events, "approvals": approvals, "approved_by": approved_by}
        )
    for fact in facts.values():
        fact["granted"] = sorted(fact["granted"])
    return facts


def _review(name: str, facts: dict[str, Any], mine: list[Finding], statuses: dict[tuple[str, str], str]) -> AgentReview:
    used = {entry["scope"] for entry in facts["used"]}
    unused = [scope for scope in facts["granted"] if scope not in used]
    status = {id(f): statuses.get((f.kind, f.subject), "open") for f in mine}
    open_findings = [f for f in mine if status[id(f)] not in _CLOSED]
    serious = [f for f in open_findings if f.severity in ("critical", "high")]
    others = [f for f in open_findings if f.severity not in ("critical", "high")]
    if serious:
        recommendation = "investigate"
        justification = "; ".join(f"{f.severity}: {f.title}" for f in serious)
        if unused:
            justification += f"; then reduce: never used {', '.join(unused)}"
    elif facts["allowed"] == 0:
        recommendation = "revoke"
        justification = "no allowed call in the window: its access is not needed"
    elif unused:
        recommendation = "reduce"
        justification = f"never used {', '.join(unused)}; reduce to {', '.join(sorted(used)) or 'nothing'}"
    else:
        recommendation = "keep"
        justification = f"uses all {len(facts['granted'])} granted scopes"
    if others:
        justification += "; investigate: " + "; ".join(f.title for f in others)
    return AgentReview(
        agent=name,
        owner=facts["owner"],
        emitters=facts["emitters"],
        credentials=facts["credentials"],
        scopes_granted=facts["granted"],
        scopes_used=facts["used"],
        scopes_unused=unused,
        denied=int(facts["denied"]),
        findings=[{"kind": f.kind, "severity": f.severity, "title": f.title, "status": status[id(f)]} for f in mine],
        delegations_given=facts["given"],
        delegations_received=facts["received"],
        users=facts["users"],
        recommendation=recommendation,
        justification=justification,
    )


_CLOSED = ("resolved", "suppressed")


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _stamp(value)
    return str(value)
