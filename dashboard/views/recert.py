"""Access review: preview a tenant's recertification report and download it signed (CSV, JSON, HTML, PDF)."""

from __future__ import annotations

from functools import partial

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.context import require_session, show_error
from dashboard.text import md
from query.recert.reports import MEDIA_TYPES, report_filename
from store.ground.errors import CustodyError

WINDOWS = ["30d", "90d", "180d", "365d"]

current = require_session()
root = str(current.data_dir)
st.title("Access review")
st.caption(
    "Per agent: credentials, scopes granted against used, denied attempts, findings, delegations and the people it"
    " acted for, with a keep / reduce / revoke recommendation. Downloads are signed by the server key;"
    " `custody recert verify FILE` checks one offline."
)
if current.principal.role not in ("auditor", "admin"):
    st.info("Access reviews are for auditor and admin tokens.")
    st.stop()

row = st.columns(2)
with row[0]:
    if current.tenant is None:
        tenants = data.choices(root, None, "tenant", None)
        tenant = st.selectbox("Tenant", tenants, index=0 if tenants else None, key="tenant", bind="query-params")
    else:
        tenant = current.tenant
        st.text_input("Tenant", tenant, disabled=True, key="tenant_fixed")
with row[1]:
    window = st.segmented_control("Window", WINDOWS, default="90d", key="review_window", bind="query-params")
if not tenant:
    st.info("No tenant has events yet.")
    st.stop()

try:
    with st.spinner("Reviewing every agent..."):
        review = data.recert_review(root, tenant, window or "90d")[0]
except CustodyError as exc:
    show_error(exc)
    st.stop()
counts = review.summary()
metrics = st.columns(6)
for column, name in zip(metrics, ("agents", "investigate", "revoke", "reduce", "keep", "unused_scopes"), strict=True):
    column.metric(name.replace("_", " ").capitalize(), counts[name])
st.caption(
    f"Computed from the log at {review.events:,} events ({len(review.heads)} emitter heads), window {review.since}"
    f" to {review.until}."
)
if not review.agents:
    st.info(f"No agent of {md(tenant)} acted in this window.")
    st.stop()
table = pd.DataFrame(
    [
        {
            "agent": agent.agent,
            "recommendation": agent.recommendation,
            "unused scopes": " ".join(agent.scopes_unused),
            "findings": len(agent.findings),
            "denied": agent.denied,
            "owner": agent.owner,
            "justification": agent.justification,
        }
        for agent in review.agents
    ]
)
st.dataframe(table, hide_index=True, key="review_table")
st.subheader("Download (signed)")
buttons = st.columns(4)
for column, form in zip(buttons, ("pdf", "csv", "json", "html"), strict=True):
    # rendered when clicked (a PDF of 25 agents takes seconds), from the review above: the same signed body
    column.download_button(
        form.upper(),
        partial(data.recert_content, root, tenant, window or "90d", form),
        file_name=report_filename(review, form),
        mime=MEDIA_TYPES[form],
        key=f"download_{form}",
        on_click="ignore",
    )
