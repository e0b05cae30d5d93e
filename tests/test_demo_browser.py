"""The README's demo command, for real: ``./demo`` (reduced size) brings up the ingest API, the read API and the
dashboard on the demo organisation; headless Chromium (Debian's, driven by Playwright) signs in, opens the
delegation path of the planted refund and the blast radius of the compromised agent, and screenshots each page
into ``test-artifacts/`` (or ``$CUSTODY_ARTIFACTS``). Ctrl-C then stops every process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("CUSTODY_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def start_demo(
    data: Path, *size: str, ports: dict[str, int] | None = None
) -> tuple[subprocess.Popen[bytes], Path, dict[str, int], str]:
    """``./demo`` on ``data`` in a session of its own, once it serves: the process, its log, its ports, its output."""
    ports = ports or {"port": free_port(), "query": free_port(), "dashboard": free_port(), "gateway": free_port()}
    log_path = data.parent / f"demo-{time.monotonic_ns()}.log"
    command = [
        str(ROOT / "demo"), "--data-dir", str(data), *size,
        "--port", str(ports["port"]), "--query-port", str(ports["query"]), "--dashboard-port", str(ports["dashboard"]),
        "--gateway-port", str(ports["gateway"]),
    ]  # fmt: skip
    env = {**os.environ, "CUSTODY_ADMIN_TOKEN": ADMIN_TOKEN}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while "Serving until Ctrl-C." not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_demo(process)
            raise AssertionError(f"the demo did not come up: {log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return process, log_path, ports, log_path.read_text(errors="replace")


def stop_demo(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=90)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("demo") / "data"
    process, log_path, ports, output = start_demo(data, "--tasks-per-day", "40")
    try:
        yield {
            "process": process,
            "output": output,
            "data": data,
            "ports": ports,
            "analyst": re.search(r"sign in as analyst: (\S+)", output)[1],  # type: ignore[index]
            "auditor": re.search(r"sign in as auditor: (\S+)", output)[1],  # type: ignore[index]
            "key": orjson.loads((data / "answer-key.json").read_bytes()),
            "log": log_path,
        }
    finally:
        stop_demo(process)


def test_the_demo_serves_the_apis_and_the_dashboard_then_stops_on_ctrl_c(demo: dict[str, Any]) -> None:
    ports, output = demo["ports"], demo["output"]
    assert f"Dashboard:   http://127.0.0.1:{ports['dashboard']}" in output
    assert "posted " in output
    assert "signed, chained events from 8 gateways and 3 IdPs" in output
    assert httpx.get(f"http://127.0.0.1:{ports['port']}/healthz").status_code == 200
    events = httpx.get(
        f"http://127.0.0.1:{ports['query']}/v1/events",
        params={"agent": "support-agent", "limit": 5},
        headers={"Authorization": f"Bearer {demo['analyst']}"},
    )
    assert events.status_code == 200
    assert events.json()["total"] > 100
    assert httpx.get(f"http://127.0.0.1:{ports['dashboard']}/_stcore/health").text == "ok"
    assert "path?event=" + demo["key"]["incidents"][0]["refund_events"][0] in output


def sign_in(browser: Any, url: str, token: str) -> Any:
    """A new page at ``url``, signed in with ``token``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator('input[aria-label="Access token"]').fill(token)
    page.get_by_role("button", name="Sign in").click()
    return page


def signed_in(browser: Any, demo: dict[str, Any], path: str) -> Any:
    return sign_in(browser, f"http://127.0.0.1:{demo['ports']['dashboard']}/{path}", demo["analyst"])


def test_a_browser_follows_the_planted_refund_to_its_path_and_blast_radius(browser: Any, demo: dict[str, Any]) -> None:
    injection = next(i for i in demo["key"]["incidents"] if i["name"] == "prompt_injection")
    refund = injection["refund_events"][0]
    page = signed_in(browser, demo, f"path?event={refund}")
    page.get_by_text("Ancestors").first.wait_for()
    page.locator("svg text").first.wait_for()  # Graphviz drew the graph
    graph = " ".join(page.locator("svg text").all_text_contents())
    for entity in ("user: dana@acme.example", "agent: support-agent", "tool: issue_refund (billing-mcp)"):
        assert entity in graph
    assert f"invoice {injection['refunded_invoices'][0]} (acme)" in graph
    assert "ticket T-6613 (acme)" in graph  # the malicious ticket, an ancestor
    assert "Signed in as demo-analyst" in page.inner_text("body")
    page.screenshot(path=ARTIFACTS / "delegation-path.png", full_page=True)

    page.get_by_role("link", name=re.compile("Blast radius of support-agent from this event on")).click()
    page.get_by_text("Events affected").wait_for()
    page.locator("svg text").first.wait_for()
    assert "subject=support-agent" in page.url  # the selection is in the URL, ready for a ticket
    assert "start=" in page.url  # (kind=agent, the default, is left out of it)
    graph = " ".join(page.locator("svg text").all_text_contents())
    assert "agent: export-subagent" in graph
    assert "tool: crm-mcp/export_customers" in graph
    assert "resource: acme/customer_list/all-customers" in graph
    body = page.inner_text("body")
    assert re.search(r"could reach \d+ tools", body)
    assert re.search(r"[2-5] of 5 granted scopes never used", body)  # admin:all and customers:export at least
    page.locator(".vega-embed").first.wait_for()  # the granted-vs-used chart
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / "blast-radius.png", full_page=True)
    page.close()


