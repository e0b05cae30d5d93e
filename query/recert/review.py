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

from query.detect.engine import lake_agents
from query.detect.loop import findings_store_path
from query.detect.records import recorded_findings, triage_statuses
from query.findings import Finding, findings
from query.index.aggregates import LakeAggregates, Layout, Window
from query.lake import LakeReader
from query.search import rfc3339_us
from store.ground.errors import InvalidInput

__all__ = ["DAILY_FACTS", "AgentReview", "Review", "access_review", "parse_window"]

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
    findings_from: str = ""  # recorded by continuous detection (up to which log index), or computed over the window

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


# The review's facts of a lake file, by tenant and UTC day (``kind`` tells which; ``agent`` and ``item`` the keys):
# each grouping keeps what merges across days (counts, first and last times, distinct lists), so a review over a
# window reads a few rows per agent and day instead of every event (query.index.aggregates keeps them per file).
FACTS = """
    WITH rows AS (SELECT *, date_trunc('day', occurred_at) AS day FROM {source})
    SELECT tenant, day, 'head' AS kind, NULL AS agent, emitter AS item, count(*) AS events, NULL AS first,
        NULL AS last, NULL AS expires, NULL AS revoked, arg_max(event_hash, seq) AS text, NULL AS items,
        max(seq) AS seq FROM rows GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'owner' AS kind, credential_client_id AS agent,
        max(occurred_at) AS last, arg_max("user", occurred_at) AS text
        FROM rows WHERE type = 'credential.issued' GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'emitters' AS kind, agent, list_distinct(list(emitter)) AS items
        FROM rows WHERE agent IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'credential' AS kind, holder AS agent, credential_id AS item,
        any_value(credential_kind) AS text, min(occurred_at) FILTER (WHERE type = 'credential.issued') AS first,
        max(credential_expires_at) AS expires,
        min(coalesce(revoked_at, occurred_at)) FILTER (WHERE type = 'credential.revoked') AS revoked
        FROM (SELECT *, unnest(list_distinct([agent, credential_client_id])) AS holder FROM rows
              WHERE credential_id IS NOT NULL) WHERE holder IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'handed' AS kind, delegate_credential_id AS item, min(occurred_at) AS first
        FROM rows WHERE delegate_credential_id IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'granted' AS kind,
        CASE WHEN type = 'credential.issued' THEN credential_client_id ELSE agent END AS agent,
        list_distinct(flatten(list(credential_scopes))) AS items
        FROM rows WHERE credential_scopes IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'delegate' AS kind, delegate_agent AS agent,
        list_distinct(flatten(list(delegate_scopes))) AS items FROM rows WHERE delegate_agent IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'used' AS kind, agent, decision_required_scope AS item, count(*) AS events,
        max(occurred_at) AS last FROM rows WHERE type = 'tool.invocation' AND decision_result = 'allow'
        AND decision_required_scope IS NOT NULL GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'calls' AS kind, agent, decision_result AS item, count(*) AS events
        FROM rows WHERE type = 'tool.invocation' AND decision_result IN ('allow', 'deny') GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'delegation' AS kind, agent, delegate_agent AS item, count(*) AS events,
        list_distinct(flatten(list(delegate_scopes))) AS items FROM rows WHERE type = 'agent.delegation' GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'user' AS kind, agent, "user" AS item, count(*) AS events,
        list_distinct(list(approval_id)) AS items FROM rows WHERE agent IS NOT NULL AND "user" IS NOT NULL
        GROUP BY ALL
    UNION ALL BY NAME SELECT tenant, day, 'approval' AS kind, approval_id AS item,
        any_value(approval_approved_by) AS text FROM rows WHERE type = 'task.approval' AND approval_id IS NOT NULL
        GROUP BY ALL"""
DAILY_FACTS = Layout(FACTS, "day", "day", "review-facts", b"custody.review-facts.v1.rows")


