"""Findings: borrowed sessions, shared credentials, unregistered tools, use after revocation, cross-tenant reach and
more, by severity and kind; each opens its evidence events."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import SLOW_SECONDS, require_session, time_window
from dashboard.evidence import bundle_button
from dashboard.text import md
from dashboard.triage import triage_queue
from query.search import EventFilter
from store.schema import parse_timestamp

SEVERITIES = ["critical", "high", "medium", "low"]


current = require_session()
root = str(current.data_dir)
st.title("Findings")
triage_queue(current)
since, until = time_window()
whole_log = since is None
from_lake = whole_log and bool(st.session_state.get("findings_from_lake"))
st.subheader("Findings over the whole log" if whole_log else "Findings in a window, computed now")
with st.spinner("Looking for findings..."):
    result = data.findings_in(root, current.tenant, since, until, from_lake)
found = result.findings

by_severity = Counter(f.severity for f in found)
refresh = st.columns([4, 1])
if result.recorded:
    behind = (result.newest or 0) - (result.examined or 0)
    refresh[0].caption(
        f"As continuous detection recorded them (with the server's rules), over log indexes 0 to {result.examined:,}"
        + (f"; {behind:,} newer events not examined yet." if behind > 0 else ", the whole lake.")
        + f" Read at {result.at:%H:%M:%S} UTC."
    )
    slow = "the whole-lake query: seconds per million events"
    if refresh[1].button("Compute from the lake", key="from_lake", help=slow):
        st.session_state["findings_from_lake"] = True
        st.rerun()
else:
    refresh[0].caption(f"Computed at {result.at:%H:%M:%S} UTC; kept for {SLOW_SECONDS // 60} minutes.")
    if refresh[1].button("Recompute", key="recompute"):
        data.refresh_findings()
        st.rerun()
row = st.columns(4)
for column, severity in zip(row, SEVERITIES, strict=True):
    column.metric(severity.capitalize(), by_severity.get(severity, 0))

kinds = sorted({f.kind for f in found})
filters = st.columns(2)
severity_pick = filters[0].multiselect("Severity", SEVERITIES, key="severity", bind="query-params")
kind_pick = filters[1].multiselect("Kind", kinds, key="kind", bind="query-params")
shown = [
    f for f in found if (not severity_pick or f.severity in severity_pick) and (not kind_pick or f.kind in kind_pick)
]
if not found:
    st.success("No findings in this window. Try a longer window, or the whole log ('all').")
    st.stop()
if not shown:
    st.info("No finding matches these filters.")
    st.stop()

table = pd.DataFrame(
    [
        {
            "severity": f.severity,
            "kind": f.kind,
            "title": f.title,
            "owasp": ", ".join(f.owasp),
            "evidence": f.evidence_total,
            "first_seen": f.first_seen,
            "last_seen": f.last_seen,
        }
        for f in shown
    ]
)
st.dataframe(table, hide_index=True, key="findings_table")

st.subheader("Evidence")
index = st.selectbox(
    "Finding", range(len(shown)), format_func=lambda i: f"[{shown[i].severity}] {shown[i].title}", key="window_finding"
)
finding = shown[index]
st.markdown(f"**{md(finding.title)}** ({md(', '.join(finding.owasp))}); {finding.evidence_total} evidence events")
if finding.details.get("detail") is not None:
    st.caption(f"Detail: {md(finding.details['detail'])}")
if finding.evidence_truncated:
    st.warning(f"Showing the first {len(finding.evidence)} of {finding.evidence_total} evidence events.")
selection = {"kind": "finding", "finding": finding.kind, "subject": finding.subject}
bundle_button(current, finding.evidence, selection, key="bundle_finding")
# The evidence lies between the finding's first and last sighting: those bounds let DuckDB skip other days.
first, last = (parse_timestamp(value) if value else None for value in (finding.first_seen, finding.last_seen))
where = EventFilter(
    tenant=current.tenant,
    event_ids=tuple(finding.evidence),
    since=first,
    until=last + timedelta(microseconds=1) if last else None,
)
evidence = data.evidence_events(root, where, min(len(finding.evidence), 1000))
frame = pd.DataFrame(evidence.events)
columns = ["occurred_at", "tenant", "type", "user", "agent", "tool_name", "resource_id", "decision_result", "event_id"]
st.dataframe(frame[[c for c in columns if c in frame]], hide_index=True, key="evidence_table")
if evidence.events:
    chosen = st.selectbox(
        "Open the path of an evidence event",
        [e["event_id"] for e in evidence.events],
        key="evidence_event",
    )
    st.page_link(
        "views/path.py",
        label=f"Delegation path of {md(chosen)}",
        icon=":material/account_tree:",
        query_params={"event": chosen},
    )
