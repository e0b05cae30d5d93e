"""Emitter registration, key revocation, head reads, and the server stream that records them."""

from __future__ import annotations

import base64
import itertools
import time
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient

from ingest.app import create_app
from ingest.sdk import generate_key, public_jwk
from ingest.server import IngestServer
from store import engine
from tests.conftest import ADMIN, ADMIN_TOKEN, Harness, read_lake
from tests.signing import chain

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL


def put(harness: Harness, emitter: str, body: object, headers: dict[str, str] = ADMIN) -> tuple[int, dict]:
    response = harness.client.put(f"/v1/emitters/{emitter}", json=body, headers=headers)
    return response.status_code, response.json()


def test_register_view_and_add_a_key(harness: Harness) -> None:
    key1, key2 = generate_key(), generate_key("ES256")
    status, view = put(harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key1, "k1")]})
    assert status == 200
    assert (view["emitter"], view["tenant"], view["kind"]) == ("gw-1", "acme", "gateway")
    assert [k["kid"] for k in view["keys"]] == ["k1"]
    assert view["head"] == {"seq": 0, "hash": "0" * 64}
    status, view = put(harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key2, "k2")]})
    assert status == 200
    assert [k["kid"] for k in view["keys"]] == ["k1", "k2"]
    assert view["keys"][1]["jwk"]["kty"] == "EC"
    listed = harness.client.get("/v1/emitters", headers=ADMIN).json()
    assert [e["emitter"] for e in listed] == ["custody.server", "gw-1"]


def test_same_registration_again_changes_nothing(harness: Harness) -> None:
    body = {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]}
    put(harness, "gw-1", body)
    before = harness.server.service.head("custody.server")
    status, _ = put(harness, "gw-1", body)
    assert status == 200
    assert harness.server.service.head("custody.server") == before


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"tenant": "globex", "kind": "gateway"}, 409, "an emitter never moves"),
        ({"tenant": "acme", "kind": "agent"}, 409, "kind 'gateway'"),
    ],
)
def test_an_emitter_never_changes_tenant_or_kind(harness: Harness, body: dict, status: int, message: str) -> None:
    put(harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]})
    code, error = put(harness, "gw-1", {**body, "keys": [public_jwk(generate_key(), "k9")]})
    assert code == status
    assert error["error"]["code"] == "conflict"
    assert message in error["error"]["message"]


def test_a_registered_key_is_never_replaced(harness: Harness) -> None:
    put(harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]})
    status, error = put(
        harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]}
    )
    assert status == 409
    assert "keys are never replaced" in error["error"]["message"]
    status, error = put(
        harness, "gw-2", {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]}
    )
    assert status == 409
    assert "already belongs to emitter gw-1" in error["error"]["message"]
    # The failed registration of gw-2 left no trace.
    assert harness.client.get("/v1/emitters/gw-2", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("emitter", "body", "message"),
    [
        ("GW_1", {"tenant": "acme", "kind": "gateway"}, "emitter id must match"),
        ("custody.fake", {"tenant": "acme", "kind": "gateway"}, "reserved for the server"),
        ("gw-1", {"tenant": "_system", "kind": "gateway"}, "tenant must match"),
        ("gw-1%0A", {"tenant": "acme", "kind": "gateway"}, "emitter id must match"),  # re.match with $ took it
        ("gw-1", {"tenant": "acme\n", "kind": "gateway"}, "tenant must match"),
        ("gw-1", {"tenant": "acme", "kind": "robot"}, "kind must be one of"),
        ("gw-1", {"tenant": "acme", "kind": "gateway", "keys": []}, "keys must be a list of 1 to 32"),
    ],
)
def test_registration_input_is_checked(harness: Harness, emitter: str, body: dict, message: str) -> None:
    body.setdefault("keys", [public_jwk(generate_key(), "k1")])
    status, error = put(harness, emitter, body)
    assert status == 400
    assert message in error["error"]["message"]


