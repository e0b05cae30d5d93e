"""The gateway's decisions without processes: tokens (every way a JWT can be wrong), the default-deny policy, the
two files, and the request metadata an agent controls."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import MCPError

from custody.gateway.app import _clipped, _links
from custody.gateway.auth import InvalidToken, JwtVerifier
from custody.gateway.config import AuthConfig, ConfigError, load_config, load_policy
from custody.gateway.policy import decide, visible
from tests.gateway_kit import AUDIENCE, ISSUER, POLICY, Issuer, write_gateway


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(tmp_path)


@pytest.fixture
def verifier(issuer: Issuer) -> JwtVerifier:
    return JwtVerifier(AuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=issuer.jwks_file))


def test_a_token_gives_the_user_the_agent_chain_and_the_scopes(issuer: Issuer, verifier: JwtVerifier) -> None:
    token = issuer.token("alice", ["orchestrator", "researcher"], ["tickets:read", "invoices:read"], jti="tok-42")
    principal, expires_at = verifier.principal(token)
    assert principal.user == "alice"
    assert principal.agents == ("researcher", "orchestrator")  # the one calling first
    assert principal.scopes == {"tickets:read", "invoices:read"}
    assert principal.delegation == {
        "sub": "alice",
        "iss": ISSUER,
        "client_id": "acme-agent-platform",
        "act": {"sub": "researcher", "act": {"sub": "orchestrator"}},
    }
    assert principal.credential == {
        "id": "tok-42",
        "kind": "agent_token",
        "client_id": "acme-agent-platform",
        "scopes": ["invoices:read", "tickets:read"],
        "expires_at": expires_at,
    }


def test_without_a_jti_the_credential_is_named_by_a_digest_never_the_token(
    issuer: Issuer, verifier: JwtVerifier
) -> None:
    token = issuer.token("alice", ["a"], ["s"])
    principal, _ = verifier.principal(token)
    assert principal.credential["id"].startswith("jwt-sha256:")
    assert token not in json.dumps([principal.delegation, principal.credential])


def _forged(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"x") -> str:
    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return ".".join([part(json.dumps(header).encode()), part(json.dumps(claims).encode()), part(signature)])


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "c", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _deep_act(depth: int) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": "agent-0"}
    for level in range(1, depth):
        act = {"sub": f"agent-{level}", "act": act}
    return act


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_issuer", "issuer"),
        ("wrong_audience", "Audience doesn't match"),
        ("expired", "expired"),
        ("not_yet_valid", "not yet valid"),
        ("no_exp", "exp"),
        ("alg_none", "alg 'none'"),
        ("hs256_with_the_public_key", "alg 'HS256'"),
        ("unknown_kid", "no key with kid"),
        ("other_key", "Signature verification failed"),
        ("act_not_an_object", "act must be an object"),
        ("act_without_sub", "act.act.sub is missing"),
        ("act_too_deep", "deeper than 32"),
        ("no_client_id", "no client_id"),
        ("scope_not_a_string", "scope must be"),
        ("sub_too_long", "sub must be a string of 1 to 512"),
        ("lone_surrogate", "lone surrogate"),
        ("too_many_scopes", "more than 512 scopes"),
        ("garbage", "not a JWT"),
    ],
)
def test_every_bad_token_is_refused_with_its_reason(
    case: str, expected: str, issuer: Issuer, verifier: JwtVerifier
) -> None:
    sign = issuer.key
    claims = _claims()
    headers: dict[str, Any] = {"kid": issuer.kid}
    token: str | None = None
    if case == "wrong_issuer":
        claims["iss"] = "https://evil.test"
    elif case == "wrong_audience":
        claims["aud"] = "another-service"
    elif case == "expired":
        claims["exp"] = int(time.time()) - 3600
    elif case == "not_yet_valid":
        claims["nbf"] = int(time.time()) + 3600
    elif case == "no_exp":
        del claims["exp"]
    elif case == "alg_none":
        token = _forged({"alg": "none", "kid": issuer.kid}, claims, b"")
    elif case == "hs256_with_the_public_key":
        public = json.loads(issuer.jwks_file.read_text())["keys"][0]["x"].encode()
        token = _forged({"alg": "HS256", "kid": issuer.kid}, claims, public)
    elif case == "unknown_kid":
        headers["kid"] = "someone-else"
    elif case == "other_key":
        sign = Ed25519PrivateKey.generate()
    elif case == "act_not_an_object":
        claims["act"] = "orchestrator"
    elif case == "act_without_sub":
        claims["act"] = {"sub": "a", "act": {"client_id": "x"}}
    elif case == "act_too_deep":
        claims["act"] = _deep_act(33)
    elif case == "no_client_id":
        del claims["client_id"]
    elif case == "scope_not_a_string":
        claims["scope"] = ["a", "b"]
    elif case == "sub_too_long":
        claims["sub"] = "u" * 513
    elif case == "lone_surrogate":
        claims["sub"] = "\ud800"
    elif case == "too_many_scopes":
        claims["scope"] = " ".join(f"s{i}" for i in range(513))
    elif case == "garbage":
        token = "not.a.jwt"
    if token is None:  # json.dumps writes a lone surrogate as the escape \ud800, as a hostile issuer could
        token = jwt.api_jws.encode(json.dumps(claims).encode(), sign, algorithm="EdDSA", headers=headers)
    with pytest.raises(InvalidToken, match=expected):
        verifier.principal(token)


def test_a_32_agent_chain_is_accepted(issuer: Issuer, verifier: JwtVerifier) -> None:
    token = jwt.encode(_claims(act=_deep_act(32)), issuer.key, algorithm="EdDSA", headers={"kid": issuer.kid})
    principal, _ = verifier.principal(token)
    assert len(principal.agents) == 32


def test_extra_members_of_an_actor_stay_out_of_the_event(issuer: Issuer, verifier: JwtVerifier) -> None:
    act = {"sub": "agent", "client_id": "runtime", "may_act": {"sub": "x"}, "amr": ["pwd"]}
    token = jwt.encode(_claims(act=act), issuer.key, algorithm="EdDSA", headers={"kid": issuer.kid})
    principal, _ = verifier.principal(token)
    assert principal.delegation["act"] == {"sub": "agent", "client_id": "runtime"}


def test_the_policy_denies_by_default_and_names_the_reason(
    tmp_path: Path, issuer: Issuer, verifier: JwtVerifier
) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    policy = load_policy(tmp_path / "policy.toml")
    principal, _ = verifier.principal(issuer.token("alice", ["bot"], ["tickets:read"]))
    offered = {"read_ticket": ["helpdesk-mcp"], "issue_refund": ["billing-mcp"], "export_all_tickets": ["helpdesk-mcp"]}

    def check(tool: str, arguments: dict[str, Any]) -> tuple[str, str | None, str]:
        decision = decide(policy, principal, tool, arguments, offered.get(tool, []), "acme")
        return decision.result, decision.required_scope, decision.reason

    assert check("read_ticket", {"ticket_id": "T-1"}) == ("allow", "tickets:read", "scope 'tickets:read' granted")
    assert check("issue_refund", {"invoice_id": "I-1", "amount": 5})[:2] == ("deny", "refunds:write")
    assert check("export_all_tickets", {}) == (
        "deny",
        None,
        "tool 'export_all_tickets' is not in policy acme-mcp: default deny",
    )
    assert check("read_ticket", {})[2] == "argument 'ticket_id' must name the ticket (a string); got nothing"
    assert check("read_ticket", {"ticket_id": True})[0] == "deny"
    assert check("read_ticket", {"ticket_id": "x" * 513})[0] == "deny"
    assert check("read_ticket", {"ticket_id": 1234})[0] == "allow"
    assert check("read_ticket", {"ticket_id": 10**600})[2] == "argument 'ticket_id' is a number of more than 512 digits"
    assert check("read_ticket", {"ticket_id": "T-\ud800"})[0] == "deny"
    assert check("add_comment", {"ticket_id": "T-1"})[2] == "upstream 'helpdesk-mcp' offers no tool 'add_comment'"
    decision = decide(policy, principal, "read_ticket", {"ticket_id": "T-1"}, ["helpdesk-mcp"], "acme")
    assert decision.resource == {"type": "ticket", "id": "T-1", "tenant": "acme"}
    assert decision.event_field(policy)["policy"] == policy.label
    assert policy.label.startswith("acme-mcp@sha256:")
    assert visible(policy, principal, "read_ticket", "helpdesk-mcp")
    assert not visible(policy, principal, "read_ticket", "billing-mcp")  # the rule names its server
    assert not visible(policy, principal, "issue_refund", "billing-mcp")
    assert not visible(policy, principal, "export_all_tickets", "helpdesk-mcp")


def test_a_tool_two_upstreams_offer_is_denied_unless_the_policy_names_one(
    tmp_path: Path, issuer: Issuer, verifier: JwtVerifier
) -> None:
    (tmp_path / "policy.toml").write_text('version = 1\nname = "p"\n[tools.search]\nscope = "s"\n')
    policy = load_policy(tmp_path / "policy.toml")
    principal, _ = verifier.principal(issuer.token("alice", ["bot"], ["s"]))
    decision = decide(policy, principal, "search", {}, ["helpdesk-mcp", "billing-mcp"], "acme")
    assert (decision.result, decision.reason) == (
        "deny",
        "tool 'search' is offered by helpdesk-mcp, billing-mcp: the policy must name its server",
    )


def test_a_bad_policy_or_config_names_every_problem(tmp_path: Path, issuer: Issuer) -> None:
    (tmp_path / "policy.toml").write_text(
        'version = 2\nname = "Bad Name"\n[tools.read]\nscop = "x"\n'
        '[tools.other]\nscope = "y"\nresource = { type = "t" }\n'
    )
    with pytest.raises(ConfigError) as policy_error:
        load_policy(tmp_path / "policy.toml")
    message = str(policy_error.value)
    for place in ("version", "name", "tools.read.scope", "tools.read.scop", "tools.other.resource.argument"):
        assert f"  {place}:" in message, message
    config = write_gateway(tmp_path, "http://127.0.0.1:9", issuer)
    config.write_text(config.read_text().replace('failure_mode = "closed"', 'failure_mode = "maybe"\nlisten_port = 1'))
    with pytest.raises(ConfigError) as config_error:
        load_config(config)
    assert "  failure_mode:" in str(config_error.value)
    assert "  listen_port: Extra inputs are not permitted" in str(config_error.value)
    config.write_text('policy_file = "p"\n[[upstreams]]\nname = "x"\ncommand = ["a"]\nurl = "http://b"\n')
    with pytest.raises(ConfigError) as both:
        load_config(config)
    assert "give exactly one of command (stdio) and url (streamable HTTP)" in str(both.value)
    assert "  custody:" in str(both.value)
    assert "  auth:" in str(both.value)
    config.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(config)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "missing.toml")


def test_request_metadata_an_agent_sends_is_checked_before_it_reaches_an_event() -> None:
    parent = "0b5e2f7e-59a4-4c42-8f6a-3f1b0c9d2e11"
    assert _links({"custody/trace_id": "t-1", "custody/parent_event_id": parent}) == {
        "trace_id": "t-1",
        "parent_event_id": parent,
    }
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert _links({"traceparent": traceparent}) == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert _links(None) == {}
    for bad in (
        {"custody/parent_event_id": parent.upper()},
        {"custody/parent_event_id": 7},
        {"custody/trace_id": ""},
        {"custody/trace_id": "x" * 513},
        {"custody/trace_id": ["a"]},
    ):
        with pytest.raises(MCPError):
            _links(bad)


def test_an_upstream_error_text_is_made_fit_for_an_event() -> None:
    assert _clipped("plain") == "plain"
    assert "\ud800" not in _clipped("bad \ud800 surrogate")
    long = _clipped("x" * 5000)
    assert long.endswith("... (3,000 more characters)")
    assert len(long) < 4096  # an attrs value is text of at most 4,096 characters


def test_keys_can_come_from_the_issuers_jwks_url(issuer: Issuer) -> None:
    jwks = issuer.jwks_file.read_bytes()

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        verifier = JwtVerifier(AuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url))
        access, principal = asyncio.run(verifier.authenticate(issuer.token("alice", ["bot"], ["s"])))
        assert (access.subject, principal.agents) == ("alice", ("bot",))
        other = jwt.encode(_claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "nope"})
        assert asyncio.run(verifier.verify_token(other)) is None
    finally:
        server.shutdown()
        server.server_close()


def test_health_details_are_for_the_machine_alone(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from custody.gateway import open_gateway
    from custody.gateway.app import build_app
    from sample_data.mcp.live import write_demo_gateway

    config, _ = write_demo_gateway(tmp_path, 7, "http://127.0.0.1:9", 1)
    gateway = open_gateway(load_config(config))
    try:
        remote = TestClient(build_app(gateway), client=("203.0.113.9", 40000)).get("/healthz")
        assert remote.json() == {"ok": False}  # no upstream connected: 503, and nothing more
        assert remote.status_code == 503
        local = TestClient(build_app(gateway), client=("127.0.0.1", 40000)).get("/healthz").json()
        assert set(local) >= {"upstreams", "spool", "calls", "policy"}
    finally:
        gateway.emitter.close()
