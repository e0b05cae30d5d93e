"""The delegation path of an event: who authorised it, through which agents, with which credential, to what.

For one event: user -> approval -> first agent -> ... -> acting agent -> tool -> resource. Around it, the task
tree: its ancestors through ``parent_event_id`` up to the root and all its descendants, across emitters (a
sub-agent's gateway is often not its parent's). Returned as a typed graph (nodes: user, approval, agent, tool,
resource, event; edges carry the event id and time) and as text.

Tenants are walls: a parent, child or approval is followed only within the event's own tenant. A link to another
tenant's event (a parent or approval id that only another tenant has, a child another tenant posted) is never
followed; it is listed in ``crossed_links`` (when the caller may see both tenants) and reported by the
``cross_tenant_link`` finding. Of several approvals with one id in a tenant, the one the server received first
counts: an emitter's clock (``occurred_at``, which it signs) cannot displace it by backdating another.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from query.lake import LakeReader
from query.search import event_dicts
from store.ground.errors import NotFound

__all__ = ["DelegationPath", "Edge", "Node", "delegation_path"]

MAX_TREE_EVENTS = 5000


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    label: str


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str
    event_id: str
    at: str


@dataclass
class DelegationPath:
    event: dict[str, Any]
    approval: dict[str, Any] | None
    ancestors: list[dict[str, Any]]
    descendants: list[dict[str, Any]]
    truncated: bool
    crossed_links: list[dict[str, str]] = field(default_factory=list)  # links to other tenants, not followed
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """What the read API, the CLI and the dashboard give for a path: the graph and the text, one shape."""
        return {
            "event": self.event,
            "approval": self.approval,
            "ancestors": self.ancestors,
            "descendants": self.descendants,
            "truncated": self.truncated,
            "crossed_links": self.crossed_links,
            "text": self.text(),
            "chain": [asdict(node) for node in self.chain()],
            "nodes": [asdict(node) for node in self.nodes],
            "edges": [asdict(edge) for edge in self.edges],
        }

    def chain(self) -> list[Node]:
        """The path of the event itself, in order: user, approval, agents, tool, resource."""
        return _chain_nodes(self.event, self.approval)

    def text(self) -> str:
        lines = [" -> ".join(f"{node.kind} {node.label}" for node in self.chain())]
        event = self.event
        lines.append(
            f"event {event['event_id']} ({event['type']}, {event['occurred_at']}, received {event.get('received_at')},"
            f" {event['emitter']} seq"
            f" {event['seq']}): decision {event.get('decision_result')}, outcome {event.get('outcome')},"
            f" credential {event.get('credential_id')} ({event.get('credential_kind')})"
        )
        for label, events in (("ancestors", self.ancestors), ("descendants", self.descendants)):
            lines.append(f"{label}: {len(events)}")
            lines += [f"  {_one_line(item)}" for item in events]
        if self.truncated:
            lines.append(f"the task tree was cut at {MAX_TREE_EVENTS} events")
        for link in self.crossed_links:
            lines.append(
                f"not followed: {link['link']} link to tenant {link['other_tenant']} (event {link['other_event_id']})"
            )
        return "\n".join(lines)


def delegation_path(reader: LakeReader, event_id: str, *, tenant: str | None = None) -> DelegationPath:
    with reader.connect() as connection:
        source: _Source = _SqlSource(connection, tenant) if reader.rows is None else _RowsSource(connection, tenant)
        candidates = source.all_with_id(event_id)
        if not candidates:
            raise NotFound(f"no event {event_id}" + (f" in tenant {tenant}" if tenant else ""))
        event = candidates[0]
        own = event["tenant"]
        crossed: list[dict[str, str]] = []

        def cross(link: str, rows: list[dict[str, Any]], via: dict[str, Any]) -> list[dict[str, Any]]:
            """The rows of the event's own tenant; the others are noted and never followed."""
            for row in rows:
                if row["tenant"] != own:
                    crossed.append(
                        {"link": link, "event_id": via["event_id"], "other_tenant": row["tenant"],
                         "other_event_id": row["event_id"]}
                    )  # fmt: skip
            return [row for row in rows if row["tenant"] == own]

        ancestors: list[dict[str, Any]] = []
        parent_id, seen, child = event.get("parent_event_id"), {event_id}, event
        while parent_id and parent_id not in seen and len(ancestors) < MAX_TREE_EVENTS:
            seen.add(parent_id)
            parents = cross("parent", source.all_with_id(parent_id), child)
            if not parents:
                break
            child = parents[0]
            ancestors.insert(0, child)
            parent_id = child.get("parent_event_id")
        descendants: list[dict[str, Any]] = []
        frontier, truncated = [event], False
        while frontier:
            by_parent = {row["event_id"]: row for row in frontier}
            children = []
            for row in source.children(list(by_parent)):
                if row["event_id"] in seen:
                    continue
                if row["tenant"] == own:
                    children.append(row)
                else:
                    cross("child", [row], by_parent[row["parent_event_id"]])
            seen.update(row["event_id"] for row in children)
            if len(descendants) + len(children) > MAX_TREE_EVENTS:
                children, truncated = children[: MAX_TREE_EVENTS - len(descendants)], True
            descendants += children
            frontier = [] if truncated else children
        approval = None
        if event.get("approval_id"):
            approvals = source.approvals(event["approval_id"])
            own_approvals = [row for row in approvals if row["tenant"] == own]
            # Approval ids are chosen by people ("appr-1"): the same id in two tenants is no link unless the
            # event's own tenant has no such approval.
            approval = own_approvals[0] if own_approvals else None
            if not own_approvals:
                cross("approval", approvals, event)
    path = DelegationPath(event, approval, ancestors, descendants, truncated, crossed)
    _build_graph(path)
    return path


