"""Findings as records: de-duplication, the lifecycle and its rules, tenant walls, the outbox, alert formats."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from query.detect.alerts import ChannelConfig, load_channels, syslog_message
from query.detect.records import FindingStore, TransitionError
from query.findings import Finding


def detected(
    evidence: list[str], *, tenant: str = "acme", subject: str = "tok-1", kind: str = "action_after_revocation"
) -> Finding:
    return Finding(
        kind=kind,
        severity="critical",
        tenant=tenant,
        subject=subject,
        title=f"credential {subject} was used after it was revoked",
        owasp=["ASI03"],
        evidence=evidence,
        evidence_total=len(evidence),
        first_seen="2026-12-01T10:00:00.000000Z",
        last_seen="2026-12-01T10:05:00.000000Z",
    )


@pytest.fixture
def store(tmp_path: Path) -> FindingStore:
    return FindingStore(tmp_path / "findings.sqlite")


def test_new_evidence_joins_the_open_finding(store: FindingStore) -> None:
    [first] = store.merge([detected(["e1"])], cursor=10)
    assert first.opened
    assert first.added == ["e1"]
    [second] = store.merge([detected(["e1", "e2"])], cursor=20)
    assert not second.opened
    assert second.added == ["e2"]
    assert second.record.id == first.record.id
    assert second.record.evidence_count == 2
    assert store.merge([detected(["e2"])], cursor=30) == []  # nothing new: nothing changed
    assert store.cursor() == 30
    assert set(store.evidence(first.record.id)) == {"e1", "e2"}
    other = store.merge([detected(["e9"], tenant="globex")])
    assert other[0].opened  # the same subject in another tenant is another finding


def test_the_lifecycle_and_who_did_what(store: FindingStore) -> None:
    [item] = store.merge([detected(["e1"])])
    finding = item.record.id
    store.transition(finding, "assign", "analyst:ann", tenant="acme", assignee="bob")
    store.transition(finding, "acknowledge", "analyst:bob", tenant="acme", comment="looking")
    with pytest.raises(TransitionError, match="only an open finding can be acknowledged"):
        store.transition(finding, "acknowledge", "analyst:bob", tenant="acme")
    with pytest.raises(TransitionError, match="needs a reason"):
        store.transition(finding, "suppress", "analyst:bob", tenant="acme")
    until = datetime.now(UTC) + timedelta(days=1)
    suppressed = store.transition(finding, "suppress", "analyst:bob", tenant="acme", comment="pen test", until=until)
    assert suppressed.status == "suppressed"
    assert suppressed.suppress_reason == "pen test"
    [quiet] = store.merge([detected(["e2"])])
    assert quiet.quiet  # evidence kept, no alert
    assert quiet.record.id == finding
    resolved = store.transition(finding, "resolve", "analyst:bob", tenant="acme", comment="token rotated")
    assert resolved.status == "resolved"
    [again] = store.merge([detected(["e3"])])
    assert again.opened  # a resolved finding stays resolved: new evidence opens a new one
    assert again.record.id != finding
    history = store.history(finding)
    assert [(h["actor"], h["action"], h["status"]) for h in history] == [
        ("custody.detector", "open", "open"),
        ("analyst:ann", "assign", "open"),
        ("analyst:bob", "acknowledge", "acknowledged"),
        ("analyst:bob", "suppress", "suppressed"),
        ("analyst:bob", "resolve", "resolved"),
    ]
    assert history[1]["comment"] == "assigned to bob"
    assert len(store.unrecorded()) == 6  # five of the first finding, one of the second: for the signed stream


def test_an_expired_suppression_reopens(store: FindingStore) -> None:
    [item] = store.merge([detected(["e1"])])
    past = datetime.now(UTC) - timedelta(minutes=1)
    store.transition(item.record.id, "suppress", "analyst:ann", tenant="acme", comment="noise", until=past)
    [again] = store.merge([detected(["e2"])])
    assert again.record.status == "open"
    assert not again.quiet
    assert store.history(item.record.id)[-1]["comment"] == "the suppression expired"


def test_another_tenants_finding_does_not_exist_for_a_tenant_bound_caller(store: FindingStore) -> None:
    [item] = store.merge([detected(["e1"], tenant="globex")])
    with pytest.raises(TransitionError, match=f"no finding {item.record.id}"):
        store.transition(item.record.id, "resolve", "analyst:ann", tenant="acme")
    with pytest.raises(TransitionError, match=f"no finding {item.record.id}"):
        store.get(item.record.id, tenant="acme")
    assert store.queue(tenant="acme") == []
    assert [r.id for r in store.queue(tenant=None)] == [item.record.id]
    with pytest.raises(TransitionError, match="action must be one of"):
        store.transition(item.record.id, "delete", "analyst:ann", tenant=None)


def test_alerts_are_routed_and_kept_with_the_finding(tmp_path: Path, store: FindingStore) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "alerts.toml").write_text(
        '[[channel]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:9/x"\nsecret_file = "secret"\n'
        'tenants = ["acme"]\nmin_severity = "critical"\n'
        '[[channel]]\nname = "siem"\ntype = "syslog"\naddress = "127.0.0.1:6514"\nmin_severity = "medium"\n'
    )
    channels = load_channels(tmp_path / "alerts.toml")
    store.merge([detected(["e1"]), detected(["e2"], tenant="globex", subject="tok-2")], alerts=channels.route)
    assert len(store.due("hook")) == 1  # acme only
    assert len(store.due("siem")) == 2
    body = json.loads(store.due("hook")[0][1])
    assert body["subject"] == "tok-1"
    assert body["evidence"] == ["e1"]
    store.merge([detected(["e1", "e3"])], alerts=channels.route)
    assert len(store.due("hook")) == 1  # evidence added: no new alert


def test_bad_alert_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text('[[channel]]\nname = "hook"\ntype = "webhook"\nurl = "http://x"\n')
    with pytest.raises(ValueError, match="needs url and secret_file"):
        load_channels(path)
    path.write_text('[[channel]]\nname = "hook"\ntype = "pager"\n')
    with pytest.raises(ValueError, match=r"channel\.0\.type"):
        load_channels(path)
    path.write_text(
        '[[channel]]\nname = "a"\ntype = "syslog"\naddress = "h:1"\n'
        '[[channel]]\nname = "a"\ntype = "syslog"\naddress = "h:2"\n'
    )
    with pytest.raises(ValueError, match="unique"):
        load_channels(path)


def test_a_syslog_message_is_rfc_5424_whatever_the_subject_holds() -> None:
    body = {"finding_id": 7, "tenant": "acme", "kind": "k", "severity": "high", "subject": 'a"b]c\\d\ud800'}
    message = syslog_message(body)
    header, text = message.split(b"\xef\xbb\xbf", 1)
    assert header.startswith(b"<83>1 ")  # facility 10 (authpriv) * 8 + severity 3 (err)
    assert b'subject="a\\"b\\]c\\\\d\xef\xbf\xbd' in header  # the lone surrogate replaced
    assert json.loads(text)["finding_id"] == 7
    assert ChannelConfig(name="x", type="syslog", address="h:1").takes("any", "high")


def test_the_read_api_serves_the_queue_within_tenant_walls(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from query.api import create_query_app
    from query.detect.loop import findings_store_path
    from query.tokens import TokenStore

    data = tmp_path / "data"
    (data / "state").mkdir(parents=True)
    records = FindingStore(findings_store_path(data))
    [acme] = records.merge([detected(["e1"])])
    [globex] = records.merge([detected(["e2"], tenant="globex")])
    tokens = TokenStore(tmp_path / "tokens.json")
    ann = {"Authorization": f"Bearer {tokens.issue('ann', 'analyst', 'acme')}"}
    aud = {"Authorization": f"Bearer {tokens.issue('aud', 'auditor', 'acme')}"}
    root = {"Authorization": f"Bearer {tokens.issue('root', 'admin', None)}"}
    with TestClient(create_query_app(data, tokens)) as client:
        queue = client.get("/v1/findings/queue", headers=ann).json()
        assert [item["id"] for item in queue] == [acme.record.id]
        assert len(client.get("/v1/findings/queue", headers=root).json()) == 2
        assert client.get("/v1/findings/queue", params={"tenant": "globex"}, headers=ann).status_code == 403
        assert client.get(f"/v1/findings/queue/{globex.record.id}", headers=ann).status_code == 404
        assert (
            client.post(f"/v1/findings/queue/{globex.record.id}", json={"action": "resolve"}, headers=ann).status_code
            == 404
        )
        one = client.get(f"/v1/findings/queue/{acme.record.id}", headers=ann).json()
        assert one["evidence"] == ["e1"]
        assert one["history"][0]["action"] == "open"
        assert (
            client.post(f"/v1/findings/queue/{acme.record.id}", json={"action": "resolve"}, headers=aud).status_code
            == 403
        )
        changed = client.post(
            f"/v1/findings/queue/{acme.record.id}", json={"action": "acknowledge", "comment": "mine"}, headers=ann
        )
        assert changed.status_code == 200
        assert changed.json()["status"] == "acknowledged"
        again = client.post(f"/v1/findings/queue/{acme.record.id}", json={"action": "acknowledge"}, headers=ann)
        assert again.status_code == 400
        assert "only an open finding" in again.text
        for bad in ({"action": "delete"}, {"action": "comment", "comment": ""}, {"action": "comment", "x": 1},
                    {"action": "suppress", "comment": "r", "until": "2026-01-01T00:00:00"}):  # fmt: skip
            assert client.post(f"/v1/findings/queue/{acme.record.id}", json=bad, headers=ann).status_code == 400, bad
        history = client.get(f"/v1/findings/queue/{acme.record.id}", headers=ann).json()["history"]
        assert history[-1]["actor"] == "analyst:ann"
    records.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_syslog_over_tls_and_a_dead_letter_for_what_never_lands(tmp_path: Path, store: FindingStore) -> None:
    import socket
    import ssl
    import threading
    import time

    from query.detect.alerts import Dispatcher

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def collect() -> None:
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as connection:
            data = b""
            while b"\xef\xbb\xbf" not in data or not data.rstrip().endswith(b"}"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
            received.append(data)

    threading.Thread(target=collect, daemon=True).start()
    (tmp_path / "secret").write_text("s")
    (tmp_path / "alerts.toml").write_text(
        f'[[channel]]\nname = "siem"\ntype = "syslog"\naddress = "127.0.0.1:{listener.getsockname()[1]}"\n'
        f'tls = true\nca_file = "{cert}"\nmin_severity = "low"\n'
        '[[channel]]\nname = "gone"\ntype = "webhook"\nurl = "http://127.0.0.1:9/nothing"\nsecret_file = "secret"\n'
        'min_severity = "low"\nmax_age_hours = 0.0003\n'  # about a second
    )
    channels = load_channels(tmp_path / "alerts.toml")
    store.merge([detected(["e1"])], alerts=channels.route)
    dead = tmp_path / "dead.jsonl"
    dispatcher = Dispatcher(store, channels, dead)
    dispatcher.start()
    try:
        deadline = time.monotonic() + 30
        while (not received or not dead.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dispatcher.stop()
        listener.close()
    [frame] = received
    length, message = frame.split(b" ", 1)
    assert int(length) == len(message)  # octet counting, over TLS
    assert message.startswith(b"<82>1 ")
    [buried] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert buried["channel"] == "gone"
    assert buried["body"]["subject"] == "tok-1"
    assert buried["attempts"] >= 1
    assert store.pending_alerts() == 0  # delivered or buried: nothing lost, nothing stuck
