"""Overview: how much happened in the window, what was denied, what the findings are, whether the log verifies."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import now, require_session, time_window
from dashboard.text import md


def ago(seconds: float) -> str:
    if seconds < 90 * 60:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


current = require_session()
st.title("Overview")
since, until = time_window()
scope = current.tenant

with st.spinner("Reading the lake..."):
    summary = data.summary(str(current.data_dir), scope, since, until)
    # The Findings page's cache entry: both pages count the same findings, computed once.
    found = data.findings_in(str(current.data_dir), scope, since, until).findings
    run = data.last_verification(str(current.data_dir), scope)

if summary.events == 0:
    st.info(
        "No events in this window. Pick a longer window above, or check that gateways are posting to the ingest"
        " API (`custody serve`) for this data dir."
    )

age = summary.newest_age(now())
columns = st.columns(6)
columns[0].metric("Events", f"{summary.events:,}")
columns[1].metric("Emitters", summary.emitters)
columns[2].metric("Agents", summary.agents)
columns[3].metric("Users", summary.users)
columns[4].metric("Denied calls", f"{summary.denied:,}")
columns[5].metric("Newest event", "none" if age is None else ago(age.total_seconds()))
links = st.columns(3)
links[0].page_link("views/investigate.py", label="Open these events", icon=":material/search:")
links[1].page_link(
    "views/investigate.py", label="Open the denied calls", icon=":material/block:", query_params={"decision": "deny"}
)
links[2].page_link("views/integrity.py", label="Emitters and their chains", icon=":material/link:")

left, right = st.columns(2)
with left:
    st.subheader("Findings")
    severities = Counter(finding.severity for finding in found)
    row = st.columns(4)
    for column, severity in zip(row, ("critical", "high", "medium", "low"), strict=True):
        column.metric(severity.capitalize(), severities.get(severity, 0))
    st.page_link("views/findings.py", label=f"Open all {len(found)} findings", icon=":material/report:")
with right:
    st.subheader("Integrity")
    if run is None:
        st.warning("The log has not been verified yet.")
    elif run["problems"]:
        st.error(f"Last verification ({run['finished_at']}): {len(run['problems'])} problems")
    else:
        counted = "" if run["events"] is None else f": {run['events']:,} events"
        st.success(f"Last verification ({run['finished_at']}){counted}, no problems")
    st.page_link("views/integrity.py", label="Open integrity", icon=":material/verified:")

st.subheader(f"Events per {summary.bucket}, by decision")
if summary.volume:
    volume = pd.DataFrame(summary.volume).assign(bucket=lambda frame: pd.to_datetime(frame["bucket"]))
    volume = volume.pivot_table(
        index="bucket", columns="decision", values="events", aggfunc="sum", fill_value=0
    ).reindex(columns=["allow", "deny", "other"], fill_value=0)
    st.bar_chart(volume, color=["#2563eb", "#dc2626", "#9ca3af"])

left, right = st.columns(2)
with left:
    st.subheader("Top agents")
    st.dataframe(pd.DataFrame(summary.top_agents), hide_index=True, key="top_agents")
    st.caption("Open an agent's reach on the Blast radius page.")
with right:
    st.subheader("Top tools")
    st.dataframe(pd.DataFrame(summary.top_tools), hide_index=True, key="top_tools")
for agent in [row["agent"] for row in summary.top_agents[:5]]:
    st.page_link(
        "views/blast.py",
        label=f"Blast radius of {md(agent)}",
        icon=":material/crisis_alert:",
        query_params={"kind": "agent", "subject": agent},
    )
