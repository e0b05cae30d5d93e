"""Every value from the log is text in the dashboard: a real browser opens each page over a log full of Markdown,
HTML and link syntax (and a crafted URL), sees each value literally, and fetches nothing from the beacon those
values point at.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from query.tokens import TokenStore
from tests import hostile_values
from tests.conftest import REPO, free_port, open_harness
from tests.test_demo_browser import sign_in

pytestmark = pytest.mark.slow


class Beacon(http.server.ThreadingHTTPServer):
    """Records every request: any request at all means a value from the log was rendered as markup."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        beacon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                beacon.requests.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def hostile_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    beacon = Beacon()
    threading.Thread(target=beacon.serve_forever, daemon=True).start()
    data = tmp_path_factory.mktemp("hostile") / "data"
    with open_harness(data) as harness:
        values = hostile_values.post(harness, beacon.url)
    tokens = data.parent / "tokens.json"
    secret = TokenStore(tokens).issue("analyst", "analyst", None)
    port = free_port()
    log_path = data.parent / "dashboard.log"
    command = [sys.executable, "-m", "custody.cli", "dashboard", "--data-dir", str(data), "--tokens", str(tokens)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ)
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).text == "ok":
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield {"url": f"http://127.0.0.1:{port}", "secret": secret, "values": values, "beacon": beacon}
    finally:
        process.terminate()
        process.wait(timeout=60)
        beacon.shutdown()


def test_every_page_shows_log_values_as_text_and_fetches_nothing(
    browser: Any, hostile_dashboard: dict[str, Any]
) -> None:
    values, beacon = hostile_dashboard["values"], hostile_dashboard["beacon"]
    reflected = f"![r]({beacon.url}/reflected.png) `x` :red[y]"
    visits = [
        (f"path?event={values['event_id']}", "Ancestors", [values["agent"], values["user"]]),
        (
            f"blast?subject={quote(values['agent'])}&start=2000-01-01T00:00:00",
            "Events affected",
            [values["agent"]],
        ),
        (f"blast?subject={quote(reflected)}&start=2000-01-01T00:00:00", "No event involves", [reflected]),
        (f"blast?subject=x&start={quote(reflected)}", "must be a time like", [reflected]),
        ("investigate", "match; showing", []),
        ("findings?window=all", "Findings", []),
        ("", "Denied calls", []),
    ]
    for path, ready, literal in visits:
        page = sign_in(browser, f"{hostile_dashboard['url']}/{path}", hostile_dashboard["secret"])
        page.get_by_text(ready).first.wait_for()
        page.wait_for_timeout(1000)  # let images and links the page might hold load
        body = page.inner_text("body")
        for value in literal:
            assert value in body, (path, value)
        markup = page.locator(f"img[src^='{beacon.url}'], a[href^='{beacon.url}']")
        assert not markup.count(), (
            path,
            [markup.nth(i).evaluate("e => e.parentElement.outerHTML") for i in range(markup.count())],
        )
        page.close()
    assert beacon.requests == []