def access_review(
    data_dir: Path,
    tenant: str,
    *,
    window_days: int = 90,
    now: datetime | None = None,
    facts: LakeAggregates | None = None,
) -> Review:
    """``facts``: the per-file daily facts to read (``DAILY_FACTS``; those already written beside the lake if
    None): the same review, in a fraction of the time on a large lake."""
    reader = LakeReader(data_dir).pinned()  # one snapshot of the file list for every query of the review
    facts = facts or LakeAggregates(reader, DAILY_FACTS)
    until = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    since = until - timedelta(days=window_days)
    files = reader.files()
    with reader.connect() as connection:
        # the heads and the event count are of the tenant's whole log; every other fact is of the window
        for name, window, kinds in (
            ("history", Window.of(None, None, "day"), "kind = 'head'"),
            ("facts", Window.of(since, until, "day"), "kind <> 'head'"),
        ):
            relation, params, _ = facts.facts(window, tenant, files)
            connection.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {relation} WHERE {kinds}", params)

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return connection.execute(sql).fetchall()

        heads = {
            emitter: {"seq": seq, "hash": digest}
            for emitter, seq, digest in rows(
                "SELECT item, max(seq), arg_max(text, seq) FROM history WHERE kind = 'head' GROUP BY 1 ORDER BY 1"
            )
        }
        total = rows("SELECT coalesce(sum(events), 0)::BIGINT FROM history WHERE kind = 'head'")[0][0]
        names = [
            r[0]
            for r in rows(
                "SELECT DISTINCT agent FROM facts WHERE kind IN ('emitters', 'delegate') AND agent IS NOT NULL"
                " ORDER BY 1"
            )
        ]
        per_agent = _agent_facts(rows, names)
        for merged in per_agent.values():  # a sub-agent has no credential of its own: its owner is its delegator's
            if merged["owner"] is None:
                owners = [f"{per_agent[d['agent']]['owner']} (via {d['agent']})" for d in merged["received"]
                          if d["agent"] in per_agent and per_agent[d["agent"]]["owner"]]  # fmt: skip
                merged["owner"] = owners[0] if owners else None
    found, findings_from = _findings(data_dir, reader, tenant, since, until, names)
    agents = []
    for name in names:
        mine = [(finding, status) for finding, status, members in found if name in members]
        agents.append(_review(name, per_agent[name], mine))
    return Review(
        tenant=tenant,
        window_days=window_days,
        since=_stamp(since),
        until=_stamp(until),
        generated_at=_stamp(until),
        events=int(total),
        heads=heads,
        agents=agents,
        findings_from=findings_from,
    )


def _findings(
    data_dir: Path, reader: LakeReader, tenant: str, since: datetime, until: datetime, names: list[str]
) -> tuple[list[tuple[Finding, str, set[str]]], str]:
    """The tenant's findings with evidence in the window, each with its triage status and the agents it names,
    and where they come from: what continuous detection recorded (with the agents its evidence names), or, on a
    data dir where it has not run (or recorded findings before it kept their agents), the window's findings
    computed from the lake now, with their status in the triage queue if it has them (else open)."""
    store = findings_store_path(data_dir)
    recorded = recorded_findings(store, tenant)
    if recorded is not None and recorded[0] >= 0:
        examined, every = recorded
        low, high = rfc3339_us(since), rfc3339_us(until)  # as the findings' stamps spell them
        inside = [
            item for item in every
            if (item.finding.last_seen or "") >= low and (item.finding.first_seen or high) < high
        ]  # fmt: skip
        if all(item.agents is not None for item in inside):
            return [
                (item.finding, item.status, set(item.agents or ()) | _named_in(item.finding, names)) for item in inside
            ], f"recorded by continuous detection up to log index {examined}"
    found = findings(reader, tenant=tenant, since=since, until=until)
    named = lake_agents(reader, found)
    statuses = triage_statuses(store, tenant)
    return [
        (
            finding,
            statuses.get((finding.kind, finding.subject), "open"),
            set(named[(finding.tenant, finding.kind, finding.subject)]) | _named_in(finding, names),
        )
        for finding in found
    ], "computed from the lake over the window"


def _named_in(finding: Finding, names: list[str]) -> set[str]:
    detail = finding.details.get("detail")
    listed = set(detail) if isinstance(detail, list) else set()
    return {name for name in names if name == finding.subject or name in listed}