IDENTITY_POINT = base64.urlsafe_b64encode(bytes([1] + [0] * 31)).rstrip(b"=").decode()  # small order: refused


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda jwk: {**jwk, "kty": "RSA"}, "kty must be OKP"),
        (lambda jwk: {**jwk, "crv": "Ed448"}, "crv must be Ed25519"),
        (lambda jwk: {**jwk, "d": jwk["x"]}, "holds a private key"),
        (lambda jwk: {**jwk, "x": "AAAA"}, "not a valid Ed25519 public key"),
        (lambda jwk: {**jwk, "x": IDENTITY_POINT}, "a small-order or non-canonical point"),
        (lambda jwk: {**jwk, "kid": "bad kid!"}, "kid must match"),
        (lambda jwk: {**jwk, "kid": "k1\n"}, "kid must match"),
        (lambda jwk: {**jwk, "alg": "ES256"}, "alg must be EdDSA"),
        (lambda jwk: {**jwk, "extra": "x"}, "unexpected JWK members"),
    ],
)
def test_bad_jwks_are_refused(harness: Harness, mutate, message: str) -> None:
    jwk = mutate(public_jwk(generate_key(), "k1"))
    status, error = put(harness, "gw-1", {"tenant": "acme", "kind": "gateway", "keys": [jwk]})
    assert status == 400
    assert message in error["error"]["message"]


def test_admin_calls_need_the_admin_token(harness: Harness) -> None:
    body = {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(generate_key(), "k1")]}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000"}, {"Authorization": ADMIN_TOKEN}):
        status, error = put(harness, "gw-1", body, headers)
        assert status == 401
        assert error["error"]["code"] == "unauthorized"
    assert harness.client.get("/v1/emitters/gw-1").status_code == 401
    assert harness.client.post("/v1/emitters/gw-1/keys/k1/revoke").status_code == 401


