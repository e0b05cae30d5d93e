"""Access-recertification reports on the demo organisation: every format agrees with the others and with the answer
key, states its log position, renders (PDF pages are not blank), and any edit fails verification, named exactly."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from query.api import create_query_app
from query.recert.reports import render, report_body, sign_report, verify_report
from query.recert.review import access_review
from query.tokens import TokenStore
from store.ground.server_key import ServerKey
from tests.conftest import ORG_END, copy_data_dir, read_lake

pytestmark = pytest.mark.slow  # the demo organisation

TENANTS = ("acme", "globex", "initech")


@pytest.fixture(scope="module")
def reports(org: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server_key, _ = ServerKey.load_or_create(org["data"] / "state" / "server_key.pem")
    out = tmp_path_factory.mktemp("reports")
    files: dict[str, dict[str, Path]] = {}
    reviews = {}
    for tenant in TENANTS:
        review = access_review(org["data"], tenant, window_days=90, now=ORG_END)
        body = report_body(review, server_key)
        jws = sign_report(body, server_key)
        reviews[tenant] = review
        files[tenant] = {}
        for form in ("json", "csv", "html", "pdf"):
            path = out / f"{tenant}.{form}"
            path.write_bytes(render(body, jws, form))
            files[tenant][form] = path
    return {"files": files, "reviews": reviews, "key": server_key, "out": out}


def recommendations_by_format(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """agent -> recommendation, read back from each file the way a person or a spreadsheet would."""
    from_json = {a["agent"]: a["recommendation"] for a in orjson.loads(files["json"].read_bytes())["report"]["agents"]}
    lines = [line for line in files["csv"].read_text().splitlines() if not line.startswith("#")]
    from_csv = {row["agent"]: row["recommendation"] for row in csv.DictReader(io.StringIO("\n".join(lines)))}
    page = files["html"].read_text()
    from_html = dict(
        re.findall(
            r"<h2>([^<]+)</h2><table>(?:(?!<h2>).)*?<td class=\"(keep|reduce|revoke|investigate)\">", page, re.DOTALL
        )
    )
    text = subprocess.run(["pdftotext", str(files["pdf"]), "-"], capture_output=True, text=True, check=True).stdout
    from_pdf = dict(re.findall(r"^\f?([a-z0-9._-]+): (keep|reduce|revoke|investigate)$", text, re.MULTILINE))
    return {"json": from_json, "csv": from_csv, "html": from_html, "pdf": from_pdf}


@pytest.mark.parametrize("tenant", TENANTS)
def test_every_format_agrees_with_the_others(reports: dict[str, Any], tenant: str) -> None:
    found = recommendations_by_format(reports["files"][tenant])
    expected = {agent.agent: agent.recommendation for agent in reports["reviews"][tenant].agents}
    assert len(expected) >= 6
    for form, seen in found.items():
        assert seen == expected, form


def test_the_reports_agree_with_the_answer_key(reports: dict[str, Any], org: dict[str, Any]) -> None:
    agents = {
        agent.agent: agent for tenant in TENANTS for agent in reports["reviews"][tenant].agents
    }  # names are unique across tenants in the demo
    support = agents["support-agent"]
    assert support.recommendation == "reduce"
    assert set(support.scopes_unused) == {"admin:all", "customers:export"}
    assert "reduce to refunds:write, tickets:read, tickets:write" in support.justification
    assert {d["agent"] for d in support.delegations_given} == {"triage-subagent", "export-subagent"}
    revoked = next(i for i in org["key"]["incidents"] if i["name"] == "action_after_revocation")
    hr = agents["hr-assistant"]
    assert hr.recommendation == "investigate"
    assert f"critical: credential {revoked['subject']} was used after it was revoked" in hr.justification
    assert any(c["id"] == revoked["subject"] and c["revoked"] for c in hr.credentials)
    assert "borrowed_session" in {f["kind"] for f in agents["billing-agent"].findings}
    assert agents["billing-agent"].recommendation == "investigate"  # a high finding: never "keep"
    for agent in agents.values():  # an open high or critical finding is always "investigate"
        serious = [f for f in agent.findings if f["severity"] in ("critical", "high") and f["status"] == "open"]
        assert (agent.recommendation == "investigate") == bool(serious), agent.agent
    assert {"shared_credential", "cross_tenant"} <= {f["kind"] for f in agents["research-agent"].findings}
    assert "unregistered_tool" in {f["kind"] for f in agents["devops-agent"].findings}
    assert "scope_escalation" in {f["kind"] for f in agents["sales-agent"].findings}
    assert agents["triage-subagent"].owner == "dana@acme.example (via support-agent)"
    clean = agents["collections-agent"]
    assert clean.recommendation == "keep"
    assert clean.findings == []
    assert clean.owner == "frank@acme.example"
    assert clean.users
    assert all(u["approvals"] >= 1 for u in clean.users)
    for agent in agents.values():
        assert agent.review == {"decision": "", "reviewer": "", "date": "", "comment": ""}


def test_the_log_position_is_the_lake_it_was_computed_from(reports: dict[str, Any], org: dict[str, Any]) -> None:
    rows = read_lake(org["data"], "tenant, emitter, seq, event_hash")
    for tenant in TENANTS:
        review = reports["reviews"][tenant]
        mine = [row for row in rows if row[0] == tenant]
        assert review.events == len(mine)
        for emitter, head in review.heads.items():
            last = max((row for row in mine if row[1] == emitter), key=lambda row: row[2])
            assert head == {"seq": last[2], "hash": last[3]}


@pytest.mark.parametrize("form", ["json", "csv", "html", "pdf"])
def test_an_untouched_report_verifies_against_the_pinned_server_key(reports: dict[str, Any], form: str) -> None:
    result = verify_report(reports["files"]["acme"][form], public_key=reports["key"].private_key.public_key())
    assert result.ok, result.differences
    assert result.key_source == "the server key you gave"


def edited(path: Path, old: bytes, new: bytes, tmp_path: Path) -> Path:
    data = path.read_bytes()
    assert old in data
    target = tmp_path / path.name
    target.write_bytes(data.replace(old, new, 1))
    return target


def test_an_edited_json_report_names_the_field(reports: dict[str, Any], tmp_path: Path) -> None:
    report = orjson.loads(reports["files"]["acme"]["json"].read_bytes())
    index = next(i for i, a in enumerate(report["report"]["agents"]) if a["agent"] == "support-agent")
    report["report"]["agents"][index]["recommendation"] = "keep"
    report["report"]["agents"][index]["scopes_unused"] = []
    target = tmp_path / "acme.json"
    target.write_bytes(orjson.dumps(report))
    result = verify_report(target)
    assert result.signature_ok
    assert f'report.agents[{index}].recommendation: signed "reduce", file has "keep"' in result.differences
    assert f'report.agents[{index}].scopes_unused[0]: signed "admin:all", missing from the file' in result.differences


def test_an_edited_csv_report_names_the_row_and_column(reports: dict[str, Any], tmp_path: Path) -> None:
    target = edited(reports["files"]["acme"]["csv"], b',reduce,"never used', b',keep,"never used', tmp_path)
    result = verify_report(target)
    assert not result.ok
    assert "row support-agent, column recommendation: signed 'reduce', file has 'keep'" in result.differences


def test_an_edited_html_report_names_the_line(reports: dict[str, Any], tmp_path: Path) -> None:
    target = edited(reports["files"]["acme"]["html"], b'class="reduce">reduce<', b'class="keep">keep<', tmp_path)
    result = verify_report(target)
    assert not result.ok
    assert len(result.differences) == 1
    assert re.match(r"line \d+: signed '.*reduce.*', file has '.*keep.*'", result.differences[0])


def test_an_edited_pdf_report_names_the_page_and_text(reports: dict[str, Any], tmp_path: Path) -> None:
    target = edited(reports["files"]["acme"]["pdf"], b"(support-agent: reduce)", b"(support-agent: revoke)", tmp_path)
    result = verify_report(target)
    assert not result.ok
    assert any(
        re.match(r"page \d+: signed 'support-agent: reduce', file has 'support-agent: revoke'", d)
        for d in result.differences
    ), result.differences


def test_an_edited_signed_copy_fails_the_signature(reports: dict[str, Any], tmp_path: Path) -> None:
    report = orjson.loads(reports["files"]["acme"]["json"].read_bytes())
    header, payload, signature = report["signature"].split(".")
    import base64

    body = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).replace(b'"reduce"', b'"keep"', 1)
    report["signature"] = ".".join([header, base64.urlsafe_b64encode(body).rstrip(b"=").decode(), signature])
    target = tmp_path / "acme.json"
    target.write_bytes(orjson.dumps(report))
    result = verify_report(target)
    assert not result.signature_ok
    assert result.differences[0].startswith("signature: not a valid signature by the key embedded in the report")


def test_a_report_signed_by_another_server_fails_against_the_pinned_key(
    reports: dict[str, Any], tmp_path: Path
) -> None:
    other, _ = ServerKey.load_or_create(tmp_path / "other.pem")
    result = verify_report(reports["files"]["acme"]["csv"], public_key=other.private_key.public_key())
    assert not result.ok
    assert "not a valid signature by the server key you gave" in result.differences[0]


def _page_text(pdf: Path, page: int) -> str:
    return subprocess.run(
        ["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _long_rules(image: Path) -> int:
    """Horizontal lines across at least half the page (table borders) in a rendered page (PGM)."""
    _, size, _, pixels = image.read_bytes().split(b"\n", 3)  # P5 header: magic, size, maxval
    width, height = map(int, size.split())
    rules = 0
    for y in range(height):
        row = pixels[y * width : (y + 1) * width]
        if sum(1 for value in row if value < 160) >= width // 2:
            rules += 1
    return rules


def test_the_pdf_reads_in_a_minute(reports: dict[str, Any], tmp_path: Path) -> None:
    """Page one is the summary; the decisions take at most two more pages; the details are an appendix. Looked at
    as rendered pages (pdftoppm), not only as text."""
    assert shutil.which("pdftoppm"), "./test installs poppler-utils"
    pdf = reports["files"]["acme"]["pdf"]
    review = reports["reviews"]["acme"]
    subprocess.run(["pdftoppm", "-gray", "-r", "40", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.pgm"))
    for page in pages:
        pixels = page.read_bytes().split(b"\n", 3)[3]  # P5 header: magic, size, maxval
        assert sum(1 for value in pixels if value < 128) > 200, f"{page.name} looks blank"
    first = _page_text(pdf, 1)
    assert f"{len(review.agents)} agents by recommendation" in first
    for name in ("investigate", "revoke", "reduce", "keep"):
        assert re.search(rf"^{name}\s+{review.summary()[name]}\b", first, re.MULTILINE), name
    flagged = [agent for agent in review.agents if any(f["status"] == "open" for f in agent.findings)]
    assert f"Agents with open findings: {len(flagged)}" in first
    for agent in flagged:
        assert agent.agent in first
    assert "Log position" in first
    assert f"Computed from {review.events:,} events" in first
    assert "custody recert verify FILE" in first
    assert _long_rules(pages[0]) >= 4  # its tables are drawn: recommendations and open findings
    decisions = next(number for number in range(1, len(pages) + 1) if "Appendix A" in _page_text(pdf, number)) - 2
    assert 1 <= decisions <= 2, f"the decisions take {decisions} pages"
    table = "".join(_page_text(pdf, number) for number in range(2, 2 + decisions))
    assert re.search(r"agent\s+recommendation\s+why\s+decision\s+reviewer\s+date\s+comment", table)
    for agent in review.agents:
        assert re.search(rf"^{re.escape(agent.agent)}\s+{agent.recommendation}\b", table, re.MULTILINE), agent.agent
    assert _long_rules(pages[1]) >= len(review.agents)  # a row (with room to write) per agent
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert f"Page 1 of {len(pages)}" in text
    assert "Appendix B: log position" in text


def test_a_finding_resolved_in_the_triage_queue_no_longer_calls_for_investigation(
    org: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    copy_data_dir(org["data"], data)
    before = {agent.agent: agent for agent in access_review(data, "acme", window_days=90, now=ORG_END).agents}
    billing = before["billing-agent"]
    assert billing.recommendation == "investigate"
    from query.detect.loop import findings_store_path
    from query.detect.records import FindingStore
    from query.findings import findings
    from query.lake import LakeReader

    store = FindingStore(findings_store_path(data))
    try:
        store.merge(findings(LakeReader(data), tenant="acme"))
        for record in store.queue(tenant="acme", kinds=["borrowed_session"], limit=1000):
            store.transition(record.id, "resolve", "aud", tenant="acme", comment="the session was given back")
    finally:
        store.close()
    after = {agent.agent: agent for agent in access_review(data, "acme", window_days=90, now=ORG_END).agents}
    assert after["billing-agent"].recommendation != "investigate"
    assert {f["status"] for f in after["billing-agent"].findings if f["kind"] == "borrowed_session"} == {"resolved"}


def custody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_cli_writes_and_verifies_a_report(org: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "acme.pdf"
    written = custody("recert", "write", "--data-dir", str(org["data"]), "--tenant", "acme", "--window", "3650d",
                      "--format", "pdf", "--output", str(target))  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert re.match(
        r"OK: wrote .*acme.pdf \(\d+ agents: investigate \d+, revoke \d+, reduce \d+, keep \d+;", written.stdout
    )
    ok = custody("recert", "verify", str(target), "--data-dir", str(org["data"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "signature valid" in ok.stdout
    target.write_bytes(target.read_bytes().replace(b"(support-agent: reduce)", b"(support-agent: revoke)"))
    bad = custody("recert", "verify", str(target))
    assert bad.returncode == 1
    assert "FAIL: " in bad.stdout
    assert "signed 'support-agent: reduce', file has 'support-agent: revoke'" in bad.stdout
    wrong = custody("recert", "write", "--data-dir", str(org["data"]), "--tenant", "acme", "--window", "soon")
    assert wrong.returncode == 1
    assert "window must be a number of days like 90d" in wrong.stderr


def test_the_read_api_serves_reports_to_auditors_only(org: dict[str, Any], tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    auditor = store.issue("aud", "auditor", None)
    bound = store.issue("aud-acme", "auditor", "acme")
    analyst = store.issue("ann", "analyst", None)
    with TestClient(create_query_app(org["data"], store)) as client:

        def get(token: str, **params: str) -> Any:
            return client.get("/v1/recert", params=params, headers={"Authorization": f"Bearer {token}"})

        response = get(auditor, tenant="globex", window="3650d", format="csv")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert 'filename="recert-globex-' in response.headers["content-disposition"]
        target = tmp_path / "globex.csv"
        target.write_bytes(response.content)
        assert verify_report(target).ok
        assert get(analyst, tenant="globex").status_code == 403
        assert get(bound, tenant="globex").status_code == 403
        assert get(bound, format="json").json()["report"]["tenant"] == "acme"  # bound: its own tenant by default
        missing = get(auditor)
        assert missing.status_code == 400
        assert "tenant is required" in missing.json()["error"]["message"]
        assert get(auditor, tenant="acme", format="docx").status_code == 400


def test_a_review_reads_the_findings_continuous_detection_recorded(org: dict[str, Any], tmp_path: Path) -> None:
    """With a findings store the review takes the tenant's findings from it (milliseconds where the window's query
    takes seconds on a large lake) and says so; a store from before agents were kept is filled in by detection's
    next start, the review computing from the lake meanwhile. The recommendations are the same either way."""
    import sqlite3

    from query.detect.loop import DetectionLoop, findings_store_path

    data = tmp_path / "data"
    copy_data_dir(org["data"], data)

    def review() -> tuple[str, dict[str, tuple[str, list[tuple[str, str]]]]]:
        done = access_review(data, "acme", window_days=90, now=ORG_END)
        return done.findings_from, {
            a.agent: (a.recommendation, sorted((f["kind"], f["status"]) for f in a.findings)) for a in done.agents
        }

    source, computed = review()
    assert source == "computed from the lake over the window"
    assert computed["billing-agent"][0] == "investigate"
    loop = DetectionLoop(data)
    try:
        loop.catch_up()
        loop.run_periodic(force=True)
    finally:
        loop.stop()
    source, recorded = review()
    assert source.startswith("recorded by continuous detection up to log index ")
    assert recorded == computed
    with sqlite3.connect(findings_store_path(data)) as db:
        db.execute("UPDATE findings SET agents = NULL")  # as a store written before this version keeps them
    assert review()[0] == "computed from the lake over the window"
    loop = DetectionLoop(data)
    try:
        loop.catch_up()  # fills them in from the evidence
    finally:
        loop.stop()
    assert review() == (source, computed)
