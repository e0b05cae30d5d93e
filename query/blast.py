"""Blast radius: what an identity could reach and what it touched (identity), and what a compromise reached
downstream (forward taint).

Identity blast radius of an agent or credential over a window: scopes granted (from the credentials it held and
the delegations it received) vs scopes used (``required_scope`` of its allowed calls), tools it could reach
(every tool whose required scope it holds, from the tool -> scope map observed in the lake) vs tools it used,
resources, tenants and users, and the agents it delegated to, transitively, with their own reach.

Forward taint from a compromised agent, credential, user session or trace at time T: every later event where it
appears (anywhere in the delegation chain, or as the credential, or the trace), every descendant of those
(``parent_event_id``), and the later events of every agent it delegated to, transitively.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import duckdb
import orjson
import pyarrow.compute as pc

from query.index.reach_copies import COLUMNS, CopyFacts, ReachCopies
from query.lake import LakeReader, sql_paths
from query.search import event_dicts, rfc3339_us
from query.spreadsheet import csv_cell
from store.ground.errors import InvalidInput
from store.ground.layout import SYSTEM_TENANT
from store.lake_files import HIVE_OPTIONS, partition_of_file

__all__ = ["IdentityBlastRadius", "Subject", "Taint", "forward_taint", "identity_blast_radius"]

Subject = Literal["agent", "credential", "user", "trace"]
_MAX_DEPTH = 16
RESOURCE_LIMIT = 1000  # resources listed by default; all of them are counted


@dataclass
class IdentityBlastRadius:
    subject: str
    kind: str
    scopes_granted: list[str]
    scopes_used: dict[str, int]
    scopes_unused: list[str]
    tools_reachable: list[str]
    tools_used: dict[str, int]
    resources: list[dict[str, Any]]
    tenants: list[str]
    users: list[str]
    delegates: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    resources_total: int = 0  # distinct resources touched; ``resources`` lists the most used of them
    resources_truncated: bool = False  # True when ``resources`` lists fewer than ``resources_total``

    def as_json(self) -> dict[str, Any]:
        """Every field, delegates included with their own reach (resources, tenants, users, scopes, tools),
        transitively; with the headline."""
        return {**asdict(self), "headline": self.headline}

    @property
    def headline(self) -> str:
        reach, used = len(self.tools_reachable), len(self.tools_used)
        return (
            f"{self.kind} {self.subject}: could reach {reach} tools, used {used};"
            f" {len(self.scopes_unused)} of {len(self.scopes_granted)} granted scopes never used"
        )


def identity_blast_radius(
    reader: LakeReader,
    kind: Literal["agent", "credential"],
    subject: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    copies: ReachCopies | None = None,
    resource_limit: int | None = RESOURCE_LIMIT,
    _seen: frozenset[str] = frozenset(),
) -> IdentityBlastRadius:
    """``resources`` lists the ``resource_limit`` most used resources (all of them with None), most used first;
    ``resources_total`` counts them all and ``tenants`` covers them all. With ``copies``, files that have a
    current reach copy are read through it (faster; same answer)."""
    if kind not in ("agent", "credential"):
        raise InvalidInput(f"identity blast radius is for an agent or a credential, not {kind!r}")
    if resource_limit is not None and resource_limit < 1:
        raise InvalidInput(f"resource_limit must be at least 1 (or None for all), got {resource_limit}")
    with reader.connect() as connection:
        copied = _reach_views(connection, reader, copies, subject if kind == "agent" else None)
        query = _ReachQuery(connection, kind, subject, since, until, tenant, resource_limit)
        granted = query.granted_scopes(copied)
        activity = query.activity()
        tool_scopes = query.tool_scopes(copied)
        resources, per_tenant = query.resources()
    resources_total = sum(per_tenant.values())
    result = IdentityBlastRadius(
        subject=subject,
        kind=kind,
        scopes_granted=sorted(granted),
        scopes_used=dict(sorted(activity.scopes_used.items())),
        scopes_unused=sorted(granted - set(activity.scopes_used)),
        tools_reachable=sorted({tool for tool, needed in tool_scopes if needed in granted}),
        tools_used=dict(sorted(activity.tools_used.items())),
        resources=resources,
        tenants=sorted(name for name in per_tenant if name),
        users=sorted(activity.users),
        events=activity.events,
        resources_total=resources_total,
        resources_truncated=resources_total > len(resources),
    )
    if kind == "agent" and len(_seen) < _MAX_DEPTH:
        for name in sorted(activity.delegates - _seen - {subject}):
            reach = identity_blast_radius(
                reader,
                "agent",
                name,
                since=since,
                until=until,
                tenant=tenant,
                copies=copies,
                resource_limit=resource_limit,
                _seen=_seen | {subject},
            )
            result.delegates.append({"agent": name, **reach.as_json()})
    return result


@dataclass
class _Activity:
    """What a subject did, from one scan of its events."""

    scopes_used: dict[str, int] = field(default_factory=dict)
    tools_used: dict[str, int] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    delegates: set[str] = field(default_factory=set)
    events: int = 0


class _ReachQuery:
    """The blast radius's questions over the ``reach`` views (``_reach_views``), one SQL query each."""

    def __init__(
        self,
        connection: duckdb.DuckDBPyConnection,
        kind: str,
        subject: str,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        resource_limit: int | None,
    ) -> None:
        self.connection, self.kind, self.tenant, self.resource_limit = connection, kind, tenant, resource_limit
        self.params = {"subject": subject, "since": since, "until": until, "tenant": tenant, "limit": resource_limit}
        self.acting = "agent = $subject" if kind == "agent" else "credential_id = $subject"
        self.window = "($since IS NULL OR occurred_at >= $since) AND ($until IS NULL OR occurred_at < $until)"
        self.scope = "($tenant IS NULL OR tenant = $tenant)"

    def _bound(self, sql: str) -> dict[str, Any]:
        return {name: value for name, value in self.params.items() if f"${name}" in sql}

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, self._bound(sql)).fetchall()

    def granted_scopes(self, copied: list[tuple[str | None, CopyFacts]] | None) -> set[str]:
        """Scopes of every credential the subject presented or held, and (agents) scopes delegated to it. Distinct
        scopes are worked out inside DuckDB: an agent can hold the same scopes on millions of events."""
        acting, scope, window = self.acting, self.scope, self.window
        if copied is None:
            held = "credential_client_id = $subject" if self.kind == "agent" else "credential_id = $subject"
            sql = (
                f"SELECT DISTINCT unnest(credential_scopes) FROM reach WHERE ({held} OR {acting}) AND {scope}"
                f" AND {window} AND credential_scopes IS NOT NULL"
            )
        else:
            # The rows it acted in, and (agents) the rows where it presented a credential another agent acted
            # with: apart, so that the first are read through the copies' sort order.
            sql = (
                f"SELECT DISTINCT unnest(credential_scopes) FROM reach WHERE {acting} AND {scope}"
                f" AND {window} AND credential_scopes IS NOT NULL"
            )
            if self.kind == "agent":
                sql += (
                    " UNION SELECT DISTINCT unnest(credential_scopes) FROM reach_foreign WHERE"
                    f" credential_client_id = $subject AND agent IS DISTINCT FROM $subject AND {scope} AND {window}"
                    " AND credential_scopes IS NOT NULL"
                )
        granted = {name for (name,) in self._rows(sql)}
        if self.kind == "agent":
            granted |= {
                name
                for (name,) in self._rows(
                    f"SELECT DISTINCT unnest(delegate_scopes) FROM reach WHERE type = 'agent.delegation'"
                    f" AND delegate_agent = $subject AND {scope} AND {window}"
                )
            }
        return granted

    def activity(self) -> _Activity:
        """One scan of the subject's events for the scopes and tools it used, the users it acted for, the agents
        it delegated to and its event count: one GROUPING SETS pass, not one scan per question."""
        found = _Activity()
        for by_user, by_delegate, event_type, result, needed, server, name, user, delegate, count in self._rows(
            'SELECT GROUPING("user"), GROUPING(delegate_agent), type, decision_result, decision_required_scope,'
            ' tool_server, tool_name, "user", delegate_agent, count(*)'
            f" FROM reach WHERE {self.acting} AND {self.scope} AND {self.window} GROUP BY GROUPING SETS"
            " ((type, decision_result, decision_required_scope, tool_server, tool_name),"
            ' ("user"), (type, delegate_agent))'
        ):
            if by_user == 0:
                if user is not None:
                    found.users.add(user)
            elif by_delegate == 0:
                if event_type == "agent.delegation" and delegate is not None:
                    found.delegates.add(delegate)
            else:
                found.events += count
                if event_type == "tool.invocation" and result == "allow":
                    if needed is not None:
                        found.scopes_used[needed] = found.scopes_used.get(needed, 0) + count
                    if server is not None and name is not None:  # the schema requires a tool on invocations
                        tool = f"{server}/{name}"
                        found.tools_used[tool] = found.tools_used.get(tool, 0) + count
        return found

    def tool_scopes(self, copied: list[tuple[str | None, CopyFacts]] | None) -> set[tuple[str, str]]:
        """The tool -> required scope map observed in the lake (files with a copy carry theirs in its metadata)."""
        mapped = {
            (f"{server}/{name}", needed)
            for server, name, needed in self._rows(
                f"SELECT DISTINCT tool_server, tool_name, decision_required_scope FROM reach_lake"
                f" WHERE type = 'tool.invocation' AND decision_required_scope IS NOT NULL AND {self.scope}"
            )
        }
        return mapped | {
            (f"{server}/{name}", needed)
            for file_tenant, facts in copied or []
            if self.tenant is None or file_tenant == self.tenant
            for server, name, needed in facts.tool_map
        }

    def resources(self) -> tuple[list[dict[str, Any]], dict[str | None, int]]:
        """The ``resource_limit`` most used resources of its allowed calls, and the count of resources per tenant.
        One grouping of the resources (209k for one agent at 10M events); times are formatted by DuckDB and rows
        come back as Arrow, because a Python datetime per value would cost more than the query."""
        stamp = "strftime({}::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.%fZ')"
        calls = f"type = 'tool.invocation' AND {self.acting} AND {self.scope} AND {self.window}"
        sql = (
            "WITH grouped AS MATERIALIZED (SELECT resource_tenant AS tenant, resource_type AS type,"
            f" resource_id AS id, count(*) AS count, {stamp.format('min(occurred_at)')} AS first,"
            f" {stamp.format('max(occurred_at)')} AS last FROM reach"
            f" WHERE {calls} AND decision_result = 'allow' AND resource_id IS NOT NULL GROUP BY 1, 2, 3)"
            " (SELECT 'resource' AS row, * FROM grouped ORDER BY count DESC, tenant, type, id"
            + (" LIMIT $limit)" if self.resource_limit is not None else ")")
            + " UNION ALL (SELECT 'tenant', tenant, NULL, NULL, count(*), NULL, NULL FROM grouped GROUP BY tenant)"
        )
        table = self.connection.sql(sql, params=self._bound(sql)).to_arrow_table()
        listed = table.filter(pc.equal(table["row"], "resource")).drop_columns(["row"])
        listed = listed.sort_by(
            [("count", "descending"), ("tenant", "ascending"), ("type", "ascending"), ("id", "ascending")]
        )
        per_tenant = table.filter(pc.equal(table["row"], "tenant")).select(["tenant", "count"]).to_pylist()
        return listed.to_pylist(), {row["tenant"]: row["count"] for row in per_tenant}


