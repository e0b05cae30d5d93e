"""Integrity: every emitter's chain as the lake holds it, the latest verification, and a button to verify now."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import require_session
from query.verify.run import run_verification


def events_of(run: dict[str, Any]) -> str:
    return "" if run["events"] is None else f" in {run['events']:,} events"


current = require_session()
root = str(current.data_dir)
st.title("Integrity")

streams = data.emitters(root, current.tenant)
run = data.last_verification(root, current.tenant)
failing = {p["emitter"] for p in run["problems"]} if run else set()

st.subheader("Last verification")
if run is None:
    st.warning("The log has not been verified yet." + (" Run it below." if current.may_verify else ""))
else:
    if run["problems"]:
        st.error(f"{run['finished_at']}: {len(run['problems'])} problems{events_of(run)} ({run['mode']})")
    else:
        st.success(f"{run['finished_at']}: verified{events_of(run)}, no problems ({run['mode']})")
    if run.get("others"):
        st.info(f"{run['others']} problems of that run concern other tenants' streams or the lake as a whole.")

st.subheader("Emitters")
if not streams:
    st.info("No events in the lake yet. Gateways post them to the ingest API (`custody serve`).")
else:
    table = pd.DataFrame(
        [
            {
                "emitter": s.emitter,
                "tenant": s.tenant,
                "events": s.events,
                "first seq": s.first_seq,
                "last seq": s.last_seq,
                "seqs contiguous": s.contiguous,
                "last verification": "problems" if s.emitter in failing else ("ok" if run else "not yet"),
                "newest event": s.newest,
            }
            for s in streams
        ]
    )
    st.dataframe(table, hide_index=True, key="emitters_table")

if run and run["problems"]:
    st.subheader("Problems")
    st.dataframe(
        pd.DataFrame(run["problems"])[["emitter", "seq", "event_id", "check", "expected", "actual", "file"]],
        hide_index=True,
        key="problems_table",
    )

st.subheader("Verify now")
if not current.may_verify:
    st.caption("Verification is for auditor and admin tokens.")
    st.stop()
st.caption(
    "Recomputes every hash and chain link, re-checks signatures and columns of every file new or changed since"
    " the last clean run (the first run checks everything), and rebuilds the transparency log's tree from the lake"
    " to compare it with every checkpoint the log signed."
)
if st.button("Verify the log", key="verify", type="primary"):
    total = max(sum(s.events for s in streams), 1)
    bar = st.progress(0.0, text="Verifying...")

    def progress(done: int) -> None:
        bar.progress(min(done / total, 1.0), text=f"Verified {done:,} of about {total:,} events")

    verification = run_verification(current.data_dir, "incremental", progress=progress)
    report, mode = verification.report, verification.checks
    bar.progress(1.0, text="Done")
    problems = [asdict(p) for p in report.problems if current.tenant is None or p.tenant == current.tenant]
    if problems:
        st.error(f"{len(problems)} problems ({mode})")
        st.dataframe(pd.DataFrame(problems), hide_index=True, key="verify_problems")
    else:
        st.success(f"No problems in {report.events:,} events ({mode})")
