"""The dashboard's pages under Streamlit's AppTest, on the scenario's lake: widgets driven by key, values asserted.

Every page is opened through the real entrypoint (``dashboard/app.py``: sign-in, then ``st.navigation``), as an
unbound analyst, a tenant-bound analyst and an auditor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from query.bundle import path_ids, write_bundle
from query.findings import findings
from query.lake import LakeReader
from query.tokens import TokenStore
from store.ground.errors import NotFound
from store.ground.layout import DataDir
from store.ground.tlog import verify_bundle
from tests import scenario
from tests.conftest import copy_data_dir, open_harness
from tests.test_transparency_log import log_key

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PAGES = ["overview", "investigate", "path", "blast", "findings", "integrity", "recert"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dashboard")
    with open_harness(root / "data") as harness:
        built = scenario.build(harness)
        harness.flush()
    store = TokenStore(root / "tokens.json")
    tokens = {
        "analyst": store.issue("ann", "analyst", None),
        "acme": store.issue("amy", "analyst", "acme"),
        "globex": store.issue("gil", "analyst", "globex"),
        "auditor": store.issue("aud", "auditor", None),
        "globex-auditor": store.issue("gab", "auditor", "globex"),
    }
    return {"data": root / "data", "tokens": tokens, "file": root / "tokens.json", "scenario": built}


@pytest.fixture
def app(lake: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(lake["data"]))
    monkeypatch.setenv("CUSTODY_TOKEN_FILE", str(lake["file"]))

    def open_page(page: str, who: str = "analyst", **params: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["token"] = lake["tokens"][who]
        for name, value in params.items():
            at.query_params[name] = value
        at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return open_page


def texts(at: AppTest) -> str:
    """Everything a page shows as text: markdown, captions, alerts, metrics, dataframes and graphs."""
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.title]
    parts += [e.value for kind in ("success", "error", "warning", "info") for e in getattr(at, kind)]
    parts += [f"{m.label}={m.value}" for m in at.metric]
    parts += [e.value.to_csv() for e in at.dataframe]
    parts += [e.proto.spec for e in at.get("graphviz_chart")] + [e.value for e in at.json]
    return "\n".join(str(part) for part in parts)


def table(at: AppTest, *columns: str) -> Any:
    """The first dataframe on the page with these columns (AppTest finds dataframes by key only when selectable)."""
    for element in at.dataframe:
        if set(columns) <= set(element.value.columns):
            return element.value
    raise AssertionError(f"no table with columns {columns}; tables: {[list(e.value.columns) for e in at.dataframe]}")


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_signing_in_with_a_token_and_a_wrong_one(lake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(lake["data"]))
    monkeypatch.setenv("CUSTODY_TOKEN_FILE", str(lake["file"]))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.text_input(key="sign_in_token")
    assert not at.metric  # nothing of the lake before sign-in
    at.text_input(key="sign_in_token").input("not-a-token")
    at.button[0].click().run()
    assert "Sign-in failed: ` unknown or revoked token `" in [e.value for e in at.error]
    at.text_input(key="sign_in_token").input(lake["tokens"]["analyst"])
    at.button[0].click().run()
    assert not at.exception
    assert metric(at, "Events") != "0"
    assert any("Signed in as **` ann `** (analyst, ` all tenants `)" in c.value for c in at.sidebar.caption)


def test_a_revoked_token_is_signed_out_at_the_next_click(lake: dict[str, Any], app) -> None:
    store = TokenStore(lake["file"])
    token = store.issue("temp", "analyst", None)
    lake["tokens"]["temp"] = token
    at = app("overview", "temp")
    assert metric(at, "Events") != "0"
    store.revoke("temp")
    at.run()
    assert at.text_input(key="sign_in_token")
    assert "That token is no longer valid (revoked?). Sign in again." in [e.value for e in at.error]
    assert not at.metric


def test_overview_counts_match_the_scenario(app, lake: dict[str, Any]) -> None:
    DataDir(lake["data"]).last_verify.unlink(missing_ok=True)  # the integrity test may have run one already
    at = app("overview", window="all")
    assert metric(at, "Emitters") == "3"
    assert int(metric(at, "Denied calls")) >= 6  # the intern's burst
    assert int(metric(at, "Critical")) >= 1  # use after revocation
    shown = texts(at)
    assert "support-agent" in shown
    assert "billing-agent" in shown
    assert "helpdesk-mcp/read_ticket" in shown  # top tools
    assert "The log has not been verified yet." in shown


def test_overview_window_comes_from_the_url_and_the_picker(app) -> None:
    at = app("overview")
    assert at.segmented_control(key="window").value == "24h"  # the default
    assert metric(at, "Events") != "0"
    at.segmented_control(key="window").set_value("1h").run()
    assert metric(at, "Events") == "0"  # the scenario happened three hours ago
    assert any("No events in this window" in e.value for e in at.info)
    at = app("overview", window="1h")  # a pasted link (the browser test checks the URL side)
    assert at.segmented_control(key="window").value == "1h"
    assert metric(at, "Events") == "0"


def test_investigate_filters_pages_and_opens_an_event(app, lake: dict[str, Any]) -> None:
    at = app("investigate", window="all")
    at.selectbox(key="agent").set_value("intern-agent").run()
    at.selectbox(key="decision").set_value("deny").run()
    shown = texts(at)
    assert "events** match" in shown
    total = int(next(m.value for m in at.markdown if "events** match" in m.value).split("**")[1].split()[0])
    assert total >= 6
    timeline = table(at, "event_id", "decision_result", "seq")
    assert set(timeline["decision_result"]) == {"deny"}
    assert all("intern-agent" in str(agent) for agent in timeline["agent"])
    chosen = at.selectbox(key="event_pick").value
    assert chosen in set(timeline["event_id"])
    assert "Hash, signature, columns and chain link verified" in [e.value for e in at.success]
    fields = table(at, "field", "value")
    assert dict(zip(fields["field"], fields["value"], strict=True))["event_id"] == chosen


def test_investigate_pages_through_results(app) -> None:
    at = app("investigate", window="all")
    at.selectbox(key="page_size").set_value(10).run()
    total = int(next(m.value for m in at.markdown if "events** match" in m.value).split("**")[1].split()[0])
    assert total > 20
    pages: list[list[str]] = []
    assert at.button(key="newer").disabled
    while True:
        pages.append(list(table(at, "event_id", "decision_result", "seq")["event_id"]))
        if at.button(key="older").disabled:
            break
        at.button(key="older").click().run()
    seen = [event for page in pages for event in page]
    assert len(seen) == len(set(seen)) == total  # every event once, none skipped
    at.button(key="newer").click().run()
    assert list(table(at, "event_id", "decision_result", "seq")["event_id"]) == pages[-2]


def test_delegation_path_of_the_export(app, lake: dict[str, Any]) -> None:
    export = lake["scenario"].id("export")
    at = app("path", event=export)
    chain = next(m.value for m in at.markdown if "→" in m.value)
    for part in ("alice@acme.example", "support-agent", "export-subagent", "export_customers", "customer_list all"):
        assert part in chain
    assert metric(at, "Ancestors") == "2"  # the refund and the ticket read before it
    relations = table(at, "relation", "event_id")
    ancestors = set(relations[relations["relation"] == "ancestor"]["event_id"])
    assert ancestors == {lake["scenario"].id("refund"), lake["scenario"].id("read-ticket")}
    assert int(metric(at, "Descendants")) >= 1  # the deep chain
    dot = at.get("graphviz_chart")[0].proto.spec
    assert '"agent:export-subagent"' in dot
    assert "Download evidence bundle" in {b.proto.label for b in at.get("download_button")}
    assert "penwidth=2.5" in dot
    # Move to the parent (the refund) through the neighbour picker.
    refund = lake["scenario"].id("refund")
    at.selectbox(key="neighbour").set_value(refund)
    at.button(key="open_neighbour").click().run()
    assert at.text_input(key="event").value == refund
    assert "issue_refund" in next(m.value for m in at.markdown if "→" in m.value)


def test_delegation_path_of_an_unknown_event_says_so(app) -> None:
    at = app("path", event="00000000-0000-4000-8000-000000000000")
    assert "` no event 00000000-0000-4000-8000-000000000000 `" in [e.value for e in at.error]


def test_blast_radius_of_the_support_agent(app, lake: dict[str, Any]) -> None:
    at = app("blast", kind="agent", subject="support-agent", start="2000-01-01T00:00:00")
    shown = texts(at)
    assert "could reach" in shown
    assert "admin:all" in shown
    assert int(metric(at, "Events affected")) >= 4
    tools = table(at, "tool", "events")
    assert {"billing-mcp/issue_refund", "crm-mcp/export_customers"} <= set(tools["tool"])
    agents = set(table(at, "agent", "events", "first")["agent"])
    assert {"support-agent", "export-subagent"} <= agents
    csv = next(b for b in at.get("download_button") if b.proto.label == "Download CSV")
    assert csv is not None
    dot = at.get("graphviz_chart")[0].proto.spec
    assert '"resource:acme/customer_list/all"' in dot


def test_blast_radius_rejects_a_bad_start_time(app) -> None:
    at = app("blast", kind="agent", subject="support-agent", start="yesterday")
    assert any("'From' must be a time" in e.value for e in at.error)


def test_findings_open_their_evidence(app, lake: dict[str, Any]) -> None:
    at = app("findings", window="all")
    listed = table(at, "severity", "kind", "title")
    assert {"borrowed_session", "shared_credential", "action_after_revocation", "cross_tenant"} <= set(listed["kind"])
    at.multiselect(key="kind").set_value(["borrowed_session"]).run()
    assert set(table(at, "severity", "kind", "title")["kind"]) == {"borrowed_session"}
    evidence = table(at, "event_id", "occurred_at", "resource_id")
    assert lake["scenario"].id("borrowed") in set(evidence["event_id"])
    assert "Download evidence bundle" in {b.proto.label for b in at.get("download_button")}


def test_the_bundles_the_pages_offer_verify_offline(lake: dict[str, Any]) -> None:
    """What the path and findings pages' buttons write (query.bundle, in the principal's tenant) verifies."""
    reader = LakeReader(lake["data"])
    key = log_key(lake["data"])
    ids = path_ids(reader, lake["scenario"].id("export"), tenant="acme")
    verified = verify_bundle(write_bundle(lake["data"], ids, {"kind": "path"}, tenant="acme"), key)
    assert {event.event_id for event in verified.events} == set(ids)
    [finding] = [f for f in findings(reader, tenant="acme", kinds=("borrowed_session",))]
    evidence = verify_bundle(write_bundle(lake["data"], finding.evidence, {"kind": "finding"}, tenant="acme"), key)
    assert lake["scenario"].id("borrowed") in {event.event_id for event in evidence.events}
    with pytest.raises(NotFound):  # another tenant's events are not bundled for a bound principal
        write_bundle(lake["data"], ids, {"kind": "path"}, tenant="globex")


def test_integrity_lists_emitters_and_verifies_with_progress(app) -> None:
    at = app("integrity", "auditor")
    emitters = table(at, "emitter", "seqs contiguous")
    assert {"gw-help", "gw-bill", "gw-globex", "custody.server"} <= set(emitters["emitter"])
    assert all(emitters["seqs contiguous"])
    at.button(key="verify").click().run()
    assert any(e.value.startswith("No problems in") for e in at.success), texts(at)
    at = app("integrity", "auditor")
    assert any(re.search(r"verified in \d+ events, no problems", e.value) for e in at.success)


def test_analysts_cannot_run_verification(app) -> None:
    at = app("integrity", "analyst")
    with pytest.raises(KeyError):
        at.button(key="verify")
    assert "Verification is for auditor and admin tokens." in [c.value for c in at.caption]


@pytest.mark.parametrize("page", PAGES)
def test_a_tenant_bound_analyst_sees_nothing_of_another_tenant(app, lake: dict[str, Any], page: str) -> None:
    params = {
        "overview": {"window": "all"},
        "investigate": {"window": "all"},
        "path": {"event": lake["scenario"].id("export")},  # an acme event
        "blast": {"kind": "agent", "subject": "support-agent", "start": "2000-01-01T00:00:00"},
        "findings": {"window": "all"},
        "integrity": {},
        "recert": {"tenant": "acme"},  # asked for by URL: the bound auditor still gets globex
    }[page]
    at = app(page, "globex-auditor" if page == "recert" else "globex", **params)
    shown = texts(at)
    if page == "blast":  # the name the analyst asked about is echoed back, and nothing else of acme
        assert "No event involves agent ` support-agent ` in tenant ` globex `" in shown
        shown = shown.replace("support-agent", "")
    for name in ("gw-help", "gw-bill", "support-agent", "billing-agent", "intern-agent", "alice@acme.example"):
        assert name not in shown, f"{page} shows {name} to a globex analyst"
    for box in at.selectbox:
        assert not any("acme.example" in str(option) for option in box.options)
    if page == "investigate":
        assert at.text_input(key="tenant_fixed").value == "globex"
        assert set(table(at, "event_id", "decision_result", "seq")["tenant"]) == {"globex"}
    if page == "path":
        assert any("no event" in e.value for e in at.error)
    if page == "integrity":  # after the auditor's lake-wide verification: no lake-wide count, no other emitters
        assert not re.search(r"verified in \d+ events", shown)
        assert "gw-globex" in shown


def test_graph_labels_from_the_log_cannot_break_out_of_their_dot_string() -> None:
    from dashboard.graphs import quote

    hostile = 'agent"]; evil [label=<<b>x</b>>]; "a\\'
    quoted = quote(hostile + "\nline")
    assert quoted == '"agent\\"]; evil [label=<<b>x</b>>]; \\"a\\\\\\nline"'
    assert quoted.count('"') - quoted.count('\\"') == 2  # only the opening and closing quotes are unescaped


def test_access_review_preview_and_signed_downloads(app, lake: dict[str, Any]) -> None:

    at = app("recert", "auditor", tenant="acme")
    review = table(at, "agent", "recommendation", "unused scopes")
    by_agent = dict(zip(review["agent"], review["recommendation"], strict=True))
    # a high finding names it (so it is looked at first), and admin:all is granted and never used
    assert by_agent["support-agent"] == "investigate"
    assert by_agent["intern-agent"] == "investigate"  # kept using its token after revocation: critical
    assert "admin:all" in review[review["agent"] == "support-agent"]["unused scopes"].iloc[0]
    assert metric(at, "Agents") == str(len(review))
    downloads = {b.proto.label: b for b in at.get("download_button")}
    assert set(downloads) == {"PDF", "CSV", "JSON", "HTML"}
    # each renders when clicked, from the review the page shows (what the button calls)
    from dashboard import data

    pdf = data.recert_content(str(lake["data"]), "acme", "90d", "pdf")
    assert pdf.startswith(b"%PDF")
    assert b'"tenant":"acme"' in data.recert_content(str(lake["data"]), "acme", "90d", "json").replace(b" ", b"")


def test_access_review_is_for_auditors(app) -> None:
    at = app("recert", "analyst")
    assert "Access reviews are for auditor and admin tokens." in [e.value for e in at.info]
    assert not at.dataframe


def test_the_findings_page_is_a_triage_queue(app, lake: dict[str, Any]) -> None:
    from query.detect.loop import findings_store_path
    from query.detect.records import FindingStore
    from query.findings import findings as compute

    path = findings_store_path(lake["data"])
    records = FindingStore(path)
    try:
        records.merge(compute(LakeReader(lake["data"]), kinds=("borrowed_session", "action_after_revocation")))
        acme = records.queue(tenant="acme")
        assert acme
        first = acme[0]
        at = app("findings", who="acme", finding=str(first.id))
        queue = table(at, "id", "severity", "status", "title", "tenant")
        assert set(queue["tenant"]) == {"acme"}  # a tenant-bound analyst sees only its tenant's findings
        assert at.selectbox(key="finding").value == first.id  # the alert's deep link chose it
        next(s for s in at.selectbox if s.label == "Change").set_value("acknowledge")
        next(t for t in at.text_input if t.label.startswith("Comment")).input("taking it")
        next(b for b in at.button if b.label == "Apply").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert records.get(first.id, tenant="acme").status == "acknowledged"
        history = table(at, "at", "actor", "action", "status", "comment")
        assert list(history["actor"])[-1] == "analyst:amy"
        assert "taking it" in set(history["comment"])
        globex = app("findings", who="globex", finding=str(first.id))
        assert f"No finding ` {first.id} ` here." in [w.value for w in globex.warning]  # a link across the wall
        auditor = app("findings", who="auditor")
        assert "Auditors read the queue; analysts and admins change it." in texts(auditor)
    finally:
        records.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_whole_log_findings_come_from_continuous_detection(
    app, lake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the whole log the Findings page and the overview read what detection recorded (the whole-lake query's
    answer, without running it), say up to which log index, and compute from the lake on request."""

    from query.detect.loop import DetectionLoop
    from query.findings import findings as compute

    data = tmp_path / "data"
    copy_data_dir(lake["data"], data)
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(data))
    expected = compute(LakeReader(data))
    loop = DetectionLoop(data)
    try:
        loop.catch_up()
        loop.run_periodic(force=True)
        examined = loop.store.cursor()
    finally:
        loop.stop()
    at = app("findings", window="all")
    assert f"over log indexes 0 to {examined:,}, the whole lake." in texts(at), [c.value for c in at.caption]
    listed = table(at, "severity", "kind", "title", "evidence")
    assert sorted(zip(listed["kind"], listed["title"], listed["evidence"], strict=True)) == sorted(
        (f.kind, f.title, f.evidence_total) for f in expected
    )
    overview = app("overview", window="all")
    assert f"Open all {len(expected)} findings" in {link.proto.label for link in overview.get("page_link")}
    next(b for b in at.button if b.label == "Compute from the lake").click().run()
    assert "Computed at" in texts(at)
    assert sorted(table(at, "severity", "kind", "title")["title"]) == sorted(f.title for f in expected)
    bound = app("findings", who="globex", window="all")
    assert "over log indexes 0 to" in texts(bound)
    assert sorted(table(bound, "severity", "kind", "title")["title"]) == sorted(
        f.title for f in expected if f.tenant == "globex"
    )