class _Source(Protocol):
    def all_with_id(self, event_id: str) -> list[dict[str, Any]]: ...

    def children(self, parents: list[str]) -> list[dict[str, Any]]: ...

    def approvals(self, approval_id: str) -> list[dict[str, Any]]: ...


# The order in which approvals with one id count: first received by the server, then by the emitter's clock.
_APPROVAL_ORDER = "received_at, occurred_at, emitter, seq"


class _SqlSource:
    """The lake through DuckDB: one query per lookup."""

    def __init__(self, connection: Any, tenant: str | None) -> None:
        self.connection, self.tenant = connection, tenant

    def _rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return event_dicts(self.connection.execute(sql, [*params, self.tenant, self.tenant]))

    def all_with_id(self, event_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE event_id = ? AND (? IS NULL OR tenant = ?) ORDER BY received_at",
            event_id,
        )

    def children(self, parents: list[str]) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE list_contains(?, parent_event_id)"
            " AND (? IS NULL OR tenant = ?) ORDER BY occurred_at, emitter, seq",
            parents,
        )

    def approvals(self, approval_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE type = 'task.approval' AND approval_id = ?"
            f" AND (? IS NULL OR tenant = ?) ORDER BY {_APPROVAL_ORDER}",
            approval_id,
        )


class _RowsSource:
    """The few rows the task-tree index selected, read once and looked up in Python with the same meaning as
    ``_SqlSource`` (DuckDB's per-query overhead, ~5 ms over a wide view, would dominate a path of a few rows).
    Timestamps are fixed-width RFC 3339 strings, so string order is time order. Lookups go through dicts: a tree
    can hold thousands of rows, and a path looks up each ancestor and each level of descendants."""

    def __init__(self, connection: Any, tenant: str | None) -> None:
        rows = event_dicts(
            connection.execute(
                "SELECT * EXCLUDE (jws) FROM events WHERE (? IS NULL OR tenant = ?) ORDER BY occurred_at, emitter, seq",
                [tenant, tenant],
            )
        )
        self.by_id: dict[str, list[dict[str, Any]]] = {}
        self.by_parent: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # in (occurred_at, emitter, seq) order
        self.by_approval: dict[str, list[dict[str, Any]]] = {}
        for position, row in enumerate(rows):
            self.by_id.setdefault(row["event_id"], []).append(row)
            if row.get("parent_event_id"):
                self.by_parent.setdefault(row["parent_event_id"], []).append((position, row))
            if row["type"] == "task.approval" and row.get("approval_id"):
                self.by_approval.setdefault(row["approval_id"], []).append(row)

    def all_with_id(self, event_id: str) -> list[dict[str, Any]]:
        return sorted(self.by_id.get(event_id, []), key=lambda row: row["received_at"] or "")

    def children(self, parents: list[str]) -> list[dict[str, Any]]:
        found = [child for parent in set(parents) for child in self.by_parent.get(parent, [])]
        return [row for _, row in sorted(found, key=lambda child: child[0])]

    def approvals(self, approval_id: str) -> list[dict[str, Any]]:
        return sorted(
            self.by_approval.get(approval_id, []),
            key=lambda row: (row["received_at"] or "", row["occurred_at"], row["emitter"], row["seq"]),
        )


