"""Findings: the patterns an analyst looks for first, each with severity, evidence and its OWASP reference.

References: ASI03 is "Identity & Privilege Abuse" of the OWASP Top 10 for Agentic Applications; NHIn are the
OWASP Non-Human Identities Top 10 (NHI1 improper offboarding, NHI5 overprivileged NHI, NHI8 environment
isolation, NHI9 NHI reuse). Each finding lists every evidence event id (``evidence_total`` says how many there
are; past ``MAX_EVIDENCE`` the list says so with ``evidence_truncated``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from query.lake import LakeReader
from query.search import rfc3339_us

__all__ = ["KINDS", "RULES", "Finding", "FindingSettings", "RuleBook", "findings", "ordered"]

MAX_EVIDENCE = 1000


@dataclass(frozen=True)
class FindingSettings:
    """The parameters of the rules (query.rules reads them per tenant from a file): thresholds and windows, a
    severity per kind where it differs from the built-in one, and the kinds turned off."""

    max_delegation_depth: int = 3
    unused_scope_days: int = 30
    burst_denied: int = 5
    burst_window_minutes: int = 10
    revocation_grace_seconds: int = 60
    severities: tuple[tuple[str, str], ...] = ()  # (kind, severity) overrides
    disabled: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RuleBook:
    """Settings for every tenant, and for the tenants that tuned them."""

    defaults: FindingSettings = field(default_factory=FindingSettings)
    tenants: tuple[tuple[str, FindingSettings], ...] = ()

    def for_tenant(self, tenant: str) -> FindingSettings:
        return dict(self.tenants).get(tenant, self.defaults)


@dataclass
class Finding:
    kind: str
    severity: str
    tenant: str
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

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "evidence_truncated": self.evidence_truncated}


_KNOWN_AGENTS = """
    known_agents AS (
        SELECT DISTINCT tenant, unnest(delegation_chain[2:]) AS name FROM scoped_for($tenant)
        UNION SELECT DISTINCT tenant, delegate_agent FROM scoped_for($tenant) WHERE delegate_agent IS NOT NULL
    )"""

# The other tenant of a crossed link, named only to a caller who may see every tenant.
_OTHER = "(CASE WHEN $tenant IS NULL THEN 'tenant ' || {0}.tenant ELSE 'another tenant' END)"

# Links between events that cross a tenant wall, which no answer follows: a parent posted by another tenant, an
# approval id only another tenant approved, a revocation of a credential only another tenant holds.
_CROSS_TENANT_LINKS = f"""WITH
        holders AS (
            SELECT tenant, credential_id, min(event_id) AS event_id FROM history_for(NULL)
            WHERE credential_id IS NOT NULL AND type <> 'credential.revoked' GROUP BY 1, 2),
        approvals AS (
            SELECT tenant, approval_id, min(event_id) AS event_id FROM history_for(NULL)
            WHERE type = 'task.approval' AND approval_id IS NOT NULL GROUP BY 1, 2),
        links AS (
            SELECT e.tenant, 'events of ' || e.tenant || ' name parents in ' || {_OTHER.format("p")} AS subject,
                   e.event_id, e.occurred_at, p.event_id AS other
            FROM scoped_for($tenant) e JOIN history_for(NULL) p
              ON p.event_id = e.parent_event_id AND p.tenant <> e.tenant
            WHERE e.parent_event_id IS NOT NULL
            UNION ALL
            SELECT e.tenant, 'events of ' || e.tenant || ' name approvals only ' || {_OTHER.format("a")} || ' holds',
                   e.event_id, e.occurred_at, a.event_id
            FROM scoped_for($tenant) e JOIN approvals a ON a.approval_id = e.approval_id AND a.tenant <> e.tenant
            WHERE e.type <> 'task.approval' AND e.approval_id IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM approvals own WHERE own.approval_id = e.approval_id AND own.tenant = e.tenant)
            UNION ALL
            SELECT e.tenant, e.tenant || ' revoked credentials only ' || {_OTHER.format("u")} || ' holds',
                   e.event_id, e.occurred_at, u.event_id
            FROM scoped_for($tenant) e JOIN holders u ON u.credential_id = e.credential_id AND u.tenant <> e.tenant
            WHERE e.type = 'credential.revoked' AND NOT EXISTS (
                SELECT 1 FROM holders own WHERE own.credential_id = e.credential_id AND own.tenant = e.tenant))
        SELECT tenant, subject, list_sort(list(DISTINCT event_id)), min(occurred_at), max(occurred_at),
               CASE WHEN $tenant IS NULL THEN list_sort(list_distinct(list(other))) END
        FROM links GROUP BY 1, 2 ORDER BY 1, 2"""

# Every query returns (tenant, subject, event ids, first, last, detail), grouped within a tenant: tenants are walls,
# and no join between events (credential, approval, parent, agent) reaches across one.
_QUERIES: dict[str, tuple[str, str, list[str], str]] = {
    # kind: (severity, title template, owasp, SQL)
    "borrowed_session": (
        "high",
        "{subject} acted with a borrowed user credential",
        ["ASI03"],
        f"""WITH {_KNOWN_AGENTS.strip()}
        SELECT e.tenant, coalesce(agent, credential_client_id) || ' with ' || credential_id,
               list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at), any_value(credential_kind)
        FROM scoped_for($tenant) e WHERE type = 'tool.invocation' AND (
            (credential_kind = 'user_session' AND agent IS NOT NULL)
            OR (agent IS NULL AND EXISTS (
                SELECT 1 FROM known_agents k WHERE k.tenant = e.tenant AND k.name = e.credential_client_id)))
        GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    "shared_credential": (
        "high",
        "credential {subject} is presented by more than one client or agent",
        ["ASI03", "NHI9"],
        """SELECT tenant, credential_id, list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               list_sort(list_distinct(list(coalesce(agent, credential_client_id))))
        FROM scoped_for($tenant) WHERE credential_id IS NOT NULL AND type = 'tool.invocation'
        GROUP BY tenant, credential_id
        HAVING count(DISTINCT credential_client_id) > 1 OR count(DISTINCT agent) > 1 ORDER BY 1, 2""",
    ),
    "unregistered_tool": (
        "medium",
        "tool {subject} was allowed with no permission mapping it",
        ["ASI03"],
        """SELECT tenant, tool_server || '/' || tool_name, list(event_id ORDER BY occurred_at), min(occurred_at),
               max(occurred_at), list_sort(list_distinct(list(agent)))
        FROM scoped_for($tenant)
        WHERE type = 'tool.invocation' AND decision_result = 'allow' AND decision_required_scope IS NULL
        GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    # A use is after the revocation by the emitter's clock (occurred_at, which it signs) or by the server's
    # (received_at, more than $revocation_grace after the revocation arrived): a use backdated to before the
    # revocation cannot hide that it arrived after it. The grace covers a use and a revocation from two
    # emitters that each batch their posts.
    "action_after_revocation": (
        "critical",
        "credential {subject} was used after it was revoked",
        ["ASI03", "NHI1"],
        """WITH revoked AS (
            SELECT tenant, credential_id, min(coalesce(revoked_at, occurred_at)) AS at, min(received_at) AS received
            FROM history_for($tenant) WHERE type = 'credential.revoked' GROUP BY tenant, credential_id)
        SELECT e.tenant, e.credential_id, list(e.event_id ORDER BY e.occurred_at), min(e.occurred_at),
               max(e.occurred_at), any_value(r.at)
        FROM scoped_for($tenant) e JOIN revoked r ON e.tenant = r.tenant AND e.credential_id = r.credential_id
        WHERE e.type NOT IN ('credential.revoked', 'credential.issued')
          AND (e.occurred_at > r.at OR e.received_at > r.received + $revocation_grace)
        GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    "cross_tenant": (
        "high",
        "{subject} reached resources of another tenant",
        ["ASI03", "NHI8"],
        """SELECT tenant, coalesce(agent, "user") || ' (' || tenant || ' -> ' || resource_tenant || ')',
               list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               list_sort(list_distinct(list(resource_type || ' ' || resource_id)))
        FROM scoped_for($tenant) WHERE resource_tenant IS NOT NULL AND resource_tenant <> tenant
        GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    "cross_tenant_link": (
        "high",
        "{subject}",
        ["ASI03", "NHI8"],
        _CROSS_TENANT_LINKS,
    ),
    "scope_escalation": (
        "high",
        "{subject} delegated scopes it does not hold",
        ["ASI03"],
        """SELECT tenant, coalesce(agent, "user") || ' -> ' || delegate_agent, list(event_id ORDER BY occurred_at),
               min(occurred_at), max(occurred_at),
               list_sort(list_distinct(flatten(list(list_filter(delegate_scopes,
                   lambda s: NOT list_contains(coalesce(credential_scopes, []), s))))))
        FROM scoped_for($tenant) WHERE type = 'agent.delegation'
          AND NOT list_has_all(coalesce(credential_scopes, []), coalesce(delegate_scopes, []))
        GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    "deep_delegation": (
        "medium",
        "delegation chains deeper than {max_depth} agents, acting for {subject}",
        ["ASI03"],
        """SELECT tenant, "user", list(event_id ORDER BY occurred_at), min(occurred_at), max(occurred_at),
               max(delegation_depth)
        FROM scoped_for($tenant) WHERE delegation_depth > $max_depth GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    "over_privileged": (
        "medium",
        "{subject} holds scopes it has not used in {unused_days} days",
        ["ASI03", "NHI5"],
        """WITH grants AS (
            SELECT tenant, agent, unnest(credential_scopes) AS scope, event_id, occurred_at
            FROM scoped_for($tenant) WHERE agent IS NOT NULL AND credential_scopes IS NOT NULL),
        used AS (
            SELECT DISTINCT tenant, agent, decision_required_scope AS scope FROM history_for($tenant)
            WHERE type = 'tool.invocation' AND decision_result = 'allow' AND decision_required_scope IS NOT NULL
              AND occurred_at >= $unused_since AND date >= CAST($unused_since AS DATE))
        SELECT g.tenant, g.agent, list_sort(list(DISTINCT g.event_id)), min(g.occurred_at), max(g.occurred_at),
               list_sort(list_distinct(list(g.scope)))
        FROM grants g LEFT JOIN used u ON g.tenant = u.tenant AND g.agent = u.agent AND g.scope = u.scope
        WHERE u.scope IS NULL GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    # Every burst, not only an actor's first: a denied call is evidence when a window of $burst_window that holds
    # it holds $burst_count denied calls of its actor. Windows run on the emitter's clock: the server's
    # (received_at) would put a backfill of 30 days, posted in a minute, into one burst. A call is in such a
    # window exactly when the latest window start at or before it (a call opening $burst_count calls) is at most
    # $burst_window earlier: a running max, not a join of every call with every start (10M events: 8.3 -> 1.9 s).
    "denied_burst": (
        "medium",
        "{subject} made a burst of denied calls",
        ["ASI03"],
        """WITH denied AS (
            SELECT tenant, coalesce(agent, "user") AS actor, event_id, occurred_at,
                   count(*) OVER (PARTITION BY tenant, coalesce(agent, "user") ORDER BY occurred_at
                                  RANGE BETWEEN CURRENT ROW AND $burst_window FOLLOWING) AS in_window
            FROM scoped_for($tenant) WHERE type = 'tool.invocation' AND decision_result = 'deny'),
        starts AS (
            SELECT *, max(CASE WHEN in_window >= $burst_count THEN occurred_at END) OVER (
                       PARTITION BY tenant, actor ORDER BY occurred_at
                       RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS latest_start
            FROM denied),
        in_burst AS (
            SELECT DISTINCT tenant, actor, event_id, occurred_at FROM starts
            WHERE occurred_at <= latest_start + $burst_window)
        SELECT tenant, actor, list(event_id ORDER BY occurred_at, event_id), min(occurred_at), max(occurred_at),
               count(*)
        FROM in_burst GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
}

KINDS = tuple(_QUERIES)
# The built-in rules as data: kind -> (default severity, title, OWASP references), for `custody rules`.
RULES = {kind: (severity, title, owasp) for kind, (severity, title, owasp, _) in _QUERIES.items()}


def findings(
    reader: LakeReader,
    *,
    tenant: str | None = None,
    kinds: tuple[str, ...] = KINDS,
    settings: FindingSettings | RuleBook | None = None,
    now: datetime | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    evidence_limit: int | None = MAX_EVIDENCE,
) -> list[Finding]:
    """Findings over the events of ``tenant`` (all, if None) between ``since`` and ``until`` (open if None).
    Revocations and scope use are looked up in the whole history: a use in the window of a credential revoked
    earlier counts, and a scope granted in the window is unused only if nothing used it in ``unused_scope_days``.
    With a ``RuleBook``, each tenant gets its own settings. Each finding lists at most ``evidence_limit`` evidence
    ids (every one if None: detection records them all)."""
    if isinstance(settings, RuleBook):
        book = settings

        def each(scope: str | None, own: FindingSettings) -> list[Finding]:
            return findings(reader, tenant=scope, kinds=kinds, settings=own, now=now, since=since, until=until,
                            evidence_limit=evidence_limit)  # fmt: skip

        if tenant is not None:
            return each(tenant, book.for_tenant(tenant))
        tuned = dict(book.tenants)
        every = [finding for finding in each(None, book.defaults) if finding.tenant not in tuned]
        for name, own in tuned.items():
            every += each(name, own)
        return ordered(every)
    settings = settings or FindingSettings()
    kinds = tuple(kind for kind in kinds if kind not in settings.disabled)
    severity_of = dict(settings.severities)
    params = {
        "tenant": tenant,
        "max_depth": settings.max_delegation_depth,
        "unused_days": settings.unused_scope_days,
        "burst_count": settings.burst_denied,
        "burst_window": timedelta(minutes=settings.burst_window_minutes),
        "revocation_grace": timedelta(seconds=settings.revocation_grace_seconds),
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
            for tenant_of, subject, ids, first, last, detail in connection.execute(sql, bound).fetchall():
                label = title.format(
                    subject=subject,
                    max_depth=settings.max_delegation_depth,
                    unused_days=settings.unused_scope_days,
                )
                results.append(
                    Finding(
                        kind=kind,
                        severity=severity_of.get(kind, severity),
                        tenant=str(tenant_of),
                        subject=str(subject),
                        title=label,
                        owasp=owasp,
                        evidence=list(ids if evidence_limit is None else ids[:evidence_limit]),
                        evidence_total=len(ids),
                        first_seen=_iso(first),
                        last_seen=_iso(last),
                        details={"detail": _plain(detail)},
                    )
                )
    return ordered(results)


def ordered(results: list[Finding]) -> list[Finding]:
    """Most severe first, then by kind, tenant and subject."""
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(results, key=lambda f: (order[f.severity], f.kind, f.tenant, f.subject))


def _literal(bound: datetime) -> str:
    """A datetime as SQL literal text: only digits and ``-:+. T`` can come out of a datetime, never caller text."""
    if not isinstance(bound, datetime):
        raise TypeError(f"a window bound must be a datetime, got {type(bound).__name__}")
    text = bound.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
    assert set(text) <= set("0123456789-:+. "), text
    return text


def _iso(value: Any) -> str | None:
    return rfc3339_us(value) if isinstance(value, datetime) else value


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    return value
