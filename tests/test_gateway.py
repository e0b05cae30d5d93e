"""``custody gateway`` end to end, every part real: a ``custody serve``, the gateway process, the demo's MCP servers
(helpdesk over stdio, billing over streamable HTTP), and the official ``mcp`` client carrying a JWT for a user ->
orchestrator -> sub-agent chain."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import _STARTED, REPO, ServerProcess, free_port, read_lake
from tests.gateway_kit import (
    GATEWAY_ID,
    GatewayProcess,
    Issuer,
    calls_received,
    mcp_client,
    register_gateway,
    write_gateway,
)

pytestmark = pytest.mark.slow


def start_billing_over_http(call_log: Path, log_path: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "sample_data.mcp.servers", "billing-mcp", "--http", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={"CUSTODY_MCP_CALL_LOG": str(call_log)}
        )
    _STARTED.append(process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"billing did not start: {log_path.read_text()[-2000:]}")


def mixed_upstreams(call_log: Path, billing_url: str) -> str:
    helpdesk = json.dumps([sys.executable, "-m", "sample_data.mcp.servers", "helpdesk-mcp"])
    return (
        f'[[upstreams]]\nname = "helpdesk-mcp"\ncommand = {helpdesk}\ncwd = {json.dumps(str(REPO))}\n'
        f"env = {{ CUSTODY_MCP_CALL_LOG = {json.dumps(str(call_log))} }}\n\n"
        f'[[upstreams]]\nname = "billing-mcp"\nurl = "{billing_url}"\n'
    )


async def call(url: str, token: str, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> Any:
    async with mcp_client(url, token) as client:
        return await client.call_tool(tool, arguments, meta=meta)


def test_calls_through_the_gateway_are_enforced_recorded_and_survive_custody_being_away(tmp_path: Path) -> None:
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    issuer = Issuer(tmp_path)
    call_log = tmp_path / "calls.jsonl"
    port = free_port()
    start_billing_over_http(call_log, tmp_path / "billing.log", port)
    billing_url = f"http://127.0.0.1:{port}/mcp"
    log_key = subprocess.run(
        [sys.executable, "-m", "custody.cli", "log", "key", "--data-dir", str(custody.data_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.strip()
    config = write_gateway(
        tmp_path, custody.url, issuer, upstreams=mixed_upstreams(call_log, billing_url), log_key=log_key
    )
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["orchestrator", "researcher"], ["tickets:read", "invoices:read"], jti="tok-alice-1")

    # No token, or a token from another issuer: the MCP endpoint answers 401 with where to get one (RFC 9728).
    for headers in ({}, {"Authorization": "Bearer " + Issuer(tmp_path / "..").token("mallory", [], ["x"])}):
        answer = httpx.post(
            f"{gateway.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers
        )
        assert answer.status_code == 401
        assert "resource_metadata" in answer.headers["www-authenticate"]

    expected: dict[str, tuple[str, str, str | None]] = {}  # event id -> (tool, decision, resource id)

    async def session() -> None:
        async with mcp_client(gateway.url, token) as client:
            listed = sorted(tool.name for tool in (await client.list_tools()).tools)
            assert listed == ["read_invoice", "read_ticket"]  # only what these scopes may call
            first = await client.call_tool("read_ticket", {"ticket_id": "T-1001"}, meta={"custody/trace_id": "trace-7"})
            assert not first.is_error
            assert "VPN drops" in first.content[0].text
            parent = first.meta["custody/event_id"]
            expected[parent] = ("read_ticket", "allow", "T-1001")
            linked = {"custody/trace_id": "trace-7", "custody/parent_event_id": parent}
            invoice = await client.call_tool("read_invoice", {"invoice_id": "INV-77"}, meta=linked)
            assert invoice.content[0].text == "INV-77: 1290 EUR"
            expected[invoice.meta["custody/event_id"]] = ("read_invoice", "allow", "INV-77")
            refund = await client.call_tool("issue_refund", {"invoice_id": "INV-77", "amount": 1290}, meta=linked)
            assert refund.is_error
            assert "scope 'refunds:write' is not granted" in refund.content[0].text
            expected[refund.meta["custody/event_id"]] = ("issue_refund", "deny", "INV-77")
            export = await client.call_tool("export_all_tickets", {}, meta=linked)
            assert export.is_error
            assert "not in policy acme-mcp: default deny" in export.content[0].text
            expected[export.meta["custody/event_id"]] = ("export_all_tickets", "deny", None)

    asyncio.run(session())
    received = [(c["server"], c["tool"]) for c in calls_received(call_log)]
    assert received == [("helpdesk-mcp", "read_ticket"), ("billing-mcp", "read_invoice")]  # no denied call got through

    # Custody goes away: calls go on (the spool holds their events), across a restart of the gateway itself.
    gateway.wait_drained()
    custody.stop()

    async def while_away(count: int) -> None:
        for number in range(count):
            result = await call(gateway.url, token, "read_ticket", {"ticket_id": f"T-{2000 + number}"})
            assert not result.is_error
            expected[result.meta["custody/event_id"]] = ("read_ticket", "allow", f"T-{2000 + number}")
        denied = await call(gateway.url, token, "add_comment", {"ticket_id": "T-1", "text": "hi"})
        assert denied.is_error
        expected[denied.meta["custody/event_id"]] = ("add_comment", "deny", "T-1")

    asyncio.run(while_away(5))
    assert gateway.health()["spool"]["pending"] == 6
    assert gateway.stop() == 0
    gateway.start()
    asyncio.run(while_away(3))
    assert gateway.health()["spool"]["pending"] == 10

    custody.start()
    health = gateway.wait_drained()
    assert health["spool"]["blocked"] is None
    deadline = time.monotonic() + 30
    while health["spool"]["checkpoint_seen"] is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the restarted gateway fetches the checkpoint again once Custody is back
        health = gateway.health()
    assert health["spool"]["checkpoint_seen"] >= 1
    assert health["spool"]["misbehaved"] is None  # every receipt and checkpoint checked out against the log's key
    custody.stop()

    rows = [
        row
        for row in read_lake(custody.data_dir, "event_id, emitter, seq, tool_name, decision_result, resource_id")
        if row[1] == GATEWAY_ID
    ]
    assert Counter(row[0] for row in rows) == Counter(expected.keys())  # every call, each exactly once
    assert [row[2] for row in rows] == list(range(1, len(expected) + 1))  # one chain, no gap
    for event_id, _, _, tool, decision, resource in rows:
        assert (tool, decision, resource) == expected[event_id]

    for event_id, (tool, _, resource) in expected.items():
        shown = subprocess.run(
            [sys.executable, "-m", "custody.cli", "path", "--data-dir", str(custody.data_dir), event_id],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        chain = "user alice -> agent orchestrator -> agent researcher -> tool " + tool
        assert chain in shown, shown
        if resource is not None:
            kind = "invoice" if tool in ("read_invoice", "issue_refund") else "ticket"
            assert f"resource {kind} {resource} (acme)" in shown
    verified = subprocess.run(
        [sys.executable, "-m", "custody.cli", "verify", "--data-dir", str(custody.data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_a_full_spool_refuses_calls_when_closed_and_lets_them_through_when_open(
    tmp_path: Path, failure_mode: str
) -> None:
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    issuer = Issuer(tmp_path)
    call_log = tmp_path / "calls.jsonl"
    config = write_gateway(
        tmp_path, custody.url, issuer, failure_mode=failure_mode, max_spool_bytes=1 << 18, call_log=call_log
    )
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["bot"], ["tickets:read"])
    custody.stop()

    async def until_refused() -> tuple[int, Any]:
        async with mcp_client(gateway.url, token) as client:
            for number in range(1, 401):
                result = await client.call_tool("read_ticket", {"ticket_id": f"T-{number}"})
                if result.is_error:
                    return number, result
        return 400, None

    calls, refusal = asyncio.run(until_refused())
    reached = len(calls_received(call_log))
    health = gateway.health()
    if failure_mode == "closed":
        assert refusal is not None, "the spool never filled"
        assert "no audit, no action" in refusal.content[0].text
        assert "custody/event_id" not in refusal.meta  # nothing was recorded, and nothing claims it was
        assert reached == calls - 1  # the refused call never reached the upstream
        assert health["calls"]["refused"] == 1
        assert health["spool"]["pending"] == calls - 1
    else:
        assert refusal is None  # open: every call went through
        assert reached == calls
        assert health["calls"]["unaudited"] > 0
        assert health["spool"]["pending"] + health["calls"]["unaudited"] == calls
    assert health["spool"]["bytes_unacknowledged"] <= 1 << 18

    custody.start()  # room again once Custody takes the spool
    gateway.wait_drained()
    allowed = asyncio.run(call(gateway.url, token, "read_ticket", {"ticket_id": "T-after"}))
    assert not allowed.is_error
    gateway.wait_drained()


def test_an_upstream_that_dies_is_an_error_outcome_and_is_reconnected(tmp_path: Path) -> None:
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    issuer = Issuer(tmp_path)
    call_log = tmp_path / "calls.jsonl"
    port = free_port()
    billing = start_billing_over_http(call_log, tmp_path / "billing.log", port)
    config = write_gateway(
        tmp_path, custody.url, issuer, upstreams=mixed_upstreams(call_log, f"http://127.0.0.1:{port}/mcp")
    )
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["bot"], ["invoices:read", "tickets:read"])
    outcomes: dict[str, str] = {}

    def read(tool: str, arguments: dict[str, Any]) -> Any:
        result = asyncio.run(call(gateway.url, token, tool, arguments))
        outcomes[result.meta["custody/event_id"]] = "error" if result.is_error else "success"
        return result

    billing.kill()
    billing.wait()
    failed = read("read_invoice", {"invoice_id": "INV-77"})
    assert failed.is_error
    assert "upstream billing-mcp" in failed.content[0].text
    start_billing_over_http(call_log, tmp_path / "billing.log", port)  # back on its address
    deadline = time.monotonic() + 60
    while read("read_invoice", {"invoice_id": "INV-77"}).is_error:
        assert time.monotonic() < deadline, gateway.log_path.read_text()[-3000:]
        time.sleep(0.2)

    # A stdio upstream whose process dies is started again.
    assert gateway.process is not None
    [helpdesk] = subprocess.run(
        ["pgrep", "-P", str(gateway.process.pid)], capture_output=True, text=True
    ).stdout.split()
    subprocess.run(["kill", "-9", helpdesk], check=True)
    deadline = time.monotonic() + 60
    while read("read_ticket", {"ticket_id": "T-1001"}).is_error:
        assert time.monotonic() < deadline, gateway.log_path.read_text()[-3000:]
        time.sleep(0.2)
    [again] = subprocess.run(["pgrep", "-P", str(gateway.process.pid)], capture_output=True, text=True).stdout.split()
    assert again != helpdesk

    gateway.wait_drained()
    custody.stop()
    rows = [
        r
        for r in read_lake(custody.data_dir, "emitter, event_id, outcome, decision_result, attrs")
        if r[0] == GATEWAY_ID
    ]
    assert {row[1]: row[2] for row in rows} == outcomes  # each call's outcome as the agent saw it
    assert all(row[3] == "allow" for row in rows)
    assert "upstream billing-mcp" in str(rows[0][4])


def test_hostile_calls_never_break_the_gateway_or_block_its_audit_trail(tmp_path: Path) -> None:
    """Whatever an agent sends (names, arguments, request metadata), the gateway answers with a result or an MCP
    error, never reaches an upstream with a denied call, and never spools an event Custody would refuse (which
    would stop the delivery of every event after it)."""
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    issuer = Issuer(tmp_path)
    call_log = tmp_path / "calls.jsonl"
    config = write_gateway(tmp_path, custody.url, issuer, call_log=call_log)
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["bot"], ["tickets:read", "tickets:write"])
    hostile_names = [
        "",
        "x" * 513,
        "read_ticket\x00",
        "read_ticket ",
        "../../etc/passwd",
        "\u202eread_ticket",
        "é" * 512,
    ]
    hostile_arguments: list[dict[str, Any]] = [
        {"ticket_id": "x" * 10_000},
        {"ticket_id": 10**700},
        {"ticket_id": ["T-1"]},
        {"ticket_id": {"$ne": 1}},
        {"ticket_id": None},
        {"ticket_id": "T-1\u0000\u001b[31m"},
        {"ticket_id": "T-" + "\U0001f600" * 200},
        {},
    ]
    hostile_meta: list[dict[str, Any]] = [
        {"custody/parent_event_id": "not-a-uuid"},
        {"custody/parent_event_id": "0B5E2F7E-59A4-4C42-8F6A-3F1B0C9D2E11"},
        {"custody/trace_id": "t" * 600},
        {"custody/trace_id": 42},
        {"traceparent": "garbage"},
    ]
    outcomes: list[str] = []

    async def attack() -> None:
        async with mcp_client(gateway.url, token) as client:
            for name in hostile_names:
                outcomes.append(await _try(client.call_tool(name, {"ticket_id": "T-1"})))
            for arguments in hostile_arguments:
                outcomes.append(await _try(client.call_tool("read_ticket", arguments)))
            for meta in hostile_meta:
                outcomes.append(await _try(client.call_tool("read_ticket", {"ticket_id": "T-1"}, meta=meta)))

    asyncio.run(attack())
    assert len(outcomes) == len(hostile_names) + len(hostile_arguments) + len(hostile_meta)
    assert "error: internal" not in " ".join(outcomes), outcomes
    health = gateway.wait_drained()
    assert health["spool"]["blocked"] is None, health  # every spooled event was accepted by Custody
    reached = [(c["tool"], c["arguments"]) for c in calls_received(call_log)]
    for tool, arguments in reached:  # only what the policy allows, with a nameable resource, reached helpdesk
        assert tool == "read_ticket"
        assert isinstance(arguments["ticket_id"], str)
        assert 0 < len(arguments["ticket_id"]) <= 512
    custody.stop()
    rows = [r for r in read_lake(custody.data_dir, "emitter, decision_result") if r[0] == GATEWAY_ID]
    assert len(rows) == len([o for o in outcomes if o.startswith("result")])  # every answered call is recorded


async def _try(call: Any) -> str:
    try:
        result = await call
    except Exception as exc:  # an MCP error answer: the call was refused before any decision
        text = str(exc).lower()
        return "error: internal" if "internal" in text else f"error: {text[:80]}"
    return f"result: {'error' if result.is_error else 'ok'}"


def test_a_credential_revoked_in_the_log_is_denied_at_the_gateway(tmp_path: Path) -> None:
    from custody_sdk import Emitter, generate_key, public_jwk

    from query.tokens import TokenStore

    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    tokens = TokenStore(tmp_path / "tokens.json")
    (tmp_path / "gateway.token").write_text(tokens.issue("gateway", "analyst", "acme") + "\n")
    read_port = free_port()
    with (tmp_path / "read.log").open("wb") as read_log:
        read_api = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "serve-query", "--data-dir", str(custody.data_dir),
             "--tokens", str(tmp_path / "tokens.json"), "--port", str(read_port)],
            cwd=REPO, stdout=read_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _STARTED.append(read_api)
    issuer = Issuer(tmp_path)
    call_log = tmp_path / "calls.jsonl"
    config = write_gateway(tmp_path, custody.url, issuer, call_log=call_log)
    config.write_text(
        config.read_text().replace(
            "[listen]",
            f'[revocations]\nurl = "http://127.0.0.1:{read_port}"\ntoken_file = "gateway.token"\npoll_seconds = 0.5\n\n'
            "[listen]",
        )
    )
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["bot"], ["tickets:read"], jti="tok-to-revoke")
    assert not asyncio.run(call(gateway.url, token, "read_ticket", {"ticket_id": "T-1"})).is_error

    key = generate_key()
    httpx.put(
        f"{custody.url}/v1/emitters/idp-acme",
        json={"tenant": "acme", "kind": "idp", "keys": [public_jwk(key, "idp-acme-k1")]},
        headers={"Authorization": "Bearer test-admin-token-0123456789"},
    ).raise_for_status()
    with Emitter(custody.url, "idp-acme", "acme", key, "idp-acme-k1", spool=tmp_path / "idp") as idp:
        idp.emit(
            type="credential.revoked",
            credential={"id": "tok-to-revoke", "kind": "agent_token", "client_id": "acme-agent-platform", "scopes": []},
            revoked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        idp.flush()
    deadline = time.monotonic() + 60
    while gateway.health()["revocations"]["known"] < 1:
        assert time.monotonic() < deadline, gateway.health()
        time.sleep(0.2)
    denied = asyncio.run(call(gateway.url, token, "read_ticket", {"ticket_id": "T-2"}))
    assert denied.is_error
    assert "credential tok-to-revoke was revoked" in denied.content[0].text
    assert [c["arguments"]["ticket_id"] for c in calls_received(call_log)] == ["T-1"]  # the denied call never arrived
    other = issuer.token("alice", ["bot"], ["tickets:read"], jti="tok-still-good")
    assert not asyncio.run(call(gateway.url, other, "read_ticket", {"ticket_id": "T-3"})).is_error
    gateway.wait_drained()
    custody.stop()
    rows = [r for r in read_lake(custody.data_dir, "emitter, credential_id, decision_result, decision_reason")
            if r[0] == GATEWAY_ID]  # fmt: skip
    assert [(r[1], r[2]) for r in rows] == [
        ("tok-to-revoke", "allow"),
        ("tok-to-revoke", "deny"),
        ("tok-still-good", "allow"),
    ]
    assert "was revoked" in rows[1][3]


def test_clients_of_the_handshake_era_are_served_and_enforced_the_same(tmp_path: Path) -> None:
    """MCP clients that speak the 2025 protocol (initialize handshake, sessions) get the same enforcement and
    records as the 2026-07-28 per-request protocol."""
    custody = ServerProcess(tmp_path / "data", tmp_path / "custody.log").start()
    issuer = Issuer(tmp_path)
    config = write_gateway(tmp_path, custody.url, issuer)
    register_gateway(config, custody.url)
    gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
    token = issuer.token("alice", ["orchestrator", "researcher"], ["tickets:read"])
    seen: dict[str, tuple[str, list[str], bool, bool]] = {}

    async def session(mode: str) -> None:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
            Client(streamable_http_client(f"{gateway.url}/mcp", http_client=http), mode=mode) as client,
        ):
            listed = sorted(tool.name for tool in (await client.list_tools()).tools)
            allowed = await client.call_tool("read_ticket", {"ticket_id": "T-1001"})
            denied = await client.call_tool("issue_refund", {"invoice_id": "INV-77", "amount": 1})
            seen[mode] = (client.session.protocol_version, listed, allowed.is_error, denied.is_error)

    asyncio.run(session("legacy"))
    asyncio.run(session("auto"))
    assert seen["legacy"][0] < "2026"  # the handshake era
    assert seen["auto"][0] >= "2026"
    assert seen["legacy"][1:] == seen["auto"][1:] == (["read_ticket"], False, True)
    assert gateway.wait_drained()["calls"] == {
        "allowed": 2, "denied": 2, "refused": 0, "unaudited": 0, "upstream_errors": 0
    }  # fmt: skip
    custody.stop()
