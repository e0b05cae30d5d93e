"""Evidence bundles: written by `custody bundle write`, checked by `custody bundle verify` and, on a machine with
nothing of Custody, by store/ground/tlog.py alone; any single changed byte fails with a message naming what."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cryptography
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from custody.cli import main
from store.ground.layout import DataDir
from store.ground.tlog import LogError, NoteKey, verify_bundle
from tests.conftest import invocation, open_harness
from tests.signing import hash_of, payload, sign_raw
from tests.test_transparency_log import log_key

TLOG = Path(__file__).parent.parent / "store" / "ground" / "tlog.py"


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two gateways of acme (one with a key revoked half way) and one of globex, flushed and checkpointed."""
    data = tmp_path_factory.mktemp("bundle") / "data"
    with open_harness(data) as harness:
        gateway = harness.emitter("gw-1")
        ids = [gateway.emit(**invocation(trace_id=f"t-{n}")).event_id for n in range(6)]
        gateway.flush()
        other = harness.emitter("gw-2", alg="ES256")
        ids += [other.emit(**invocation(trace_id=f"u-{n}")).event_id for n in range(3)]
        other.flush()
        globex = harness.emitter("gw-g", tenant="globex")
        foreign = globex.emit(**invocation(resource={"type": "ticket", "id": "G-1", "tenant": "globex"})).event_id
        globex.flush()
        harness.flush()
        harness.server.store.merkle.publish()
    return {"data": data, "ids": ids, "foreign": foreign, "vkey": log_key(data).vkey}


def write(org: dict[str, Any], tmp_path: Path, *selection: str) -> tuple[int, Path]:
    target = tmp_path / "bundle.note"
    code = main(["bundle", "write", "--data-dir", str(org["data"]), *selection, "--output", str(target)])
    return code, target