def _reach_views(
    connection: duckdb.DuckDBPyConnection, reader: LakeReader, copies: ReachCopies | None, client: str | None
) -> list[tuple[str | None, CopyFacts]] | None:
    """Views over the events a blast radius reads: ``reach`` (reach copies where current, lake files for the
    rest), ``reach_lake`` (the lake files part) and ``reach_foreign`` (of ``reach``, the files where ``client``
    presented a credential for another agent, by their copies' metadata); returns each copied file's tenant and
    facts; None (and views over ``events``) without copies."""
    if copies is None or reader.rows is not None:
        for view in ("reach", "reach_lake", "reach_foreign"):
            connection.execute(f"CREATE TEMP VIEW {view} AS SELECT * FROM events")
        return None
    files = [path for path in reader.files() if partition_of_file(path)[0] != SYSTEM_TENANT]
    covered, rest = copies.split(files)
    columns = ", ".join(f'"{name}"' for name in [*COLUMNS, "tenant"])
    lake = (
        f"SELECT {columns} FROM read_parquet([{sql_paths(rest)}], {HIVE_OPTIONS})"
        if rest
        else f"SELECT {columns} FROM events WHERE false"
    )
    connection.execute(f"CREATE TEMP VIEW reach_lake AS {lake}")
    foreign = [copy for copy in covered.values() if client in copies.facts(copy).foreign_clients]
    for view, copied in (("reach", list(covered.values())), ("reach_foreign", foreign)):
        parts = [f"SELECT {columns} FROM read_parquet([{sql_paths(copied)}])"] if copied else []
        connection.execute(
            f"CREATE TEMP VIEW {view} AS " + " UNION ALL BY NAME ".join([*parts, "SELECT * FROM reach_lake"])
        )
    return [(partition_of_file(path)[0], copies.facts(copy)) for path, copy in covered.items()]