def _agent_facts(rows: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every agent's facts from the window's daily facts (``facts``), each kind of fact in one grouped query."""
    facts: dict[str, dict[str, Any]] = {
        name: {"owner": None, "emitters": [], "credentials": [], "granted": set(), "used": [], "allowed": 0,
               "denied": 0, "given": [], "received": [], "users": []}
        for name in names
    }  # fmt: skip

    def each(sql: str) -> list[tuple[Any, ...]]:
        return [row for row in rows(sql) if row[0] in facts]

    for name, owner in each("SELECT agent, arg_max(text, last) FROM facts WHERE kind = 'owner' GROUP BY 1"):
        facts[name]["owner"] = owner
    for name, emitters in each(
        "SELECT agent, list_sort(list_distinct(flatten(list(items)))) FROM facts WHERE kind = 'emitters' GROUP BY 1"
    ):
        facts[name]["emitters"] = emitters
    for name, cid, kind, issued, expires, revoked in each(
        "SELECT c.agent, c.item, any_value(c.text), coalesce(min(c.first), any_value(h.handed)), max(c.expires),"
        " min(c.revoked) FROM facts c LEFT JOIN (SELECT item, min(first) AS handed FROM facts WHERE kind = 'handed'"
        " GROUP BY 1) h ON c.item = h.item WHERE c.kind = 'credential' GROUP BY 1, 2 ORDER BY 1, 4 NULLS LAST, 2"
    ):
        facts[name]["credentials"].append(
            {"id": cid, "kind": kind, "issued": _iso(issued), "expires": _iso(expires), "revoked": _iso(revoked)}
        )
    for name, scopes in each(
        "SELECT agent, list_distinct(flatten(list(items))) FROM facts WHERE kind IN ('granted', 'delegate') GROUP BY 1"
    ):
        facts[name]["granted"] |= {scope for scope in scopes or [] if scope is not None}
    for name, scope, count, last in each(
        "SELECT agent, item, sum(events)::BIGINT, max(last) FROM facts WHERE kind = 'used' GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        facts[name]["used"].append({"scope": scope, "count": count, "last_used": _iso(last)})
    for name, allowed, denied in each(
        "SELECT agent, coalesce(sum(events) FILTER (WHERE item = 'allow'), 0)::BIGINT,"
        " coalesce(sum(events) FILTER (WHERE item = 'deny'), 0)::BIGINT FROM facts WHERE kind = 'calls' GROUP BY 1"
    ):
        facts[name]["allowed"], facts[name]["denied"] = allowed, denied
    delegations = (
        "SELECT {me}, {other}, sum(events)::BIGINT, list_sort(list_distinct(flatten(list(items)))) FROM facts"
        " WHERE kind = 'delegation' GROUP BY 1, 2 ORDER BY 1, 2"
    )
    for name, other, count, scopes in each(delegations.format(me="agent", other="item")):
        facts[name]["given"].append({"agent": other, "count": count, "scopes": scopes})
    for name, other, count, scopes in each(delegations.format(me="item", other="agent")):
        facts[name]["received"].append({"agent": other, "count": count, "scopes": scopes})
    for name, user, events, approvals, approved_by in each(
        "WITH u AS (SELECT agent, item AS user, sum(events)::BIGINT AS events,"
        " list_filter(list_distinct(flatten(list(items))), lambda x: x IS NOT NULL) AS approvals FROM facts"
        " WHERE kind = 'user' GROUP BY 1, 2),"
        " a AS (SELECT item AS approval_id, any_value(text) AS approved_by FROM facts WHERE kind = 'approval'"
        " GROUP BY 1),"
        " named AS (SELECT agent, user, list_sort(list_distinct(list(a.approved_by))) AS approved_by"
        " FROM (SELECT agent, user, unnest(approvals) AS approval_id FROM u) x JOIN a USING (approval_id)"
        " WHERE a.approved_by IS NOT NULL GROUP BY 1, 2)"
        " SELECT u.agent, u.user, u.events, len(u.approvals), coalesce(named.approved_by, [])"
        " FROM u LEFT JOIN named USING (agent, user) ORDER BY 1, 3 DESC, 2"
    ):
        facts[name]["users"].append(
            {"user": user, "events": events, "approvals": approvals, "approved_by": approved_by}
        )
    for fact in facts.values():
        fact["granted"] = sorted(fact["granted"])
    return facts


def _review(name: str, facts: dict[str, Any], found: list[tuple[Finding, str]]) -> AgentReview:
    used = {entry["scope"] for entry in facts["used"]}
    unused = [scope for scope in facts["granted"] if scope not in used]
    mine = [finding for finding, _ in found]
    status = {id(finding): state for finding, state in found}
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
