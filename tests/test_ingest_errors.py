"""Every per-event error code of POST /v1/events, each with nothing stored for the rejected event."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.sdk import generate_key, public_jwk, rfc3339
from store.ground.canonical import ZERO_HASH
from tests.conftest import ADMIN, Harness, invocation, read_lake
from tests.signing import b64, chain, hash_of, hs256_token, payload, sign, sign_raw, unsigned_token

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL


def header(members: dict[str, Any]) -> str:
    return b64(orjson.dumps(members))


def only(body: dict[str, Any]) -> dict[str, Any]:
    assert len(body["results"]) == 1
    result: dict[str, Any] = body["results"][0]
    return result


def assert_rejected(harness: Harness, token: Any, code: str, detail: str) -> dict[str, Any]:
    body = harness.post([token])
    result = only(body)
    assert result["status"] == "rejected", result
    assert result["error"] == code, result
    assert detail in result["detail"], result["detail"]
    assert body["errors"] is True
    return result


def stored_emitters(harness: Harness) -> list[tuple[str, int]]:
    harness.flush()
    return [row for row in read_lake(harness.data_dir, "emitter, seq") if row[0] != "custody.server"]


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("not-a-jws", "expected 3 dot-separated parts, got 1"),
        ("a.b", "got 2"),
        ("a.b.c.d", "got 4"),
        (12345, "expected a JWS compact string, got int"),
        (None, "got NoneType"),
        ({"jws": "x"}, "got dict"),
        ("!!!.e30.AA", "header is not unpadded base64url"),
        (f"{b64(b'not json')}.e30.AA", "protected header is not JSON"),
        (f"{b64(b'[1]')}.e30.AA", "not a JSON object"),
        (header({"alg": "EdDSA"}) + ".e30.AA", "no kid"),
        (header({"alg": "EdDSA", "kid": "k"}) + ".e30=.AA", "unpadded base64url"),
        (header({"alg": "EdDSA", "kid": "k", "crit": ["x"]}) + ".e30.AA", "crit"),
    ],
)
def test_malformed_jws(harness: Harness, token: Any, detail: str) -> None:
    assert_rejected(harness, token, "malformed_jws", detail)


def test_alg_none_is_rejected(harness: Harness) -> None:
    _, kid = harness.register("gw-1")
    token = unsigned_token({"alg": "none", "kid": kid}, payload("gw-1"))
    assert_rejected(harness, token, "unsupported_alg", "got 'none'")
    assert stored_emitters(harness) == []


def test_hs256_keyed_with_the_public_key_is_rejected(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    public = public_jwk(key, kid)
    for secret in (public["x"].encode(), orjson.dumps(public)):
        token = hs256_token({"alg": "HS256", "kid": kid}, payload("gw-1"), secret)
        assert_rejected(harness, token, "unsupported_alg", "got 'HS256'")
    assert stored_emitters(harness) == []


@pytest.mark.parametrize("alg", ["RS256", "ES384", "EdDSA25519", "", None])
def test_other_algs_are_rejected(harness: Harness, alg: Any) -> None:
    _, kid = harness.register("gw-1")
    assert_rejected(
        harness, unsigned_token({"alg": alg, "kid": kid}, payload("gw-1")), "unsupported_alg", "alg must be"
    )


def test_alg_that_does_not_match_the_key_type_is_rejected(harness: Harness) -> None:
    _, ed_kid = harness.register("gw-1")
    ec_key = generate_key("ES256")
    # A real ES256 signature, but the kid names an Ed25519 key.
    token = sign(payload("gw-1"), ec_key, ed_kid)
    assert_rejected(harness, token, "unsupported_alg", "is EdDSA, but the header says alg 'ES256'")


def test_unknown_key(harness: Harness) -> None:
    key = generate_key()
    assert_rejected(harness, sign(payload("gw-1"), key, "nobody-k1"), "unknown_key", "'nobody-k1'")


def test_bad_signature_from_another_key_under_a_registered_kid(harness: Harness) -> None:
    _, kid = harness.register("gw-1")
    forged = sign(payload("gw-1"), generate_key(), kid)
    assert_rejected(harness, forged, "bad_signature", f"does not verify with key {kid!r}")
    assert stored_emitters(harness) == []


def test_bad_signature_when_the_payload_is_altered_after_signing(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    body = payload("gw-1")
    header, _, signature = sign(body, key, kid).split(".")
    altered = dict(body, outcome="error")
    from store.ground.canonical import canonicalize

    token = f"{header}.{b64(canonicalize(altered))}.{signature}"
    assert_rejected(harness, token, "bad_signature", "does not verify")


def test_es256_events_are_accepted(harness: Harness) -> None:
    key, kid = harness.register("gw-ec", alg="ES256")
    tokens, _ = chain("gw-ec", 3, key, kid)
    body = harness.post(tokens)
    assert [r["status"] for r in body["results"]] == ["accepted"] * 3
    assert stored_emitters(harness) == [("gw-ec", 1), ("gw-ec", 2), ("gw-ec", 3)]


def test_revoked_key_is_rejected_and_other_keys_still_work(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, bodies = chain("gw-1", 2, key, kid)
    assert only(harness.post(tokens[:1]))["status"] == "accepted"
    response = harness.client.post(
        f"/v1/emitters/gw-1/keys/{kid}/revoke", json={"reason": "laptop stolen"}, headers=ADMIN
    )
    assert response.status_code == 200
    assert_rejected(harness, tokens[1], "key_revoked", f"key {kid!r} of gw-1 was revoked at")
    # A second key of the same emitter continues the chain.
    new_key = generate_key()
    response = harness.client.put(
        "/v1/emitters/gw-1",
        headers=ADMIN,
        json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(new_key, "gw-1-k2")]},
    )
    assert response.status_code == 200
    token = sign(payload("gw-1", 2, hash_of(bodies[0])), new_key, "gw-1-k2")
    assert only(harness.post([token]))["status"] == "accepted"
    assert stored_emitters(harness) == [("gw-1", 1), ("gw-1", 2)]


def test_key_of_emitter_a_cannot_post_as_emitter_b(harness: Harness) -> None:
    key_a, kid_a = harness.register("gw-a")
    harness.register("gw-b")
    result = assert_rejected(
        harness,
        sign(payload("gw-b"), key_a, kid_a),
        "emitter_mismatch",
        f"payload emitter is 'gw-b', but key {kid_a!r} belongs to 'gw-a'",
    )
    assert result["event_id"] is not None
    assert stored_emitters(harness) == []


def test_tenant_mismatch(harness: Harness) -> None:
    key, kid = harness.register("gw-1", tenant="acme")
    assert_rejected(
        harness,
        sign(payload("gw-1", tenant="globex"), key, kid),
        "tenant_mismatch",
        "payload tenant is 'globex', but emitter 'gw-1' is registered to 'acme'",
    )


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"attrs": {"ratio": 0.5}}, "$.attrs.ratio: numbers must be integers, got 0.5"),
        ({"seq": 1.0}, "$.seq: numbers must be integers"),
        ({"attrs": {"big": 2**60}}, "outside +/-2**53"),
        ({"v": 2}, "v: Input should be less than or equal to 1"),
        ({"v": True}, "v: Input should be a valid integer"),
        ({"attrs": {"flag": 1, "n": True, "s": None}}, "attrs.s"),
        ({"seq": "1"}, "seq: Input should be a valid integer"),
        ({"event_id": "not-a-uuid"}, "event_id: String should match pattern"),
        ({"event_id": "6F9619FF-8B86-D011-B42D-00CF4FC964FF"}, "event_id: String should match pattern"),
        ({"type": "tool.deleted"}, "type: Input should be"),
        ({"occurred_at": "2026-11-29 08:00:00"}, "occurred_at: String should match pattern"),
        ({"occurred_at": "2026-02-30T08:00:00Z"}, "is not a real date"),
        ({"occurred_at": "2026-11-29T08:00:00+01:00"}, "occurred_at: String should match pattern"),
        ({"surprise": "field"}, "surprise: Extra inputs are not permitted"),
        ({"tool": None}, "a tool.invocation event needs tool"),
        ({"decision": {"result": "maybe", "required_scope": None}}, "decision.result: Input should be"),
        ({"credential": {"id": "t", "kind": "password", "client_id": "c", "scopes": []}}, "credential.kind"),
        ({"attrs": {"nested": {"a": 1}}}, "attrs.nested"),
        ({"resource": {"type": "t", "id": "1", "tenant": "Not A Tenant"}}, "resource.tenant"),
        ({"prev_hash": "1" * 64}, "prev_hash of seq 1 must be 64 zeros"),
        ({"seq": 0}, "seq: Input should be greater than or equal to 1"),
        ({"seq": 2**53}, "seq: Input should be less than or equal to 9007199254740991"),
        ({"attrs": {"n": -(2**53)}}, "attrs.n"),
        # An expiry no lake column holds (it stopped the lake for every tenant): refused at the door.
        ({"credential": {**invocation()["credential"], "expires_at": 2**53 - 1}}, "credential.expires_at"),
        ({"credential": {**invocation()["credential"], "expires_at": 253_402_300_800}}, "credential.expires_at"),
        ({"credential": {**invocation()["credential"], "expires_at": -1}}, "credential.expires_at"),
        ({"occurred_at": "0000-01-01T00:00:00Z"}, "is not a real date"),
    ],
)
def test_invalid_payload(harness: Harness, change: dict[str, Any], detail: str) -> None:
    key, kid = harness.register("gw-1")
    assert_rejected(harness, sign(payload("gw-1", **change), key, kid), "invalid_payload", detail)
    assert stored_emitters(harness) == []


def test_invalid_payload_not_json_not_object_duplicate_keys_too_big(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    assert_rejected(harness, sign_raw(b"{not json", key, kid), "invalid_payload", "payload is not JSON")
    assert_rejected(harness, sign_raw(b"[1,2]", key, kid), "invalid_payload", "not a JSON object")
    body = payload("gw-1")
    raw = orjson.dumps(body)[:-1] + b',"outcome":"error"}'
    assert_rejected(harness, sign_raw(raw, key, kid), "invalid_payload", "repeats an object key")
    big = payload("gw-1", attrs={f"k{i}": "x" * 4000 for i in range(20)})
    assert_rejected(harness, sign(big, key, kid), "invalid_payload", "more than 65536")
    assert stored_emitters(harness) == []


def test_non_canonical_payload_is_accepted_and_hashed_canonically(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    body = payload("gw-1")
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2)  # whitespace, insertion order: not canonical
    result = harness.post([sign_raw(raw, key, kid)])
    assert only(result)["status"] == "accepted"
    assert result["heads"]["gw-1"] == {"seq": 1, "hash": hash_of(body)}
    harness.flush()
    assert read_lake(harness.data_dir, "event_hash")[-1] == (hash_of(body),)


def test_chain_gap(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, _ = chain("gw-1", 3, key, kid)
    assert only(harness.post(tokens[:1]))["status"] == "accepted"
    assert_rejected(harness, tokens[2], "chain_gap", "seq 3 of gw-1 leaves a gap: head is seq 1, expected seq 2")
    assert stored_emitters(harness) == [("gw-1", 1)]


def test_chain_conflict_on_prev_hash(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, bodies = chain("gw-1", 1, key, kid)
    harness.post(tokens)
    wrong = sign(payload("gw-1", 2, "ab" * 32), key, kid)
    assert_rejected(
        harness, wrong, "chain_conflict", f"does not link to the head: expected {hash_of(bodies[0])}, got {'ab' * 32}"
    )


def test_chain_conflict_on_a_stored_seq_with_other_content(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, bodies = chain("gw-1", 2, key, kid)
    harness.post(tokens)
    fork = sign(payload("gw-1", 2, hash_of(bodies[0])), key, kid)
    assert_rejected(harness, fork, "chain_conflict", f"seq 2 of gw-1 is already stored with hash {hash_of(bodies[1])}")
    assert stored_emitters(harness) == [("gw-1", 1), ("gw-1", 2)]


def test_after_rejected_only_for_the_same_emitter(harness: Harness) -> None:
    key1, kid1 = harness.register("gw-1")
    key2, kid2 = harness.register("gw-2")
    tokens1, _ = chain("gw-1", 3, key1, kid1)
    tokens2, _ = chain("gw-2", 2, key2, kid2)
    bad = sign(payload("gw-1", attrs={"f": 1.5}), key1, kid1)
    body = harness.post([bad, tokens2[0], tokens1[1], tokens2[1], tokens1[2]])
    assert [(r["status"], r["error"]) for r in body["results"]] == [
        ("rejected", "invalid_payload"),
        ("accepted", None),
        ("rejected", "after_rejected"),
        ("accepted", None),
        ("rejected", "after_rejected"),
    ]
    assert "resend from seq 2" in body["results"][2]["detail"]
    assert body["heads"]["gw-1"]["seq"] == 0
    assert body["heads"]["gw-2"]["seq"] == 2
    assert stored_emitters(harness) == [("gw-2", 1), ("gw-2", 2)]


def test_duplicate_is_stored_once_in_one_request_and_across_requests(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, _ = chain("gw-1", 2, key, kid)
    first = harness.post([tokens[0], tokens[0], tokens[1]])
    assert [r["status"] for r in first["results"]] == ["accepted", "duplicate", "accepted"]
    assert first["errors"] is False
    again = harness.post(tokens)
    assert [r["status"] for r in again["results"]] == ["duplicate", "duplicate"]
    harness.flush()
    again = harness.post(tokens)  # after the flush, the index still knows them
    assert [r["status"] for r in again["results"]] == ["duplicate", "duplicate"]
    assert stored_emitters(harness) == [("gw-1", 1), ("gw-1", 2)]


def test_one_event_id_from_two_emitters_at_once_is_accepted_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emitter locks serialize one emitter's requests, not two emitters': the second request waits for the first
    one's append and then sees its event_id."""
    if harness.server.store.__class__.__name__ == "ClusterStore":
        pytest.skip("holds the embedded WAL's fsync; on PostgreSQL test_cluster races real nodes instead")
    key, kid = harness.register("gw-1")
    key2, kid2 = harness.register("gw-2")
    first = payload("gw-1")
    other = payload("gw-2", event_id=first["event_id"])
    real_fdatasync = os.fdatasync
    in_append, release = threading.Event(), threading.Event()

    def held_fdatasync(fd: int) -> None:  # the first request is mid-append while the second one decides
        if not in_append.is_set():
            in_append.set()
            assert release.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr("store.wal.os.fdatasync", held_fdatasync)
    outcomes: dict[str, list[Any]] = {}

    def post(name: str, token: str) -> None:
        outcomes[name] = harness.server.service.ingest([token]).results

    threads = [
        threading.Thread(target=post, args=("gw-1", sign(first, key, kid))),
        threading.Thread(target=post, args=("gw-2", sign(other, key2, kid2))),
    ]
    threads[0].start()
    assert in_append.wait(10)
    threads[1].start()
    threads[1].join(timeout=0.2)  # it waits for gw-1's append (or, if slower to start, finds it done: same answer)
    release.set()
    for thread in threads:
        thread.join()
    assert outcomes["gw-1"][0].status.value == "accepted"
    assert outcomes["gw-2"][0].error is not None
    assert outcomes["gw-2"][0].error.value == "event_id_conflict"
    assert "already stored as gw-1 seq 1" in (outcomes["gw-2"][0].detail or "")
    assert harness.server.store.find_event_ids([first["event_id"]])[first["event_id"]].emitter == "gw-1"
    assert harness.server.service.head("gw-2").seq == 0


