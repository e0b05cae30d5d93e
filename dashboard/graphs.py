"""Graphviz (DOT) pictures of a delegation path and of a blast radius, drawn by the browser (``st.graphviz_chart``).

Every label comes from the log, so from emitters: it is always written as a quoted DOT string with quotes,
backslashes and line breaks escaped, never as an HTML-like label. Large graphs stay readable: left-to-right ranks,
one colour and shape per node kind, and at most ``MAX_LEAVES`` leaves per kind (the tables list all of them).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import altair as alt

from query.blast import Taint
from query.paths import DelegationPath

__all__ = ["MAX_LEAVES", "path_dot", "scope_chart", "scope_rows", "taint_dot"]

MAX_LEAVES = 25
_STYLE = {
    "user": 'shape=box style="rounded,filled" fillcolor="#dbeafe"',
    "approval": 'shape=note style=filled fillcolor="#fef9c3"',
    "agent": 'shape=box style="rounded,filled" fillcolor="#ede9fe"',
    "tool": 'shape=component style=filled fillcolor="#dcfce7"',
    "resource": 'shape=cylinder style=filled fillcolor="#fee2e2"',
    "event": 'shape=ellipse style=filled fillcolor="#f3f4f6" fontsize=10',
    "tenant": 'shape=folder style=filled fillcolor="#fde68a"',
    "more": 'shape=plaintext fontcolor="#6b7280"',
}


def quote(text: str) -> str:
    """A DOT quoted string: nothing in ``text`` can end it or start an HTML label."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "")
    return f'"{escaped}"'


def path_dot(path: DelegationPath) -> str:
    """The path of the event (bold) and its task tree: who acted for whom, what each event touched."""
    focus = {node.id for node in path.chain()} | {f"event:{path.event['event_id']}"}
    lines = ["digraph path {", "  rankdir=LR; node [fontname=Helvetica fontsize=11]; edge [fontsize=9];"]
    for node in path.nodes:
        width = " penwidth=2.5" if node.id in focus else ""
        lines.append(f"  {quote(node.id)} [label={quote(f'{node.kind}: {node.label}')} {_STYLE[node.kind]}{width}];")
    merged: dict[tuple[str, str, str], int] = defaultdict(int)  # one arrow per relation, however many events
    for edge in path.edges:
        merged[(edge.source, edge.target, edge.kind)] += 1
    for (source, target, kind), count in merged.items():
        bold = " penwidth=2.5" if source in focus and target in focus else ""
        label = kind if count == 1 else f"{kind} x{count}"
        lines.append(f"  {quote(source)} -> {quote(target)} [label={quote(label)}{bold}];")
    lines.append("}")
    return "\n".join(lines)


def taint_dot(taint: Taint) -> str:
    """Subject -> agents that acted -> tools -> resources, each edge with its event count; denied edges dashed."""
    root = f"{taint.kind}:{taint.subject}"
    edges: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # allowed, denied
    kinds: dict[str, str] = {root: "agent" if taint.kind == "agent" else "user"}
    for event in taint.events:
        agent = f"agent:{event['agent']}" if event.get("agent") else root
        kinds.setdefault(agent, "agent")
        steps: list[str] = [root, agent] if agent != root else [root]
        if event.get("type") == "agent.delegation" and event.get("delegate_agent"):
            steps.append(f"agent:{event['delegate_agent']}")
            kinds.setdefault(steps[-1], "agent")
        if event.get("tool_name"):
            steps.append(f"tool:{event['tool_server']}/{event['tool_name']}")
            kinds.setdefault(steps[-1], "tool")
        if event.get("resource_id"):
            steps.append(f"resource:{event['resource_tenant']}/{event['resource_type']}/{event['resource_id']}")
            kinds.setdefault(steps[-1], "resource")
        denied = event.get("decision_result") == "deny"
        for source, target in itertools.pairwise(steps):
            edges[(source, target)][1 if denied else 0] += 1
    shown = _capped(kinds, edges)
    lines = ["digraph reach {", "  rankdir=LR; node [fontname=Helvetica fontsize=11]; edge [fontsize=9];"]
    for node, kind in kinds.items():
        if node in shown:
            label = node.split(":", 1)[1]
            width = " penwidth=2.5" if node == root else ""
            lines.append(f"  {quote(node)} [label={quote(f'{kind}: {label}')} {_STYLE[kind]}{width}];")
    for kind, hidden in _hidden_counts(kinds, shown).items():
        lines.append(
            f"  {quote('more:' + kind)} [label={quote(f'+{hidden} more {kind}s (see tables)')} {_STYLE['more']}];"
        )
    for (source, target), (allowed, denied) in sorted(edges.items()):
        if source in shown and target in shown:
            label = f"{allowed}" + (f" (+{denied} denied)" if denied else "")
            style = " style=dashed color=red" if denied and not allowed else ""
            lines.append(f"  {quote(source)} -> {quote(target)} [label={quote(label)}{style}];")
    lines.append("}")
    return "\n".join(lines)


def _capped(kinds: dict[str, str], edges: dict[tuple[str, str], list[int]]) -> set[str]:
    """The busiest MAX_LEAVES nodes of each kind (by events through them), plus everything else."""
    weight: dict[str, int] = defaultdict(int)
    for (source, target), counts in edges.items():
        weight[source] += sum(counts)
        weight[target] += sum(counts)
    shown: set[str] = set()
    for kind in set(kinds.values()):
        members = sorted((node for node, k in kinds.items() if k == kind), key=lambda n: (-weight[n], n))
        shown.update(members[:MAX_LEAVES])
    return shown


def _hidden_counts(kinds: dict[str, str], shown: Iterable[str]) -> dict[str, int]:
    visible = set(shown)
    hidden: dict[str, int] = defaultdict(int)
    for node, kind in kinds.items():
        if node not in visible:
            hidden[kind] += 1
    return dict(hidden)


def event_fields(event: dict[str, Any]) -> list[tuple[str, str]]:
    """Every field of an event as (name, text) rows for a two-column table; empty fields left out."""
    return [(name, _text(value)) for name, value in event.items() if value not in (None, [], "")]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " > ".join(str(item) for item in value)
    return str(value)


SCOPE_STATUS = {"granted, used": "#16a34a", "granted, never used": "#dc2626", "used, not granted": "#f59e0b"}


def scope_rows(granted: list[str], used: dict[str, int]) -> list[dict[str, Any]]:
    """One row per scope: its status and its allowed calls (unused scopes are the over-privilege)."""
    rows = [
        {
            "scope": scope,
            "uses": used.get(scope, 0),
            "status": "granted, used" if scope in used else "granted, never used",
        }
        for scope in granted
    ]
    rows += [{"scope": s, "uses": n, "status": "used, not granted"} for s, n in used.items() if s not in granted]
    for row in rows:
        row["label"] = "never used" if row["uses"] == 0 else str(row["uses"])
    return rows


def scope_chart(rows: Any) -> alt.LayerChart | alt.FacetChart:
    """Granted vs used scopes as horizontal bars; a never-used scope shows as a red 'never used' at zero."""
    colour = alt.Color(
        "status:N", scale=alt.Scale(domain=list(SCOPE_STATUS), range=list(SCOPE_STATUS.values())), title=None
    )
    base = alt.Chart(rows).encode(y=alt.Y("scope:N", sort="-x", title=None), color=colour)
    bars = base.mark_bar().encode(x=alt.X("uses:Q", title="allowed calls in the window"))
    labels = base.mark_text(align="left", dx=4).encode(x="uses:Q", text="label:N")
    return alt.layer(bars, labels).properties(height=max(80, 28 * len(rows)))
