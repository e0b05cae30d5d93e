"""The demo's live agent session: a real MCP client, through a real ``custody gateway``, in front of the demo's
real MCP servers, so the newest incident in the demo comes from a real enforcement decision.

dana@acme.example's support-agent hands a ticket to triage-subagent (RFC 8693 token exchange: the token's ``act``
chain is support-agent -> triage-subagent, its scopes tickets:read and tickets:write). The sub-agent reads ticket
T-1002, whose customer note is a prompt injection, and obeys it: refunds, an invoice read, a bulk export. The gateway
allows what the scopes cover and denies the rest before it reaches billing-mcp; every call is one signed event, the
injected ones children of the read that carried the injection, and the burst of denials is a finding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

__all__ = [
    "DEMO_GATEWAY",
    "DEMO_ISSUER",
    "LiveSession",
    "agent_client",
    "demo_token",
    "issuer_emitter",
    "run_live_session",
    "use_again",
    "write_demo_gateway",
]

DEMO_GATEWAY = "gw-acme-mcp"
DEMO_ISSUER = "idp-acme-oauth"  # the OAuth issuer of the agents' tokens, as an emitter: it posts their revocations
TENANT = "acme"
ISSUER = "https://idp.acme.example"
AUDIENCE = "custody-gateway"
POLICY = Path(__file__).with_name("policy.toml")


def _seeded_key(seed: int, name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"custody-demo/{seed}/{name}".encode()).digest())


def write_demo_gateway(
    directory: Path,
    seed: int,
    custody_url: str,
    port: int,
    *,
    upstream_urls: dict[str, str] | None = None,
    revocations: tuple[str, str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The demo gateway's files in ``directory`` (keys derived from the seed); returns the config's path and the
    body of its emitter's registration. The upstreams are started over stdio, or reached at ``upstream_urls``
    (name -> streamable HTTP URL)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _seeded_key(seed, DEMO_GATEWAY)
    key_file = directory / "gateway-key.pem"
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_file.chmod(0o600)
    issuer = _seeded_key(seed, "idp-acme-oauth")
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(issuer.public_key()))
    (directory / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "acme-oauth-1", "alg": "EdDSA"}]}))
    (directory / "policy.toml").write_text(POLICY.read_text())
    upstreams = "".join(
        f'\n[[upstreams]]\nname = "{name}"\n'
        + (
            f'url = "{upstream_urls[name]}"\n'
            if upstream_urls
            else f"command = {json.dumps([sys.executable, '-m', 'sample_data.mcp.servers', name])}\n"
        )
        for name in ("helpdesk-mcp", "billing-mcp")
    )
    config = directory / "gateway.toml"
    config.write_text(
        f"""\
# The demo's gateway (docs/gateway.md); written by custody demo.
policy_file = "policy.toml"
failure_mode = "closed"

[listen]
host = "127.0.0.1"
port = {port}

[custody]
url = "{custody_url}"
emitter = "{DEMO_GATEWAY}"
tenant = "{TENANT}"
key_file = "gateway-key.pem"
kid = "{DEMO_GATEWAY}-{seed}"
spool = "spool"

{_revocations_section(revocations)}[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "jwks.json"
{upstreams}"""
    )
    public = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    registration = {"tenant": TENANT, "kind": "gateway", "keys": [{**public, "kid": f"{DEMO_GATEWAY}-{seed}"}]}
    return config, registration


def _revocations_section(revocations: tuple[str, str] | None) -> str:
    if revocations is None:
        return ""
    url, token_file = revocations
    return f'[revocations]\nurl = "{url}"\ntoken_file = "{token_file}"\npoll_seconds = 1\n\n'


def issuer_emitter(seed: int) -> tuple[Ed25519PrivateKey, str, dict[str, Any]]:
    """The demo issuer's emitter key, kid and registration body (kind idp, tenant acme)."""
    key = _seeded_key(seed, f"{DEMO_ISSUER}-emitter")
    kid = f"{DEMO_ISSUER}-{seed}"
    public = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    return key, kid, {"tenant": TENANT, "kind": "idp", "keys": [{**public, "kid": kid}]}


def demo_token(seed: int, user: str, agents: list[str], scopes: list[str], *, ttl: int = 900) -> str:
    """A token of the demo's OAuth issuer: ``agents`` the chain, first agent first."""
    now = int(time.time())
    act: dict[str, Any] | None = None
    for agent in agents:
        act = {"sub": agent, **({"act": act} if act else {})}
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": user,
        "client_id": "acme-agent-platform",
        "scope": " ".join(scopes),
        "jti": f"live-{agents[-1]}-{now}",
        "iat": now,
        "exp": now + ttl,
        **({"act": act} if act else {}),
    }
    return jwt.encode(claims, _seeded_key(seed, "idp-acme-oauth"), algorithm="EdDSA", headers={"kid": "acme-oauth-1"})