def test_revoke_is_recorded_once_and_unknown_keys_are_404(harness: Harness) -> None:
    _, kid = harness.register("gw-1")
    response = harness.client.post(f"/v1/emitters/gw-1/keys/{kid}/revoke", json={"reason": "rotated"}, headers=ADMIN)
    assert response.status_code == 200
    key = response.json()["keys"][0]
    assert key["revoked_at"] is not None
    assert key["revoke_reason"] == "rotated"
    again = harness.client.post(f"/v1/emitters/gw-1/keys/{kid}/revoke", headers=ADMIN).json()
    assert again["keys"][0]["revoked_at"] == key["revoked_at"]
    missing = harness.client.post("/v1/emitters/gw-1/keys/nope/revoke", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_admin_changes_are_a_signed_chained_stream_in_the_lake(harness: Harness) -> None:
    _, kid = harness.register("gw-1")
    harness.client.post(f"/v1/emitters/gw-1/keys/{kid}/revoke", json={"reason": "rotated"}, headers=ADMIN)
    harness.flush()
    rows = read_lake(harness.data_dir, "emitter, seq, type, tenant, admin, prev_hash, event_hash")
    server_rows = [row for row in rows if row[0] == "custody.server"]
    assert [row[2] for row in server_rows] == [
        "admin.server_key",
        "admin.emitter_registered",
        "admin.key_added",
        "admin.key_revoked",
    ]
    assert {row[3] for row in server_rows} == {"_system"}
    assert '"reason":"rotated"' in server_rows[3][4]
    assert '"actor":"admin:' in server_rows[3][4]
    for previous, row in itertools.pairwise(server_rows):
        assert row[5] == previous[6]


def head_proof(key, kid: str, emitter: str, lifetime: int = 60, **claims) -> str:
    now = int(time.time())
    body = {"sub": emitter, "aud": "custody:head", "iat": now, "exp": now + lifetime, **claims}
    return jwt.encode(body, key, algorithm="EdDSA", headers={"kid": kid})


def test_an_emitter_reads_its_own_head_with_a_signed_proof(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    other_key, other_kid = harness.register("gw-2")
    tokens, _ = chain("gw-1", 3, key, kid)
    harness.post(tokens)

    def get(token: str):
        return harness.client.get("/v1/emitters/gw-1/head", headers={"Authorization": f"Bearer {token}"})

    assert get(head_proof(key, kid, "gw-1")).json()["seq"] == 3
    assert get(ADMIN_TOKEN).json()["seq"] == 3
    refused = {
        "other emitter's key": head_proof(other_key, other_kid, "gw-1"),
        "proof for another subject": head_proof(key, kid, "gw-2"),
        "lives too long": head_proof(key, kid, "gw-1", lifetime=3600),
        "expired": head_proof(key, kid, "gw-1", iat=int(time.time()) - 600, exp=int(time.time()) - 300),
        "wrong audience": head_proof(key, kid, "gw-1", aud="someone-else"),
        "garbage": "abc",
    }
    for reason, token in refused.items():
        response = get(token)
        assert response.status_code == 401, reason
        assert response.json()["error"]["code"] == "unauthorized", reason
    harness.client.post(f"/v1/emitters/gw-1/keys/{kid}/revoke", headers=ADMIN)
    assert get(head_proof(key, kid, "gw-1")).status_code == 401


def serving(data: Path) -> TestClient:
    """An in-process server over ``data``; use as a context manager (start and stop are a restart)."""
    return TestClient(create_app(IngestServer(data, ADMIN_TOKEN, flush_interval=3600)))


def register_gw1(client: TestClient, key) -> None:
    body = {"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, "k1")]}
    assert client.put("/v1/emitters/gw-1", json=body, headers=ADMIN).status_code == 200


def test_registry_heads_and_keys_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = generate_key()
    with serving(data) as client:
        register_gw1(client, key)
        tokens, _ = chain("gw-1", 4, key, "k1")
        client.post("/v1/events", json={"events": tokens[:2]})
        client.post("/v1/emitters/gw-1/keys/k1/revoke", headers=ADMIN)
        server_key = (data / "state" / "server_key.pem").read_bytes()
    with serving(data) as client:
        view = client.get("/v1/emitters/gw-1", headers=ADMIN).json()
        assert view["head"]["seq"] == 2
        assert view["keys"][0]["revoked_at"] is not None
        result = client.post("/v1/events", json={"events": tokens[2:3]}).json()["results"][0]
        assert result["error"] == "key_revoked"
        assert (data / "state" / "server_key.pem").read_bytes() == server_key
    assert oct((data / "state" / "server_key.pem").stat().st_mode & 0o777) == "0o600"


def test_state_is_rebuilt_from_the_lake_when_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read a row at a time (the rebuild reads lake files in batches), the registry, heads and event index come
    back from the lake."""
    monkeypatch.setattr(engine, "_REBUILD_BATCH_ROWS", 1)
    data = tmp_path / "data"
    key = generate_key()
    with serving(data) as client:
        register_gw1(client, key)
        tokens, _ = chain("gw-1", 3, key, "k1")
        client.post("/v1/events", json={"events": tokens[:2]})
    for path in (data / "state").glob("state.sqlite*"):
        path.unlink()
    with serving(data) as client:
        assert client.get("/v1/emitters/gw-1", headers=ADMIN).json()["head"]["seq"] == 2
        statuses = [r["status"] for r in client.post("/v1/events", json={"events": tokens}).json()["results"]]
        assert statuses == ["duplicate", "duplicate", "accepted"]


def test_a_lost_server_key_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serving(data):
        pass
    (data / "state" / "server_key.pem").unlink()
    server = IngestServer(data, ADMIN_TOKEN, flush_interval=3600)
    with pytest.raises(Exception, match="restore the original key file"):
        server.open()
    server.store.close()


def test_the_server_refuses_a_short_admin_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        IngestServer(tmp_path, "short")
