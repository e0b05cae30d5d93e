"""The delegation path of an event: who authorised it, through which agents, with which credential, to what.

For one event: user -> approval -> first agent -> ... -> acting agent -> tool -> resource. Around it, the task
tree: its ancestors through ``parent_event_id`` up to the root and all its descendants, across emitters (a
sub-agent's gateway is often not its parent's). Returned as a typed graph (nodes: user, approval, agent, tool,
resource, event; edges carry the event id and time) and as text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

from query.lake import LakeReader
from query.search import event_dicts
from store.errors import NotFound

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
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def chain(self) -> list[Node]:
        """The path of the event itself, in order: user, approval, agents, tool, resource."""
        return _chain_nodes(self.event, self.approval)

    def text(self) -> str:
        lines = [" -> ".join(f"{node.kind} {node.label}" for node in self.chain())]
        event = self.event
        lines.append(
            f"event {event['event_id']} ({event['type']}, {event['occurred_at']}, {event['emitter']} seq"
            f" {event['seq']}): decision {event.get('decision_result')}, outcome {event.get('outcome')},"
            f" credential {event.get('credential_id')} ({event.get('credential_kind')})"
        )
        for label, events in (("ancestors", self.ancestors), ("descendants", self.descendants)):
            lines.append(f"{label}: {len(events)}")
            lines += [f"  {_one_line(item)}" for item in events]
        if self.truncated:
            lines.append(f"the task tree was cut at {MAX_TREE_EVENTS} events")
        return "\n".join(lines)


def delegation_path(reader: LakeReader, event_id: str, *, tenant: str | None = None) -> DelegationPath:
    with reader.connect() as connection:
        source: _Source = _SqlSource(connection, tenant) if reader.rows is None else _RowsSource(connection, tenant)
        event = source.one(event_id)
        if event is None:
            raise NotFound(f"no event {event_id}" + (f" in tenant {tenant}" if tenant else ""))
        ancestors: list[dict[str, Any]] = []
        parent_id, seen = event.get("parent_event_id"), {event_id}
        while parent_id and parent_id not in seen and len(ancestors) < MAX_TREE_EVENTS:
            seen.add(parent_id)
            parent = source.one(parent_id)
            if parent is None:
                break
            ancestors.insert(0, parent)
            parent_id = parent.get("parent_event_id")
        descendants: list[dict[str, Any]] = []
        frontier, truncated = [event_id], False
        while frontier:
            children = [child for child in source.children(frontier) if child["event_id"] not in seen]
            seen.update(child["event_id"] for child in children)
            if len(descendants) + len(children) > MAX_TREE_EVENTS:
                children, truncated = children[: MAX_TREE_EVENTS - len(descendants)], True
            descendants += children
            frontier = [] if truncated else [child["event_id"] for child in children]
        approval = source.approval(event["approval_id"]) if event.get("approval_id") else None
    path = DelegationPath(event, approval, ancestors, descendants, truncated)
    _build_graph(path)
    return path


class _Source(Protocol):
    def one(self, event_id: str) -> dict[str, Any] | None: ...

    def children(self, parents: list[str]) -> list[dict[str, Any]]: ...

    def approval(self, approval_id: str) -> dict[str, Any] | None: ...


class _SqlSource:
    """The lake through DuckDB: one query per lookup."""

    def __init__(self, connection: Any, tenant: str | None) -> None:
        self.connection, self.tenant = connection, tenant

    def _rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return event_dicts(self.connection.execute(sql, [*params, self.tenant, self.tenant]))

    def one(self, event_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE event_id = ? AND (? IS NULL OR tenant = ?)", event_id
        )
        return rows[0] if rows else None

    def children(self, parents: list[str]) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE list_contains(?, parent_event_id)"
            " AND (? IS NULL OR tenant = ?) ORDER BY occurred_at, emitter, seq",
            parents,
        )

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT * EXCLUDE (jws) FROM events WHERE type = 'task.approval' AND approval_id = ?"
            " AND (? IS NULL OR tenant = ?) ORDER BY occurred_at LIMIT 1",
            approval_id,
        )
        return rows[0] if rows else None


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
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_parent: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # in (occurred_at, emitter, seq) order
        self.approvals: dict[str, dict[str, Any]] = {}
        for position, row in enumerate(rows):
            self.by_id.setdefault(row["event_id"], row)
            if row.get("parent_event_id"):
                self.by_parent.setdefault(row["parent_event_id"], []).append((position, row))
            if row["type"] == "task.approval" and row.get("approval_id"):
                self.approvals.setdefault(row["approval_id"], row)

    def one(self, event_id: str) -> dict[str, Any] | None:
        return self.by_id.get(event_id)

    def children(self, parents: list[str]) -> list[dict[str, Any]]:
        found = [child for parent in set(parents) for child in self.by_parent.get(parent, [])]
        return [row for _, row in sorted(found, key=lambda child: child[0])]

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        return self.approvals.get(approval_id)


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
    return f"{event['occurred_at']} {event['event_id']} [{chain}] {target} {event.get('decision_result') or ''}"
