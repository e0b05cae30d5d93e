"""Investigate: filter the timeline, page through it, open one event (all fields, hash and signature status)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import require_session, time_window
from dashboard.graphs import event_fields
from dashboard.text import md
from query.search import EventFilter

PAGE_SIZES = [10, 50, 200]
TIMELINE_COLUMNS = [
    "occurred_at",
    "received_at",
    "tenant",
    "type",
    "user",
    "agent",
    "tool_name",
    "resource_id",
    "decision_result",
    "outcome",
    "credential_id",
    "emitter",
    "seq",
    "event_id",
]

current = require_session()
root = str(current.data_dir)
st.title("Investigate")
since, until = time_window()


def picker(label: str, column: str, *, key: str) -> str | None:
    """A filter kept in the URL (``?key=value``); lists values seen in the window, and accepts any other."""
    options = data.choices(root, current.tenant, column, since)
    value = st.selectbox(
        label, options, index=None, key=key, bind="query-params", accept_new_options=True, placeholder="any"
    )
    return value or None


with st.container(border=True):
    row = st.columns(4)
    with row[0]:
        if current.tenant is None:
            tenant = picker("Tenant", "tenant", key="tenant")
        else:
            tenant = current.tenant
            st.text_input("Tenant", tenant, disabled=True, key="tenant_fixed")
    with row[1]:
        user = picker("User", "user", key="user")
    with row[2]:
        agent = picker("Agent (anywhere in the chain)", "agent", key="agent")
    with row[3]:
        credential = picker("Credential", "credential", key="credential")
    row = st.columns(4)
    with row[0]:
        tool = picker("Tool", "tool", key="tool")
    with row[1]:
        resource = st.text_input("Resource id", key="resource", bind="query-params") or None
    with row[2]:
        decision = st.selectbox(
            "Decision", ["allow", "deny"], index=None, key="decision", bind="query-params", placeholder="any"
        )
    with row[3]:
        outcome = picker("Outcome", "outcome", key="outcome")

where = EventFilter(
    tenant=tenant,
    since=since,
    until=until,
    user=user,
    agent=agent,
    credential=credential,
    tool=tool,
    resource=resource,
    decision=decision,
    outcome=outcome,
)
page_size = st.selectbox("Rows per page", PAGE_SIZES, index=1, key="page_size")
# Paging: a stack of cursors per filter; a new filter starts at the first page again.
if st.session_state.get("pages_for") != (where, page_size):
    st.session_state["pages_for"], st.session_state["cursors"] = (where, page_size), [None]
cursors: list[str | None] = st.session_state["cursors"]
with st.spinner("Searching..."):
    page = data.find_events(root, where, page_size, cursors[-1])

first = (len(cursors) - 1) * page_size
shown = f"{first + 1:,}-{first + len(page.events):,}" if page.events else "0"
st.markdown(f"**{page.total:,} events** match; showing {shown}, newest first.")
buttons = st.columns([1, 1, 6])
if buttons[0].button("Newer", key="newer", disabled=len(cursors) == 1):
    cursors.pop()
    st.rerun()
if buttons[1].button("Older", key="older", disabled=page.next_cursor is None):
    cursors.append(page.next_cursor)
    st.rerun()

if not page.events:
    st.info("No event matches. Widen the time window or clear a filter.")
    st.stop()

frame = pd.DataFrame(page.events)
st.dataframe(frame[[c for c in TIMELINE_COLUMNS if c in frame]], hide_index=True, key="timeline")

st.subheader("Event")
labels = {
    event["event_id"]: f"{event['occurred_at'][:19]}  {event.get('agent') or event.get('user') or ''}"
    f"  {event.get('tool_name') or event['type']}  {event.get('decision_result') or ''}  ({event['event_id']})"
    for event in page.events
}
chosen = st.selectbox("Open an event of this page", list(labels), format_func=labels.__getitem__, key="event_pick")
event = next(e for e in page.events if e["event_id"] == chosen)
problems = data.event_check(root, current.tenant, chosen, event.get("date"))
left, right = st.columns([2, 1])
with left:
    st.dataframe(pd.DataFrame(event_fields(event), columns=["field", "value"]), hide_index=True, key="event_fields")
with right:
    if problems is None:
        st.warning("This event is no longer in the lake.")
    elif problems:
        st.error("Integrity check failed")
        for problem in problems:
            st.markdown(f"- **{md(problem.check)}**: expected {md(problem.expected)}, found {md(problem.actual)}")
    else:
        st.success("Hash, signature, columns and chain link verified")
        st.caption(f"event_hash {md(event['event_hash'])}, signed with key {md(event['kid'])}")
    st.page_link(
        "views/path.py",
        label="Open its delegation path",
        icon=":material/account_tree:",
        query_params={"event": chosen},
    )
