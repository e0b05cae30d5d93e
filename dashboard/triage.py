"""The triage queue at the top of the Findings page: the findings continuous detection recorded, with their status,
assignee and history, and the changes an analyst makes (acknowledge, resolve, reopen, suppress, assign, comment).
The selection lives in the URL (``status``, ``finding``), so an alert's deep link opens the finding it names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.context import Session
from dashboard.text import md
from query.detect.loop import findings_store_path
from query.detect.records import STATUSES, FindingStore, TransitionError

__all__ = ["triage_queue"]


@st.cache_resource
def _store(path: str) -> FindingStore:
    return FindingStore(findings_store_path(Path(path)))


def triage_queue(current: Session) -> None:
    st.subheader("Triage queue")
    if not findings_store_path(current.data_dir).exists():
        st.info(
            "Continuous detection has not run on this data dir (custody serve runs it): below, findings computed now."
        )
        return
    records = _store(str(current.data_dir))
    statuses = st.multiselect(
        "Status", list(STATUSES), default=["open", "acknowledged"], key="status", bind="query-params"
    )
    queue = records.queue(tenant=current.tenant, statuses=tuple(statuses or STATUSES))
    ids = [r.id for r in queue]
    wanted = st.query_params.get("finding")
    if wanted is not None and wanted.isdigit() and int(wanted) not in ids:
        try:  # a deep link to a finding outside the statuses shown: show it anyway
            queue.append(records.get(int(wanted), tenant=current.tenant))
            ids.append(int(wanted))
        except TransitionError:
            st.warning(f"No finding {md(wanted)} here.")
    if not queue:
        st.success("Nothing in the queue with these statuses.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "id": r.id,
                    "severity": r.severity,
                    "status": r.status,
                    "title": r.title,
                    "tenant": r.tenant,
                    "evidence": r.evidence_count,
                    "assignee": r.assignee or "",
                    "last_seen": r.last_seen,
                    "updated": r.updated_at,
                }
                for r in queue
            ]
        ),
        hide_index=True,
        key="queue_table",
    )
    titles = {r.id: f"#{r.id} [{r.severity}, {r.status}] {r.title}" for r in queue}
    chosen = st.selectbox("Finding", ids, format_func=lambda i: titles[i], key="finding", bind="query-params")
    if chosen is None:
        return
    record = records.get(int(chosen), tenant=current.tenant)
    st.markdown(
        f"**{md(record.severity)}: {md(record.title)}** ({md(record.tenant)}; {md(', '.join(record.owasp))}):"
        f" {record.evidence_count}"
        f" evidence events, first {md(record.first_seen)}, last {md(record.last_seen)}; status **{md(record.status)}**"
        + (f", assigned to {md(record.assignee)}" if record.assignee else "")
        + (
            f"; suppressed until {md(record.suppressed_until)}: {md(record.suppress_reason)}"
            if record.status == "suppressed"
            else ""
        )
    )
    evidence = records.evidence(record.id, limit=50)
    for event_id in evidence[:10]:
        st.page_link("views/path.py", label=f"Delegation path of {md(event_id)}", query_params={"event": event_id})
    history = pd.DataFrame(records.history(record.id))
    st.dataframe(history[["at", "actor", "action", "status", "comment"]], hide_index=True, key="history_table")
    if current.principal.role not in ("admin", "analyst"):
        st.caption("Auditors read the queue; analysts and admins change it.")
        return
    with st.form("change", clear_on_submit=True):
        action = st.selectbox("Change", ["acknowledge", "resolve", "reopen", "suppress", "assign", "comment"])
        comment = st.text_input("Comment (the reason, for a suppression)")
        assignee = st.text_input("Assignee (for assign)")
        days = st.number_input("Suppress for days", min_value=1, max_value=365, value=7)
        if st.form_submit_button("Apply"):
            until = datetime.now(UTC) + timedelta(days=int(days)) if action == "suppress" else None
            try:
                records.transition(
                    record.id,
                    action,
                    f"{current.principal.role}:{current.principal.name}",
                    tenant=current.tenant,
                    comment=comment or None,
                    assignee=assignee or None,
                    until=until,
                )
            except TransitionError as exc:
                st.error(str(exc))
            else:
                st.rerun()