def _chain_nodes(event: dict[str, Any], approval: dict[str, Any] | None) -> list[Node]:
    chain = event.get("delegation_chain") or []
    nodes = []
    if chain:
        nodes.append(Node(f"user:{chain[0]}", "user", chain[0]))
    if event.get("approval_id"):
        approver = f" by {approval['approval_approved_by']}" if approval else ""
        nodes.append(Node(f"approval:{event['approval_id']}", "approval", f"{event['approval_id']}{approver}"))
    nodes += [Node(f"agent:{agent}", "agent", agent) for agent in chain[1:]]
    if event.get("tool_name"):
        nodes.append(
            Node(
                f"tool:{event['tool_server']}/{event['tool_name']}",
                "tool",
                f"{event['tool_name']} ({event['tool_server']})",
            )
        )
    if event.get("resource_id"):
        label = f"{event['resource_type']} {event['resource_id']} ({event['resource_tenant']})"
        nodes.append(
            Node(
                f"resource:{event['resource_tenant']}/{event['resource_type']}/{event['resource_id']}",
                "resource",
                label,
            )
        )
    return nodes


_EDGE_KIND = {"approval": "approved", "agent": "delegated", "tool": "invoked", "resource": "accessed"}


def _build_graph(path: DelegationPath) -> None:
    nodes: dict[str, Node] = {}
    edges: dict[tuple[str, str, str, str], Edge] = {}
    for event in [*path.ancestors, path.event, *path.descendants]:
        approval = path.approval if event is path.event else None
        chain = _chain_nodes(event, approval)
        event_node = Node(f"event:{event['event_id']}", "event", f"{event['type']} {event['event_id'][:8]}")
        for node in [*chain, event_node]:
            nodes.setdefault(node.id, node)
        for source, target in itertools.pairwise(chain):
            kind = "acted_for" if target.kind == "agent" and source.kind == "user" else _EDGE_KIND[target.kind]
            edge = Edge(source.id, target.id, kind, event["event_id"], event["occurred_at"])
            edges.setdefault((edge.source, edge.target, edge.kind, edge.event_id), edge)
        if event.get("parent_event_id") and f"event:{event['parent_event_id']}" in nodes | {event_node.id: event_node}:
            edge = Edge(
                f"event:{event['parent_event_id']}", event_node.id, "caused", event["event_id"], event["occurred_at"]
            )
            edges.setdefault((edge.source, edge.target, edge.kind, edge.event_id), edge)
        actor = chain_actor(event)
        if actor is not None:
            edge = Edge(actor, event_node.id, "performed", event["event_id"], event["occurred_at"])
            edges.setdefault((edge.source, edge.target, edge.kind, edge.event_id), edge)
    path.nodes = list(nodes.values())
    path.edges = list(edges.values())


def chain_actor(event: dict[str, Any]) -> str | None:
    if event.get("agent"):
        return f"agent:{event['agent']}"
    if event.get("user"):
        return f"user:{event['user']}"
    return None


def _one_line(event: dict[str, Any]) -> str:
    chain = " > ".join(event.get("delegation_chain") or [])
    target = f"{event.get('tool_name') or event['type']} {event.get('resource_id') or ''}".strip()
    return (
        f"{event['occurred_at']} (received {event.get('received_at')}) {event['event_id']} [{chain}] {target}"
        f" {event.get('decision_result') or ''}"
    )
