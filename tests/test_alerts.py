"""Continuous detection end to end: a credential revoked at the identity provider and then used through the MCP
gateway opens a critical finding, alerted to a webhook (HMAC-signed) and a syslog collector (RFC 5424 over TCP);
a second use adds evidence to the same finding; a receiver that is down gets the alert once it is back; every
change of the finding is an event of the server's signed stream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import re
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from custody_sdk import Emitter, generate_key, public_jwk

from query.detect.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER
from query.detect.records import FindingStore
from tests.conftest import ADMIN, ServerProcess, free_port, read_lake
from tests.gateway_kit import GatewayProcess, Issuer, mcp_client, register_gateway, write_gateway

pytestmark = pytest.mark.slow
SECRET = b"webhook-secret-0123456789"


class Webhook:
    """A local receiver that checks each alert's signature; ``up`` False answers 503 (the SIEM is down)."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.refused = 0
        self.up = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not outer.up:
                    outer.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                stamp = self.headers[TIMESTAMP_HEADER]
                expected = "sha256=" + hmac.new(SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(self.headers[SIGNATURE_HEADER], expected)
                outer.alerts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Collector:
    """A syslog collector over TCP with octet-counted framing (RFC 6587)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = b""
                    while (char := self.rfile.read(1)) not in (b" ", b""):
                        length += char
                    if not length:
                        return
                    outer.messages.append(self.rfile.read(int(length)))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receivers() -> Iterator[tuple[Webhook, Collector]]:
    webhook, collector = Webhook(), Collector()
    yield webhook, collector
    for server in (webhook.server, collector.server):
        server.shutdown()
        server.server_close()


def until(condition: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_revoked_credential_used_through_the_gateway_is_alerted_once_and_gathers_evidence(
    tmp_path: Path, receivers: tuple[Webhook, Collector]
) -> None:
    webhook, collector = receivers
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "alerts.toml").write_text(
        f"""dashboard_url = "http://127.0.0.1:8501"
[[channel]]
name = "soc-webhook"
type = "webhook"
url = "{webhook.url}"
secret_file = "hook.secret"
min_severity = "high"

[[channel]]
name = "siem"
type = "syslog"
address = "{collector.address}"
tenants = ["acme"]
min_severity = "critical"
"""
    )
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log", "--alerts", str(tmp_path / "alerts.toml"))
    custody.start()
    issuer = Issuer(tmp_path)
    config = write_gateway(tmp_path, custody.url, issuer, port=free_port())
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()

    # The identity provider revokes the agent's token (its jti) ...
    key = generate_key()
    registered = httpx.put(
        f"{custody.url}/v1/emitters/idp-acme",
        json={"tenant": "acme", "kind": "idp", "keys": [public_jwk(key, "idp-acme-k1")]},
        headers=ADMIN,
    )
    assert registered.status_code == 200
    with Emitter(custody.url, "idp-acme", "acme", key, "idp-acme-k1", spool=tmp_path / "idp-spool") as idp:
        idp.emit(
            type="credential.revoked",
            credential={"id": "tok-stolen-1", "kind": "agent_token", "client_id": "acme-agent-platform", "scopes": []},
            revoked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5)),
            reason="token leaked in a public gist",
        )
        idp.flush()
    # ... and the agent keeps using it through the gateway (which does not know: the IdP's revocation is news).
    token = issuer.token("alice", ["orchestrator", "researcher"], ["tickets:read"], jti="tok-stolen-1")
    webhook.up = False  # the SIEM is down when it happens

    async def use(ticket: str) -> str:
        async with mcp_client(gateway.url, token) as client:
            result = await client.call_tool("read_ticket", {"ticket_id": ticket})
            assert not result.is_error
            return str(result.meta["custody/event_id"])

    first_use = asyncio.run(use("T-1001"))
    syslog = until(lambda: list(collector.messages), "a syslog line")
    until(lambda: webhook.refused >= 2, "the webhook tried (and was refused) twice")
    webhook.up = True
    [alert] = until(lambda: list(webhook.alerts), "the webhook's alert once it is back")
    assert alert["kind"] == "action_after_revocation"
    assert alert["severity"] == "critical"
    assert alert["tenant"] == "acme"
    assert alert["subject"] == "tok-stolen-1"
    assert alert["evidence"] == [first_use]
    assert alert["links"]["evidence"] == [f"http://127.0.0.1:8501/path?event={first_use}"]
    assert f"finding={alert['finding_id']}" in alert["links"]["finding"]

    [line] = syslog
    assert re.match(rb"<82>1 \d{4}-\d\d-\d\dT[\d:.]+Z \S+ custody \d+ finding \[custody@32473 ", line)
    assert b'kind="action_after_revocation"' in line
    assert b'subject="tok-stolen-1"' in line
    assert json.loads(line.split(b"\xef\xbb\xbf", 1)[1]) == alert

    # A second use: more evidence on the same finding, no second alert.
    second_use = asyncio.run(use("T-1002"))
    store = FindingStore(tmp_path / "data" / "state" / "findings.sqlite")
    try:
        record = until(
            lambda: (r := store.get(alert["finding_id"], tenant="acme")).evidence_count == 2 and r, "the 2nd use"
        )
        assert record.status == "open"
        assert set(store.evidence(record.id)) == {first_use, second_use}
        assert len(store.queue(tenant="acme", kinds=["action_after_revocation"])) == 1
        assert store.queue(tenant="globex") == []  # walls: another tenant's queue does not hold it
        store.transition(record.id, "acknowledge", "analyst:ann", tenant="acme", comment="on it")
    finally:
        store.close()
    time.sleep(3)
    assert len(webhook.alerts) == 1
    assert len(collector.messages) == 1

    # Each change of the finding is an event of the server's signed stream.
    until(lambda: _finding_changes(custody) >= {"open", "acknowledge"}, "the changes in the server's stream")
    gateway.stop()
    custody.stop()


def _finding_changes(custody: ServerProcess) -> set[str]:
    rows = read_lake(custody.data_dir, "type, admin")
    return {json.loads(admin)["change"] for kind, admin in rows if kind == "admin.finding"}
