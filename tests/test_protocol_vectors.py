"""The worked example of docs/protocol.md is what the implementation produces, byte for byte, and is accepted."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ingest.sdk import public_jwk
from store.ground.canonical import canonicalize, event_hash
from store.ground.jws import sign_compact
from tests.conftest import ADMIN, REPO, Harness

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL

EXAMPLE = json.loads((REPO / "docs" / "vectors" / "protocol_example.json").read_text(encoding="utf-8"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(EXAMPLE["private_key_hex"]))


def test_canonical_bytes_hash_and_jws_match_the_published_example() -> None:
    assert public_jwk(KEY, "gw-example-k1") == EXAMPLE["jwk"]
    for event in EXAMPLE["events"]:
        canonical = canonicalize(event["payload"])
        assert canonical == event["canonical"].encode("utf-8")
        assert event_hash(canonical) == event["event_hash"]
        assert sign_compact(canonical, KEY, "gw-example-k1") == event["jws"]  # Ed25519 is deterministic
    assert EXAMPLE["events"][1]["payload"]["prev_hash"] == EXAMPLE["events"][0]["event_hash"]


def test_the_published_example_is_accepted(harness: Harness) -> None:
    response = harness.client.put(
        "/v1/emitters/gw-example", json={"tenant": "acme", "kind": "gateway", "keys": [EXAMPLE["jwk"]]}, headers=ADMIN
    )
    assert response.status_code == 200
    body = harness.post([event["jws"] for event in EXAMPLE["events"]])
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted"]
    assert body["heads"]["gw-example"] == {"seq": 2, "hash": EXAMPLE["events"][1]["event_hash"]}


def test_the_es256_vector_is_raw_r_s_and_is_accepted(harness: Harness) -> None:
    """ES256 signatures are the raw 64 bytes R || S of RFC 7518, not DER; the vector verifies and is accepted."""
    vector = EXAMPLE["es256"]
    d = int.from_bytes(base64.urlsafe_b64decode(vector["private_key_d"] + "="), "big")
    key = ec.derive_private_key(d, ec.SECP256R1())
    assert public_jwk(key, "gw-example-es-k1") == vector["jwk"]
    canonical = canonicalize(vector["payload"])
    assert canonical == vector["canonical"].encode("utf-8")
    assert event_hash(canonical) == vector["event_hash"]
    header, body, signature = vector["jws"].split(".")
    assert base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)) == canonical
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert len(raw) == 64
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    key.public_key().verify(encode_dss_signature(r, s), f"{header}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    response = harness.client.put(
        "/v1/emitters/gw-example-es",
        json={"tenant": "acme", "kind": "gateway", "keys": [vector["jwk"]]},
        headers=ADMIN,
    )
    assert response.status_code == 200
    [result] = harness.post([vector["jws"]])["results"]
    assert result["status"] == "accepted", result