def test_event_id_conflict_same_emitter_and_other_emitter(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    key2, kid2 = harness.register("gw-2")
    first = payload("gw-1")
    harness.post([sign(first, key, kid)])
    # Same event_id re-signed with other content (a retry that changed the event).
    changed = dict(first, outcome="error")
    assert_rejected(
        harness,
        sign(changed, key, kid),
        "event_id_conflict",
        f"event_id {first['event_id']} is already stored as gw-1 seq 1 with hash {hash_of(first)}",
    )
    # Same event_id from another emitter.
    other = payload("gw-2", event_id=first["event_id"])
    assert_rejected(harness, sign(other, key2, kid2), "event_id_conflict", "already stored as gw-1 seq 1")
    # Twice in one request, two contents.
    a = payload("gw-2")
    b = payload("gw-2", 2, hash_of(a), event_id=a["event_id"])
    body = harness.post([sign(a, key2, kid2), sign(b, key2, kid2)])
    assert [r["error"] for r in body["results"]] == [None, "event_id_conflict"]
    assert stored_emitters(harness) == [("gw-1", 1), ("gw-2", 1)]


def test_clock_skew(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    future = rfc3339(datetime.now(UTC) + timedelta(minutes=6))
    assert_rejected(harness, sign(payload("gw-1", occurred_at=future), key, kid), "clock_skew", "at most 300 s allowed")
    near = rfc3339(datetime.now(UTC) + timedelta(minutes=4))
    assert only(harness.post([sign(payload("gw-1", occurred_at=near), key, kid)]))["status"] == "accepted"


def test_results_are_in_request_order_with_event_ids(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, bodies = chain("gw-1", 3, key, kid)
    body = harness.post(["garbage", *tokens])
    assert [r["event_id"] for r in body["results"]] == [None, *(b["event_id"] for b in bodies)]
    assert body["heads"] == {"gw-1": {"seq": 3, "hash": hash_of(bodies[2])}}
    assert ZERO_HASH not in {r.get("detail") for r in body["results"]}


@pytest.mark.parametrize("workers", [0, 2], ids=["server threads", "verifier processes"])
def test_max_event_age_refuses_old_events_when_set(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from fastapi.testclient import TestClient

    from ingest.app import create_app
    from ingest.server import IngestServer
    from ingest.service import Limits
    from tests.conftest import ADMIN_TOKEN

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # spawned verifiers import it
    server = IngestServer(
        tmp_path / "data",
        ADMIN_TOKEN,
        limits=Limits(max_event_age=timedelta(days=1)),
        flush_interval=3600,
        writer_process=False,
        verify_workers=workers,
    )
    with TestClient(create_app(server)) as client:
        harness = Harness(client, server, tmp_path / "data")
        key, kid = harness.register("gw-1")
        old = rfc3339(datetime.now(UTC) - timedelta(days=2))
        assert_rejected(harness, sign(payload("gw-1", occurred_at=old), key, kid), "clock_skew", "--max-event-age")
        recent = rfc3339(datetime.now(UTC) - timedelta(hours=23))
        assert only(harness.post([sign(payload("gw-1", occurred_at=recent), key, kid)]))["status"] == "accepted"


def test_events_of_any_age_are_accepted_by_default(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    backfill = sign(payload("gw-1", occurred_at="2001-01-01T00:00:00Z"), key, kid)
    assert only(harness.post([backfill]))["status"] == "accepted"


def test_rfc_8693_actors_may_name_their_issuer_and_client(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    delegation = {
        "sub": "alice@acme.example",
        "iss": "https://idp.acme.example",
        "act": {"sub": "triage-agent", "iss": "https://agents.acme.example", "client_id": "triage", "act": None},
    }
    assert only(harness.post([sign(payload("gw-1", delegation=delegation), key, kid)]))["status"] == "accepted"
    bad = {**delegation, "act": {"sub": "triage-agent", "aud": "x"}}
    assert_rejected(
        harness, sign(payload("gw-1", 2, delegation=bad), key, kid), "invalid_payload", "delegation.act.aud"
    )