@dataclass
class Taint:
    subject: str
    kind: str
    since: str
    events: list[dict[str, Any]]
    summary: dict[str, list[dict[str, Any]]]

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "subject": self.subject,
                "kind": self.kind,
                "since": self.since,
                "summary": self.summary,
                "events": self.events,
            },
            option=orjson.OPT_INDENT_2,
        )

    def as_csv(self) -> str:
        columns = [
            "occurred_at",
            "event_id",
            "tenant",
            "emitter",
            "seq",
            "type",
            "user",
            "agent",
            "delegation_chain",
            "credential_id",
            "tool_name",
            "resource_tenant",
            "resource_type",
            "resource_id",
            "decision_result",
            "outcome",
            "parent_event_id",
            "trace_id",
            "event_hash",
        ]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for event in self.events:
            writer.writerow(
                [csv_cell(" > ".join(event[c] or []) if c == "delegation_chain" else event.get(c)) for c in columns]
            )
        return out.getvalue()


def forward_taint(
    reader: LakeReader, kind: Subject, subject: str, since: datetime, *, tenant: str | None = None
) -> Taint:
    seed_condition = {
        "agent": "list_contains(delegation_chain, ?)",
        "credential": "credential_id = ?",
        "user": "credential_kind = 'user_session' AND \"user\" = ?",
        "trace": "trace_id = ?",
    }.get(kind)
    if seed_condition is None:
        raise InvalidInput(f"taint starts from an agent, credential, user or trace, not {kind!r}")
    found: dict[str, dict[str, Any]] = {}
    with reader.connect() as connection:

        def select(condition: str, params: list[Any]) -> list[dict[str, Any]]:
            return event_dicts(
                connection.execute(
                    f"SELECT * EXCLUDE (jws) FROM events WHERE {condition} AND occurred_at >= ?"
                    " AND (? IS NULL OR tenant = ?)",
                    [*params, since, tenant, tenant],
                )
            )

        # Taint spreads within a tenant: to the children an event's own tenant posted, and to the later events of
        # an agent it delegated to in that tenant. (tenant, name) and "tenant event-id" keys keep the walls.
        agents_done: set[tuple[str, str]] = set()
        frontier = select(seed_condition, [subject])
        agents = {(e["tenant"], subject) for e in frontier} if kind == "agent" else set()
        while frontier or agents:
            for event in frontier:
                found.setdefault(event["event_id"], event)
            delegated = {
                (e["tenant"], e["delegate_agent"])
                for e in frontier
                if e["type"] == "agent.delegation" and e["delegate_agent"]
            }
            agents = (delegated | agents) - agents_done
            agents_done.update(agents)
            keys = [f"{e['tenant']} {e['event_id']}" for e in frontier]
            frontier = [
                e
                for e in select("list_contains(?, tenant || ' ' || parent_event_id)", [keys])
                if e["event_id"] not in found
            ]
            for agent_tenant, agent in sorted(agents):
                frontier += [
                    e
                    for e in select("list_contains(delegation_chain, ?) AND tenant = ?", [agent, agent_tenant])
                    if e["event_id"] not in found
                ]
            agents = set()
    events = sorted(found.values(), key=lambda e: (e["occurred_at"], e["emitter"], e["seq"]))
    return Taint(subject, kind, _iso(since) or "", events, _summarise(events))


def _summarise(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    keys: dict[str, Callable[[dict[str, Any]], Any]] = {
        "tool": lambda e: e.get("tool_name") and f"{e['tool_server']}/{e['tool_name']}",
        "resource": lambda e: (
            e.get("resource_id") and f"{e['resource_tenant']}/{e['resource_type']}/{e['resource_id']}"
        ),
        "tenant": lambda e: e.get("resource_tenant") or e.get("tenant"),
        "user": lambda e: e.get("user"),
        "agent": lambda e: e.get("agent"),
        "decision": lambda e: e.get("decision_result"),
    }
    summary = {}
    for name, key in keys.items():
        groups: dict[str, dict[str, Any]] = {}
        for event in events:
            value = key(event)
            if not value:
                continue
            group = groups.setdefault(
                value, {name: value, "events": 0, "first": event["occurred_at"], "last": event["occurred_at"]}
            )
            group["events"] += 1
            group["first"] = min(group["first"], event["occurred_at"])
            group["last"] = max(group["last"], event["occurred_at"])
        summary[name] = sorted(groups.values(), key=lambda g: (-g["events"], g[name]))
    return summary


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return rfc3339_us(value)
    return str(value)