def test_the_newest_incident_came_through_the_mcp_gateway(browser: Any, demo: dict[str, Any]) -> None:
    """A real MCP client, the real gateway, a real enforcement decision: the tour's first link shows it."""
    output = demo["output"]
    assert re.search(r"live session through the MCP gateway \(\S+\): 2 calls allowed, 6 denied", output), output
    assert "its token revoked, then used once more: denied by the gateway" in output
    assert httpx.get(f"http://127.0.0.1:{demo['ports']['gateway']}/healthz").status_code == 200
    denied = re.search(r"The denied refund and the chain behind it: \S+/path\?event=([0-9a-f-]{36})", output)
    assert denied is not None, output
    page = signed_in(browser, demo, f"path?event={denied[1]}")
    page.get_by_text("Ancestors").first.wait_for()
    page.locator("svg text").first.wait_for()
    graph = " ".join(page.locator("svg text").all_text_contents())
    for entity in ("user: dana@acme.example", "agent: support-agent", "agent: triage-subagent"):
        assert entity in graph
    assert "tool: issue_refund (billing-mcp)" in graph
    assert "ticket T-1002 (acme)" in graph  # the read that carried the injection, its parent
    body = page.inner_text("body")
    assert "deny" in body
    assert "gw-acme-mcp" in body
    page.screenshot(path=ARTIFACTS / "live-gateway-incident.png", full_page=True)
    page.close()

    # The sub-agent's token, revoked at the identity provider and used once more: continuous detection opened a
    # critical finding, and the tour links it in the triage queue.
    critical = re.search(r"critical finding #(\d+): \S+/findings\?finding=(\d+)", output)
    assert critical is not None, output
    page = signed_in(browser, demo, f"findings?finding={critical[1]}")
    page.get_by_text("Triage queue").wait_for()
    page.get_by_text(re.compile("critical: credential live-triage-subagent-.* status open")).wait_for()
    assert page.get_by_role("button", name="Apply").count() == 1  # the analyst may change it
    page.screenshot(path=ARTIFACTS / "triage-queue.png", full_page=True)
    page.close()


def test_the_overview_window_choice_lands_in_the_url(browser: Any, demo: dict[str, Any]) -> None:
    page = signed_in(browser, demo, "")
    page.get_by_text("Denied calls", exact=True).wait_for()
    page.get_by_text("7d", exact=True).click()
    page.wait_for_url(re.compile(r"window=7d"))
    page.get_by_text("Events per day, by decision").wait_for()  # re-read for the new window
    page.locator(".vega-embed").first.wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / "overview.png", full_page=True)
    page.close()


def test_an_auditor_downloads_the_signed_access_review(browser: Any, demo: dict[str, Any], tmp_path: Path) -> None:
    """The report files are rendered when their button is clicked (a PDF takes seconds on a large tenant): the
    browser still gets the signed PDF, and it verifies."""
    url = f"http://127.0.0.1:{demo['ports']['dashboard']}/recert?tenant=acme"
    page = sign_in(browser, url, demo["auditor"])
    page.get_by_text("Download (signed)").wait_for()
    with page.expect_download() as event:
        page.get_by_role("button", name="PDF").click()
    saved = tmp_path / event.value.suggested_filename
    event.value.save_as(saved)
    assert saved.name.startswith("recert-acme-")
    assert saved.read_bytes().startswith(b"%PDF")
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "custody"), "recert", "verify", str(saved), "--data-dir", str(demo["data"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    page.close()


def test_ctrl_c_stops_every_demo_process(tmp_path: Path) -> None:
    """A demo of its own (the module's is shared by the tests around it, in any order)."""
    process, log_path, ports, _ = start_demo(tmp_path / "data", "--days", "3", "--tasks-per-day", "20")
    try:
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=90) == 0
        for port in ports.values():
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        assert "stopping" in log_path.read_text(errors="replace")
    finally:
        stop_demo(process)


def test_a_second_run_reuses_the_data_dir_and_says_so(tmp_path: Path) -> None:
    command = [
        str(ROOT / "demo"), "--data-dir", str(tmp_path / "data"), "--days", "3", "--tasks-per-day", "20", "--exit",
        "--port", str(free_port()), "--query-port", str(free_port()), "--dashboard-port", str(free_port()),
        "--gateway-port", str(free_port()),
    ]  # fmt: skip
    env = {**os.environ, "CUSTODY_ADMIN_TOKEN": ADMIN_TOKEN}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    posted = int(re.search(r"posted ([\d,]+) signed", first.stdout)[1].replace(",", ""))  # type: ignore[index]
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"reusing {tmp_path / 'data'}" in again.stdout
    assert f"already holds {posted:,} events of the demo organisation; not posting them again" in again.stdout
    assert "sign in as analyst: " in again.stdout  # a fresh token: the old one cannot be shown again
    reset = subprocess.run([*command, "--reset"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert reset.returncode == 0
    assert f"reset: deleted {tmp_path / 'data'}" in reset.stdout