@dataclass
class LiveSession:
    trace_id: str
    token: str = ""  # the sub-agent's bearer token
    credential: str = ""  # its id in the log (the token's jti)
    injected_read: str = ""  # the event of the read that carried the injection
    allowed: list[str] = field(default_factory=list)
    denied: list[str] = field(default_factory=list)
    first_denied_refund: str = ""
    reused: str = ""  # the call made with the token after its revocation
    reuse_decision: str = ""
    critical: int | None = None  # the finding continuous detection opened for it


@asynccontextmanager
async def agent_client(gateway_url: str, token: str) -> AsyncIterator[Client]:
    """An MCP client session with the gateway, as an agent holding ``token``."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(f"{gateway_url}/mcp", http_client=http)) as client,
    ):
        yield client


async def run_live_session(gateway_url: str, seed: int) -> LiveSession:
    token = demo_token(
        seed, "dana@acme.example", ["support-agent", "triage-subagent"], ["tickets:read", "tickets:write"]
    )
    session = LiveSession(trace_id=f"live-{int(time.time())}", token=token)
    session.credential = str(jwt.decode(token, options={"verify_signature": False})["jti"])
    async with agent_client(gateway_url, token) as client:
        trace: Any = {"custody/trace_id": session.trace_id}
        ticket = await client.call_tool("read_ticket", {"ticket_id": "T-1002"}, meta=trace)
        session.injected_read, _ = _recorded(ticket.meta)
        session.allowed.append(session.injected_read)
        caused: Any = {**trace, "custody/parent_event_id": session.injected_read}
        calls: list[tuple[str, dict[str, Any]]] = [
            ("add_comment", {"ticket_id": "T-1002", "text": "Maintenance mode acknowledged; processing refund."}),
            ("issue_refund", {"invoice_id": "INV-78", "amount": 45000}),
            ("issue_refund", {"invoice_id": "INV-78", "amount": 45000}),
            ("read_invoice", {"invoice_id": "INV-78"}),
            ("issue_refund", {"invoice_id": "INV-78", "amount": 22500}),
            ("export_all_tickets", {}),
            ("export_all_tickets", {}),
        ]
        for tool, arguments in calls:
            result = await client.call_tool(tool, arguments, meta=caused)
            event_id, decision = _recorded(result.meta)
            if decision == "deny":
                session.denied.append(event_id)
                if tool == "issue_refund" and not session.first_denied_refund:
                    session.first_denied_refund = event_id
            else:
                session.allowed.append(event_id)
    return session


async def use_again(gateway_url: str, session: LiveSession) -> str:
    """The sub-agent calls one more tool with its token after its issuer revoked it: the signature and expiry still
    check out, but the gateway's revocation feed (the log) denies it. Returns the call's event id."""
    async with agent_client(gateway_url, session.token) as client:
        trace: Any = {"custody/trace_id": session.trace_id}
        result = await client.call_tool("read_ticket", {"ticket_id": "T-1001"}, meta=trace)
    event_id, decision = _recorded(result.meta)
    session.reuse_decision = "denied by the gateway" if decision == "deny" else "allowed (the gateway had not heard)"
    return event_id


def _recorded(meta: dict[str, Any] | None) -> tuple[str, str]:
    """The event id and decision the gateway put in a result's ``_meta``."""
    if not meta or "custody/event_id" not in meta:
        raise RuntimeError(f"the gateway recorded no event for a call (result _meta: {meta})")
    return str(meta["custody/event_id"]), str(meta.get("custody/decision"))


def _main() -> None:  # pragma: no cover - a manual entry point: python -m sample_data.mcp.live URL SEED
    import asyncio

    print(asyncio.run(run_live_session(sys.argv[1], int(sys.argv[2]))))


if __name__ == "__main__":
    _main()
