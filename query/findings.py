"""Findings: the patterns an analyst looks for first, each with severity, evidence and its OWASP reference.

References: ASI03 is "Identity & Privilege Abuse" of the OWASP Top 10 for Agentic Applications; NHIn are the
OWASP Non-Human Identities Top 10 (NHI1 improper offboarding, NHI5 overprivileged NHI, NHI8 environment
isolation, NHI9 NHI reuse). Each finding lists every evidence event id (``evidence_total`` says how many there
are; past ``MAX_EVIDENCE`` the list says so with ``evidence_truncated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from query.lake import LakeReader

__all__ = ["Finding", "FindingSettings", "findings"]

MAX_EVIDENCE = 1000


@dataclass(frozen=True)
class FindingSettings:
    max_delegation_depth: int = 3
    unused_scope_days: int = 30
    burst_denied: int = 5
    burst_window_minutes: int = 10


@dataclass
class Finding:
    kind: str
    severity: str
    subject: str
    title: str
    owasp: list[str]
    evidence: list[str]
    evidence_total: int
    first_seen: str | None = None
    last_seen: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def evidence_truncated(self) -> bool:
        return self.evidence_total > len(self.evidence)


_KNOWN_AGENTS = """
    known_agents AS (
        SELECT DISTINCT unnest(delegation_chain[2:]) AS name FROM scoped_for($tenant)
        UNION SELECT DISTINCT delegate_agent FROM scoped_for($tenant) WHERE delegate_agent IS NOT NULL
    )"""

_QUERIES: dict[str, tuple[str, str, list[str], str]] = {
    # kind: (severity, title template, owasp, SQL returning subject, ids, first, last, details)
    "borrowed_session": (
        "high",
        "{subject} acted with a borrowed user credential",
        ["ASI03"],
        f"""WITH {_KNOWN_AGENTS.strip()}
        SELECT coalesce(agent, credential_client_id) || ' with ' || credential_id, list(event_id ORDER BY occurred_at),
               min(occurred_at), max(occurred_at), any_value(credential_kind)
        FROM scoped_for($tenant) WHERE type = 'tool.invocation' AND (
            (credential_kind = 'user_session' AND agent IS NOT NULL)
            OR (agent IS NULL AND credential_client_id IN (SELECT name FROM known_agents)))
        GROUP BY 1 ORDER BY 1""",
    ),
    "shared_credential": (
        "high",
        "credential {subject} is presented by more than one client or agent",
        ["ASI03", "NHI9"],
        """SELECT credential_id, list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               list_sort(list_distinct(list(coalesce(agent, credential_client_id))))
        FROM scoped_for($tenant) WHERE credential_id IS NOT NULL AND type = 'tool.invocation'
        GROUP BY credential_id
        HAVING count(DISTINCT credential_client_id) > 1 OR count(DISTINCT agent) > 1 ORDER BY 1""",
    ),
    "unregistered_tool": (
        "medium",
        "tool {subject} was allowed with no permission mapping it",
        ["ASI03"],
        """SELECT tool_server || '/' || tool_name, list(event_id ORDER BY occurred_at), min(occurred_at),
               max(occurred_at), list_sort(list_distinct(list(agent)))
        FROM scoped_for($tenant)
        WHERE type = 'tool.invocation' AND decision_result = 'allow' AND decision_required_scope IS NULL
        GROUP BY 1 ORDER BY 1""",
    ),
    "action_after_revocation": (
        "critical",
        "credential {subject} was used after it was revoked",
        ["ASI03", "NHI1"],
        """WITH revoked AS (
            SELECT credential_id, min(coalesce(revoked_at, occurred_at)) AS at
            FROM history_for($tenant) WHERE type = 'credential.revoked' GROUP BY credential_id)
        SELECT e.credential_id, list(e.event_id ORDER BY e.occurred_at), min(e.occurred_at), max(e.occurred_at),
               any_value(r.at)
        FROM scoped_for($tenant) e JOIN revoked r ON e.credential_id = r.credential_id
        WHERE e.type NOT IN ('credential.revoked', 'credential.issued') AND e.occurred_at > r.at
        GROUP BY 1 ORDER BY 1""",
    ),
    "cross_tenant": (
        "high",
        "{subject} reached resources of another tenant",
        ["ASI03", "NHI8"],
        """SELECT coalesce(agent, "user") || ' (' || tenant || ' -> ' || resource_tenant || ')',
               list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               list_sort(list_distinct(list(resource_type || ' ' || resource_id)))
        FROM scoped_for($tenant) WHERE resource_tenant IS NOT NULL AND resource_tenant <> tenant
        GROUP BY 1 ORDER BY 1""",
    ),
    "scope_escalation": (
        "high",
        "{subject} delegated scopes it does not hold",
        ["ASI03"],
        """SELECT coalesce(agent, "user") || ' -> ' || delegate_agent, list(event_id ORDER BY occurred_at),
               min(occurred_at), max(occurred_at),
               list_sort(list_distinct(flatten(list(list_filter(delegate_scopes,
                   lambda s: NOT list_contains(coalesce(credential_scopes, []), s))))))
        FROM scoped_for($tenant) WHERE type = 'agent.delegation'
          AND NOT list_has_all(coalesce(credential_scopes, []), coalesce(delegate_scopes, []))
        GROUP BY 1 ORDER BY 1""",
    ),
    "deep_delegation": (
        "medium",
        "delegation chains deeper than {max_depth} agents, acting for {subject}",
        ["ASI03"],
        """SELECT "user", list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               max(delegation_depth)
        FROM scoped_for($tenant) WHERE delegation_depth > $max_depth GROUP BY 1 ORDER BY 1""",
    ),
    "over_privileged": (
        "medium",
        "{subject} holds scopes it has not used in {unused_days} days",
        ["ASI03", "NHI5"],
        """WITH grants AS (
            SELECT agent, unnest(credential_scopes) AS scope, event_id, occurred_at
            FROM scoped_for($tenant) WHERE agent IS NOT NULL AND credential_scopes IS NOT NULL),
        used AS (
            SELECT DISTINCT agent, decision_required_scope AS scope FROM history_for($tenant)
            WHERE type = 'tool.invocation' AND decision_result = 'allow' AND decision_required_scope IS NOT NULL
              AND occurred_at >= $unused_since AND date >= CAST($unused_since AS DATE))
        SELECT g.agent, list(DISTINCT g.event_id), min(g.occurred_at), max(g.occurred_at),
               list_sort(list_distinct(list(g.scope)))
        FROM grants g LEFT JOIN used u ON g.agent = u.agent AND g.scope = u.scope
        WHERE u.scope IS NULL GROUP BY 1 ORDER BY 1""",
    ),
    "denied_burst": (
        "medium",
        "{subject} made a burst of denied calls",
        ["ASI03"],
        """WITH denied AS (
            SELECT coalesce(agent, "user") AS actor, event_id, occurred_at,
                   count(*) OVER (PARTITION BY coalesce(agent, "user") ORDER BY occurred_at
                                  RANGE BETWEEN CURRENT ROW AND $burst_window FOLLOWING) AS in_window
            FROM scoped_for($tenant) WHERE type = 'tool.invocation' AND decision_result = 'deny'),
        starts AS (SELECT actor, min(occurred_at) AS start FROM denied WHERE in_window >= $burst_count GROUP BY actor)
        SELECT d.actor, list(d.event_id ORDER BY d.occurred_at), min(d.occurred_at), max(d.occurred_at), count(*)
        FROM denied d JOIN starts s ON d.actor = s.actor
        WHERE d.occurred_at >= s.start AND d.occurred_at <= s.start + $burst_window
        GROUP BY 1 ORDER BY 1""",
    ),
}

KINDS = tuple(_QUERIES)


def findings(
    reader: LakeReader,
    *,
    tenant: str | None = None,
    kinds: tuple[str, ...] = KINDS,
    settings: FindingSettings | None = None,
    now: datetime | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Finding]:
    """Findings over the events of ``tenant`` (all, if None) between ``since`` and ``until`` (open if None).
    Revocations and scope use are looked up in the whole history: a use in the window of a credential revoked
    earlier counts, and a scope granted in the window is unused only if nothing used it in ``unused_scope_days``."""
    settings = settings or FindingSettings()
    params = {
        "tenant": tenant,
        "max_depth": settings.max_delegation_depth,
        "unused_days": settings.unused_scope_days,
        "burst_count": settings.burst_denied,
        "burst_window": timedelta(minutes=settings.burst_window_minutes),
    }
    results: list[Finding] = []
    with reader.connect() as connection:
        # history_for: every event of the tenant (revocations before the window still count); scoped_for: the
        # window too, its bounds rendered from datetime objects (_literal), so no caller text becomes SQL.
        connection.execute(
            "CREATE TEMP MACRO history_for(wanted) AS TABLE"
            " SELECT * FROM events WHERE wanted IS NULL OR tenant = wanted"
        )
        window = " AND ".join(
            f"occurred_at {op} TIMESTAMPTZ '{_literal(bound)}' AND date {date_op} DATE '{_literal(bound)[:10]}'"
            for op, date_op, bound in ((">=", ">=", since), ("<", "<=", until))
            if bound is not None
        )
        connection.execute(
            "CREATE TEMP MACRO scoped_for(wanted) AS TABLE SELECT * FROM history_for(wanted)"
            + (f" WHERE {window}" if window else "")
        )
        latest = connection.execute("SELECT max(occurred_at) FROM scoped_for(NULL)").fetchone()
        reference = now or (latest[0] if latest and latest[0] else None)
        for kind in kinds:
            severity, title, owasp, sql = _QUERIES[kind]
            values = {
                **params,
                "unused_since": (reference or datetime.now(UTC)) - timedelta(days=settings.unused_scope_days),
            }
            bound = {name: value for name, value in values.items() if f"${name}" in sql}
            for subject, ids, first, last, detail in connection.execute(sql, bound).fetchall():
                label = title.format(
                    subject=subject,
                    max_depth=settings.max_delegation_depth,
                    unused_days=settings.unused_scope_days,
                )
                results.append(
                    Finding(
                        kind=kind,
                        severity=severity,
                        subject=str(subject),
                        title=label,
                        owasp=owasp,
                        evidence=list(ids[:MAX_EVIDENCE]),
                        evidence_total=len(ids),
                        first_seen=_iso(first),
                        last_seen=_iso(last),
                        details={"detail": _plain(detail)},
                    )
                )
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(results, key=lambda f: (order[f.severity], f.kind, f.subject))


def _literal(bound: datetime) -> str:
    """A datetime as SQL literal text: only digits and ``-:+. T`` can come out of a datetime, never caller text."""
    if not isinstance(bound, datetime):
        raise TypeError(f"a window bound must be a datetime, got {type(bound).__name__}")
    text = bound.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
    assert set(text) <= set("0123456789-:+. "), text
    return text


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if isinstance(value, datetime) else value


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    return value
