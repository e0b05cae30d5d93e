"""Delegation path: user -> approval -> agents -> tool -> resource for one event, inside its task tree."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import require_session, show_error
from dashboard.evidence import bundle_button
from dashboard.graphs import path_dot
from dashboard.text import md
from store.ground.errors import CustodyError

current = require_session()
st.title("Delegation path")


def move_to_neighbour() -> None:
    st.session_state["event"] = st.session_state["neighbour"]


event_id = st.text_input(
    "Event id", key="event", bind="query-params", placeholder="an event_id, e.g. from Investigate or Findings"
).strip()
if not event_id:
    st.info("Paste an event id, or open an event on the Investigate or Findings page and follow its path link.")
    st.page_link("views/investigate.py", label="Investigate", icon=":material/search:")
    st.stop()

index = data.tree_index(str(current.data_dir))
if index.building:  # the first build after a start reads every file (about a minute at 10M events)
    bar = st.progress(0.0)
    while index.building:
        done, total = index.progress
        text = f"Indexing the task trees: {done:,} of {total:,} files (once per start)"
        bar.progress(done / max(total, 1), text=text)
        time.sleep(0.5)
    bar.empty()
try:
    with st.spinner("Walking the task tree..."):
        path = data.path_of(str(current.data_dir), current.tenant, event_id)
except CustodyError as exc:
    show_error(exc)
    st.stop()

chain = path.chain()
st.markdown(" → ".join(f"**{md(node.kind)}** {md(node.label)}" for node in chain))
event = path.event
st.caption(
    md(
        f"{event['type']} at {event['occurred_at']} (received {event.get('received_at') or 'n/a'}) by emitter"
        f" {event['emitter']} (seq {event['seq']}); decision {event.get('decision_result') or 'n/a'}, outcome"
        f" {event.get('outcome') or 'n/a'}; credential {event.get('credential_id') or 'none'}"
        f" ({event.get('credential_kind') or 'n/a'})"
    )
)
if path.truncated:
    st.warning("The task tree is larger than the page draws; it was cut. The tables list what was read.")
for link in path.crossed_links:
    st.warning(
        f"Not followed: a {md(link['link'])} link from event {md(link['event_id'])} to event"
        f" {md(link['other_event_id'])} of tenant {md(link['other_tenant'])}. Tenants are walls; see the"
        " cross_tenant_link finding."
    )
metrics = st.columns(4)
metrics[0].metric("Ancestors", len(path.ancestors))
metrics[1].metric("Descendants", len(path.descendants))
metrics[2].metric("Nodes", len(path.nodes))
metrics[3].metric("Agents in the chain", sum(1 for node in chain if node.kind == "agent"))

st.graphviz_chart(path_dot(path), width="stretch")
tree = [path.event, *([path.approval] if path.approval else []), *path.ancestors, *path.descendants]
bundle_button(current, [str(e["event_id"]) for e in tree], {"kind": "path", "event": event_id}, key="bundle_path")

neighbours = {e["event_id"]: e for e in [*path.ancestors, *path.descendants]}
if neighbours:
    st.subheader("Move to a neighbour")
    role = {e["event_id"]: "ancestor" for e in path.ancestors} | {e["event_id"]: "descendant" for e in path.descendants}
    st.selectbox(
        "Event in the task tree",
        list(neighbours),
        format_func=lambda i: (
            f"{role[i]}: {neighbours[i]['occurred_at'][:19]} {neighbours[i].get('agent') or ''}"
            f" {neighbours[i].get('tool_name') or neighbours[i]['type']} ({i})"
        ),
        key="neighbour",
    )
    st.button("Open its path", key="open_neighbour", on_click=move_to_neighbour)
    table = pd.DataFrame([{"relation": role[i], **e} for i, e in neighbours.items()])
    columns = ["relation", "occurred_at", "type", "agent", "tool_name", "resource_id", "decision_result", "event_id"]
    st.dataframe(table[[c for c in columns if c in table]], hide_index=True, key="tree_table")
else:
    st.caption("This event has no ancestors or descendants.")

with st.expander("As text (for a ticket)"):
    st.code(path.text(), language=None)
links = [
    ("agent", event.get("agent"), "Blast radius of {} from this event on", ":material/crisis_alert:"),
    ("credential", event.get("credential_id"), "Blast radius of credential {}", ":material/key:"),
]
for column, (kind, subject, label, icon) in zip(st.columns(2), links, strict=True):
    if subject:
        start = event["occurred_at"][:19]
        column.page_link(
            "views/blast.py",
            label=label.format(md(subject)),
            icon=icon,
            query_params={"kind": kind, "subject": subject, "start": start},
        )
