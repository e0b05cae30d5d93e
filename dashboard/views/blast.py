"""Blast radius: everything a compromised agent, credential, user session or trace reached from a start time on,
and for an agent or credential, what it was granted against what it used."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import now, require_session, show_error
from dashboard.evidence import bundle_button
from dashboard.graphs import scope_chart, scope_rows, taint_dot
from dashboard.text import md
from query.blast import Subject
from store.ground.errors import CustodyError

KINDS = {"agent": "Agent", "credential": "Credential", "user": "User session", "trace": "Trace"}
CHOICE_COLUMN = {"agent": "agent", "credential": "credential", "user": "user", "trace": "trace"}

current = require_session()
root = str(current.data_dir)
st.title("Blast radius")

row = st.columns([1, 2, 1])
with row[0]:
    kind = st.radio("Compromised", list(KINDS), format_func=KINDS.__getitem__, key="kind", bind="query-params")
with row[1]:
    options = data.choices(root, current.tenant, CHOICE_COLUMN[kind], None)
    subject = st.selectbox(
        KINDS[kind], options, index=None, key="subject", bind="query-params", accept_new_options=True
    )
with row[2]:
    start_text = st.text_input(
        "From (UTC)", key="start", bind="query-params", placeholder="YYYY-MM-DDTHH:MM:SS (default: 24 h ago)"
    ).strip()

if not subject:
    st.info("Choose what was compromised (an agent, a credential, a user session or a trace) and when.")
    st.stop()
try:
    start = (
        datetime.fromisoformat(start_text.removesuffix("Z")).replace(tzinfo=UTC)
        if start_text
        else now().replace(second=0, microsecond=0) - timedelta(hours=24)
    )
except ValueError:
    st.error(f"'From' must be a time like 2026-11-29T08:00:00, not {md(repr(start_text))}.")
    st.stop()

try:
    with st.spinner(f"Following {md(subject)} and everything downstream of it..."):
        taint = data.taint_of(root, current.tenant, cast(Subject, kind), subject, start)
        reach = (
            data.blast_radius(root, current.tenant, kind, subject, start) if kind in ("agent", "credential") else None
        )
except CustodyError as exc:
    show_error(exc)
    st.stop()

if not taint.events and (reach is None or reach.events == 0):
    where = f" in tenant {md(current.tenant)}" if current.tenant else ""
    st.info(
        f"No event involves {KINDS[kind].lower()} {md(subject)}{where} from {start:%Y-%m-%d %H:%M} UTC on."
        " Check the name, or try an earlier start time."
    )
    st.stop()
summary = taint.summary
metrics = st.columns(6)
metrics[0].metric("Events affected", f"{len(taint.events):,}")
for column, name in zip(metrics[1:], ("tool", "resource", "tenant", "user", "agent"), strict=True):
    column.metric(f"{name.capitalize()}s", len(summary[name]))
if not taint.events:
    st.info(f"{md(subject)} took no action from {start:%Y-%m-%d %H:%M} UTC on; its grants are below.")

if reach is not None:
    st.subheader("Granted vs used")
    st.markdown(f"**{md(reach.headline)}**")
    scopes = pd.DataFrame(scope_rows(reach.scopes_granted, reach.scopes_used))
    if not scopes.empty:
        st.altair_chart(scope_chart(scopes), key="scope_chart")
    left, right = st.columns(2)
    left.metric("Tools reachable", len(reach.tools_reachable))
    right.metric("Tools used", len(reach.tools_used))
    with st.expander(f"{len(reach.scopes_unused)} unused scopes and {len(reach.tools_reachable)} reachable tools"):
        st.write({"unused scopes": reach.scopes_unused, "reachable tools": reach.tools_reachable})
    if reach.delegates:
        st.caption("Delegated to: " + "; ".join(md(d["headline"]) for d in reach.delegates))

if taint.events:
    st.subheader("Reach")
    st.graphviz_chart(taint_dot(taint), width="stretch")
    tabs = st.tabs([name.capitalize() + "s" for name in ("tool", "resource", "tenant", "user", "agent", "decision")])
    for tab, name in zip(tabs, ("tool", "resource", "tenant", "user", "agent", "decision"), strict=True):
        with tab:
            st.dataframe(pd.DataFrame(summary[name]), hide_index=True, key=f"affected_{name}")
    st.subheader("Evidence")
    downloads = st.columns(3)
    stem = f"blast-radius-{kind}-{subject}-{start:%Y%m%dT%H%M}".replace("/", "_")
    with downloads[2]:
        selection = {"kind": "taint", "subject": f"{kind}:{subject}", "since": f"{start:%Y-%m-%dT%H:%M:%SZ}"}
        bundle_button(current, [str(e["event_id"]) for e in taint.events], selection, key="bundle_blast")
    downloads[0].download_button(
        "Download CSV", taint.as_csv(), file_name=f"{stem}.csv", mime="text/csv", key="download_csv"
    )
    downloads[1].download_button(
        "Download JSON", taint.as_json(), file_name=f"{stem}.json", mime="application/json", key="download_json"
    )