def test_a_bundle_verifies_with_the_cli(
    org: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, target = write(org, tmp_path, *[arg for event_id in org["ids"] for arg in ("--event", event_id)])
    assert code == 0
    assert main(["bundle", "verify", str(target), "--log-key", org["vkey"]]) == 0
    out = capsys.readouterr().out
    assert out.count("OK: event ") == len(org["ids"])
    assert f"OK: {len(org['ids'])} events included in custody/" in out
    verified = verify_bundle(target.read_bytes(), NoteKey.from_vkey(org["vkey"]))
    assert {event.event_id for event in verified.events} == set(org["ids"])
    assert {event.kid.split("-k")[0] for event in verified.events} == {"gw-1", "gw-2"}  # EdDSA and ES256 keys
    assert [e for e in verified.registry if e.emitter == "custody.server"]


def test_a_bundle_stays_within_the_tenant(
    org: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = write(org, tmp_path, "--tenant", "acme", "--event", org["foreign"])
    assert code == 1
    assert "not in the lake" in capsys.readouterr().err


def test_a_bundle_verifies_with_nothing_but_the_verifier_module(org: dict[str, Any], tmp_path: Path) -> None:
    _, target = write(org, tmp_path, "--event", org["ids"][0], "--event", org["ids"][7])
    island = tmp_path / "island"
    island.mkdir()
    shutil.copy(TLOG, island / "tlog.py")
    shutil.copy(target, island / "evidence")
    site = str(Path(cryptography.__file__).parent.parent)
    program = (
        f"import sys; sys.path.append({site!r})\n"  # cryptography's folder: no .pth of Custody is read under -S
        "try:\n    import store\nexcept ImportError:\n    pass\nelse:\n    sys.exit('Custody is importable here')\n"
        f"sys.argv = ['tlog.py', 'evidence', {org['vkey']!r}]\n"
        "import runpy; runpy.run_path('tlog.py', run_name='__main__')\n"
    )
    env = {"PATH": os.environ["PATH"]}
    ran = subprocess.run([sys.executable, "-S", "-c", program], cwd=island, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "OK: 2 events in custody/" in ran.stdout
    tampered = bytearray(target.read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    (island / "evidence").write_bytes(bytes(tampered))
    ran = subprocess.run([sys.executable, "-S", "-c", program], cwd=island, env=env, capture_output=True, text=True)
    assert ran.returncode == 1
    assert ran.stdout.startswith("FAIL: ")


def test_every_single_changed_byte_fails_and_says_what(org: dict[str, Any], tmp_path: Path) -> None:
    _, target = write(org, tmp_path, "--event", org["ids"][1], "--event", org["ids"][6])
    original = target.read_bytes()
    key = NoteKey.from_vkey(org["vkey"])
    verify_bundle(original, key)
    rng = random.Random(7)
    positions = sorted({*range(0, len(original), max(1, len(original) // 400)), *rng.sample(range(len(original)), 200)})
    messages = {}
    for position in positions:
        changed = bytearray(original)
        changed[position] = (changed[position] + rng.randrange(1, 256)) % 256
        with pytest.raises(LogError) as failure:
            verify_bundle(bytes(changed), key)
        messages[position] = str(failure.value)
    assert all(messages.values())
    body = original.decode().split("\n")[0]
    proof_at = original.index(orjson.loads(body)["events"][0]["proof"][0].encode())
    named = _fail(original, proof_at + 3, key)
    assert "bundle event 0" in named
    assert "inclusion proof" in named or "not standard base64" in named
    checkpoint_at = original.index(b"\\n", original.index(b'"checkpoint":"')) + 3  # the size line
    assert "bundle checkpoint" in _fail(original, checkpoint_at, key)
    selection_at = original.index(b'"kind":"events"') + 9
    assert "bundle signature" in _fail(original, selection_at, key)
    name, _, encoded = org["vkey"].split("+", 2)
    with pytest.raises(LogError, match="does not match its key"):
        NoteKey.from_vkey(f"{name}+00000000+{encoded}")
    other = NoteKey.of(name, Ed25519PrivateKey.generate())
    with pytest.raises(LogError):
        verify_bundle(original, other)


def _fail(original: bytes, position: int, key: NoteKey) -> str:
    changed = bytearray(original)
    changed[position] = ord("A") if changed[position] != ord("A") else ord("B")
    with pytest.raises(LogError) as failure:
        verify_bundle(bytes(changed), key)
    return str(failure.value)


def test_a_bundle_of_a_path_and_of_a_finding(
    org: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, target = write(org, tmp_path, "--path", org["ids"][2])
    assert code == 0
    assert verify_bundle(target.read_bytes(), NoteKey.from_vkey(org["vkey"])).selection["kind"] == "path"
    assert write(org, tmp_path, "--finding", "no-colon")[0] == 1
    assert "--finding takes KIND:SUBJECT" in capsys.readouterr().err
    assert write(org, tmp_path, "--finding", "action_after_revocation:nobody")[0] == 1
    assert "no action_after_revocation finding about nobody" in capsys.readouterr().err
    assert write(org, tmp_path, "--finding", "nonsense:x")[0] == 1
    assert "no finding kind 'nonsense'" in capsys.readouterr().err


def test_a_bundle_needs_a_checkpoint_that_holds_its_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    with open_harness(data) as harness:
        gateway = harness.emitter("gw-1")
        event_id = gateway.emit(**invocation()).event_id
        gateway.flush()
        harness.flush()
        DataDir(data).checkpoint_history.unlink(missing_ok=True)
        DataDir(data).checkpoint_file.unlink(missing_ok=True)
        assert (
            main(["bundle", "write", "--data-dir", str(data), "--event", event_id, "--output", str(tmp_path / "b")])
            == 1
        )
        assert "no checkpoint yet" in capsys.readouterr().err


def test_a_bundle_of_an_event_signed_over_non_canonical_bytes_verifies(tmp_path: Path) -> None:
    """Ingest accepts a payload that is not in canonical form (its event_hash is the canonical form's), and so
    does the offline verifier, with its own RFC 8785."""
    data = tmp_path / "data"
    with open_harness(data) as harness:
        key, kid = harness.register("gw-nc")
        first = payload("gw-nc")
        token = sign_raw(orjson.dumps(first, option=orjson.OPT_INDENT_2), key, kid)
        assert harness.post([token])["results"][0]["status"] == "accepted"
        harness.flush()
        harness.server.store.merkle.publish()
    target = tmp_path / "bundle"
    assert (
        main(["bundle", "write", "--data-dir", str(data), "--event", first["event_id"], "--output", str(target)]) == 0
    )
    [event] = verify_bundle(target.read_bytes(), log_key(data)).events
    assert event.event_hash == hash_of(first)


def test_hostile_bundles_and_notes_fail_with_a_message_not_a_crash(org: dict[str, Any], tmp_path: Path) -> None:
    key = NoteKey.from_vkey(org["vkey"])
    deep = "[" * 100_000 + "]" * 100_000
    for hostile in (
        b"\xff" * 10,
        f"{deep}\n\n\u2014 x AAAAAAAA\n".encode(),
        f"{org['vkey'].split('+')[0]}\n{'9' * 5000}\nAAAA\n\n\u2014 x AAAAAAAA\n".encode(),
        b'{"bundle": "custody-evidence/v1"}\n\n\xe2\x80\x94 x AAAAAAAA\n',
    ):
        with pytest.raises(LogError):
            verify_bundle(hostile, key)
    _, target = write(org, tmp_path, "--event", org["ids"][0])
    body, signature = target.read_bytes().decode().split("\n\n", 1)
    parsed = orjson.loads(body)
    parsed["events"][0]["jws"] = "e30." + "W" * 5 + ".AAAA"  # header {} and a payload that is not JSON
    with pytest.raises(LogError, match="bundle event 0"):
        verify_bundle((orjson.dumps(parsed).decode() + "\n\n" + signature).encode(), key)
