"""The Custody dashboard: ``custody dashboard --data-dir DIR`` (or ``streamlit run dashboard/app.py``).

This file is the router: sign-in first, then the pages the principal's role may use. Each page lives in
``views/`` and reads the lake through ``dashboard.data`` (cached calls into ``query/``).
"""

from __future__ import annotations

import streamlit as st

from dashboard import data
from dashboard.context import session, sign_in_form
from dashboard.text import md

st.set_page_config(page_title="Custody", page_icon=":material/policy:", layout="wide")

PAGES = {
    "overview": st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    "investigate": st.Page("views/investigate.py", title="Investigate", icon=":material/search:"),
    "path": st.Page("views/path.py", title="Delegation path", icon=":material/account_tree:"),
    "blast": st.Page("views/blast.py", title="Blast radius", icon=":material/crisis_alert:"),
    "findings": st.Page("views/findings.py", title="Findings", icon=":material/report:"),
    "integrity": st.Page("views/integrity.py", title="Integrity", icon=":material/verified:"),
    "recert": st.Page("views/recert.py", title="Access review", icon=":material/fact_check:"),
}

# Every page is registered before sign-in, so a link pasted into a ticket (page and ?params) survives the sign-in.
page = st.navigation(list(PAGES.values()))
current = session()
if current is None:
    sign_in_form()
    st.stop()
data.tree_index(str(current.data_dir))  # starts building the delegation-path index in the background
data.reach_copies(str(current.data_dir))  # starts writing the blast radius's reach copies in the background
data.lake_aggregates(str(current.data_dir))  # the overview's hourly aggregates, in the background
data.review_facts(str(current.data_dir))  # the access review's daily facts, in the background
with st.sidebar:
    bound = f"tenant {current.tenant}" if current.tenant else "all tenants"
    st.caption(f"Signed in as **{md(current.principal.name)}** ({current.principal.role}, {md(bound)})")
    if st.button("Sign out", key="sign_out"):
        st.session_state.clear()
        st.rerun()
page.run()
