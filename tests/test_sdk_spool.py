"""custody-sdk (sdk/python): its own distribution, a pinned public surface, the same canonical bytes as the server,
and a durable spool: torn appends cut, the chain resumed after a restart, nothing over its bound; against a real
``custody serve``, kill -9 of the emitting process and of the server at random points, many rounds, loses no event
that ``emit`` returned for and stores none twice."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import custody_sdk
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from custody_sdk import Emitter, Spool, SpooledEvent, SpoolFull, canonicalize, generate_key, public_jwk
from hypothesis import given, settings

from store.ground.canonical import canonicalize as server_canonicalize
from store.ground.errors import CanonicalizationError
from tests.conftest import ADMIN, REPO, ServerProcess, invocation, open_harness, read_lake
from tests.test_canonical import CASES, JSON_VALUES, _has_non_integer, _input

SDK = REPO / "sdk" / "python"


def test_the_public_surface_is_pinned() -> None:
    assert custody_sdk.__all__ == [
        "Delivery",
        "Emitter",
        "LogMisbehaved",
        "Reservation",
        "SignedEvent",
        "Spool",
        "SpoolFull",
        "SpooledEvent",
        "canonicalize",
        "event_hash",
        "generate_key",
        "public_jwk",
    ]


def test_the_sdk_imports_nothing_of_the_server() -> None:
    program = "import sys, custody_sdk; print(sorted(m for m in sys.modules if m.split('.')[0] in" + (
        " ('store', 'ingest', 'query', 'custody', 'dashboard', 'pydantic', 'duckdb', 'pyarrow', 'jwt', 'orjson')))"
    )
    ran = subprocess.run([sys.executable, "-c", program], cwd=SDK, capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "[]"
    requires = (SDK / "pyproject.toml").read_text()
    assert 'dependencies = ["httpx>=0.27", "cryptography>=42"]' in requires


@pytest.mark.parametrize("case", [c for c in CASES if not _has_non_integer(_input(c))], ids=lambda c: c["name"])
def test_its_canonical_bytes_are_the_servers(case: dict[str, Any]) -> None:
    assert canonicalize(_input(case)) == server_canonicalize(_input(case)) == case["canonical"].encode()


def event(seq: int) -> SpooledEvent:
    return SpooledEvent(seq, f"id-{seq}", f"{seq:064x}", f"h.p{seq}.s")


def test_a_torn_append_is_cut_and_the_head_resumes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for seq in range(1, 4):
        spool.append(event(seq))
    spool.mark_sent(1)
    spool.close()
    [segment] = (tmp_path / "spool").glob("*.seg")
    whole = segment.read_bytes()
    segment.write_bytes(whole + whole[:9])  # a crash in the middle of the next append
    reopened = Spool(tmp_path / "spool")
    assert reopened.head == (3, f"{3:064x}")
    assert [e.seq for e in reopened.unsent(10)] == [2, 3]
    assert segment.read_bytes() == whole


def test_segments_go_once_acknowledged_and_the_bound_holds(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000, segment_bytes=200)
    appended, refused = 0, None
    for seq in range(1, 100):
        try:
            spool.append(event(seq))
        except SpoolFull as exc:
            refused = str(exc)
            break
        appended = seq
    assert refused is not None
    assert "has not acknowledged" in refused
    assert spool.bytes_owed() <= 1000
    assert spool.bytes_held() <= 1000 + 200  # and at most one segment of acknowledged events
    assert appended >= 9
    held = {record.seq for record in spool.unsent(100)}
    assert held == set(range(1, appended + 1))  # nothing beyond the bound was taken
    spool.mark_sent(appended - 1)
    assert len(list((tmp_path / "spool").glob("*.seg"))) <= 2  # the acknowledged segments are gone
    spool.append(event(appended + 1))  # room again
    spool.close()
    reopened = Spool(tmp_path / "spool", max_bytes=1000, segment_bytes=200)
    assert [e.seq for e in reopened.unsent(5)] == [appended, appended + 1]


def test_the_bound_is_on_what_custody_has_not_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)  # one segment: acknowledged events stay on disk in it
    seq = 1
    with pytest.raises(SpoolFull):  # noqa: PT012 (append until the bound)
        while True:
            spool.append(event(seq))
            seq += 1
    spool.mark_sent(spool.pending)
    assert spool.bytes_owed() == 0
    spool.append(event(seq))  # room again, though the segment still holds the acknowledged events
    spool.close()
    assert Spool(tmp_path / "spool", max_bytes=1000).bytes_owed() == spool.bytes_owed() > 0


def test_a_reservation_holds_its_room_against_other_writers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    spool.reserve(300)
    with pytest.raises(SpoolFull, match="300 reserved"):
        spool.reserve(800)
    spool.append(event(1))  # fits beside the reservation
    seq = 2
    with pytest.raises(SpoolFull):  # noqa: PT012 (append until the bound)
        while seq < 20:
            spool.append(event(seq))
            seq += 1
    assert seq > 3  # several fitted beside the reservation
    assert spool.bytes_owed() <= 700
    spool.write(event(99), reserved=300)  # the reserved write never runs out of room
    spool.release(0)
    with pytest.raises(SpoolFull):
        spool.reserve(300)


def test_an_emitter_reservation_is_used_once_and_given_back(tmp_path: Path) -> None:
    key = generate_key()
    emitter = Emitter(
        "http://127.0.0.1:9", "gw", "acme", key, "gw-k1", spool=tmp_path / "s", send=False, max_spool_bytes=150 << 10
    )
    emitter._head = (0, "0" * 64)  # a new chain, without asking the (absent) server
    with emitter.reserve() as slot:
        with pytest.raises(SpoolFull):
            emitter.reserve()  # the one slot of room is taken
        signed = slot.emit(type="task.approval", approval={"id": "a", "approved_by": "u", "scopes": [], "task": ""})
        with pytest.raises(RuntimeError, match="used or released"):
            slot.emit(type="task.approval")
    assert signed.seq == 1
    with emitter.reserve():
        pass  # released on exit: room again
    emitter.reserve().release()
    emitter.close()


def test_an_emitter_delivers_through_the_spool_and_resumes_its_chain(tmp_path: Path) -> None:
    with open_harness(tmp_path / "data") as harness:
        key, kid = harness.register("gw-sdk")
        spool = tmp_path / "spool"
        first = Emitter("http://testserver", "gw-sdk", "acme", key, kid, spool=spool, client=harness.client, send=False)
        signed = [first.emit(**invocation(trace_id=f"t-{n}")) for n in range(5)]
        first.close()  # not sent: the process "stopped" here
        again = Emitter("http://testserver", "gw-sdk", "acme", key, kid, spool=spool, client=harness.client, send=False)
        signed.append(again.emit(**invocation()))
        assert [s.seq for s in signed] == [1, 2, 3, 4, 5, 6]
        again.flush()
        assert again.delivery.acknowledged == 6
        assert len(again.delivery.receipts) == 1
        again.close()
        harness.flush()
    rows = [row for row in read_lake(tmp_path / "data", "emitter, seq, event_id") if row[0] == "gw-sdk"]
    assert [(row[1], row[2]) for row in rows] == [(s.seq, s.event_id) for s in signed]


EMITTING = """
import json, os, sys, time
from cryptography.hazmat.primitives import serialization
from custody_sdk import Emitter
url, spool, key_file, returned, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
key = serialization.load_pem_private_key(open(key_file, "rb").read(), password=None)
emitter = Emitter(url, "gw-kill", "acme", key, "gw-kill-k1", spool=spool, batch_size=50, max_backoff=0.5)
log = os.open(returned, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
for n in range(count):
    signed = emitter.emit(type="tool.invocation", delegation={"sub": "u@acme.example", "act": {"sub": "agent-1"}},
                          credential={"id": "tok-1", "kind": "agent_token", "client_id": "agent-1", "scopes": ["a"]},
                          tool={"name": "read", "server": "mcp"}, decision={"result": "allow", "required_scope": "a"},
                          outcome="success")
    os.write(log, (signed.event_id + "\\n").encode())  # emit returned: the event must reach the lake
    time.sleep(0.002)
emitter.flush(timeout=120)
emitter.close()
print("drained", flush=True)
"""


def kill_rounds(
    tmp_path: Path,
    emitter: str,
    command: Callable[[str, Path, Path, Path, int], list[str]],
    *,
    cwd: Path,
    rounds: int,
    seed: int,
    at_least: int,
) -> None:
    """An SDK's emitting process (``command(url, spool, key file, returned file, count)``, which appends each event
    id to the returned file once ``emit`` returned, then flushes and prints "drained") and the server killed at
    random points for ``rounds``, then a drain: every event ``emit`` returned for is in the lake exactly once, and
    the emitter's chain has no gap."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    key = generate_key()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    httpx.put(
        f"{server.url}/v1/emitters/{emitter}",
        json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, f"{emitter}-k1")]},
        headers=ADMIN,
    ).raise_for_status()
    spool, returned = tmp_path / "spool", tmp_path / "returned.txt"
    rng = random.Random(seed)

    def start(count: int) -> subprocess.Popen[str]:
        argv = command(server.url, spool, key_file, returned, count)
        return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    for _ in range(rounds):
        emitting = start(100_000)
        time.sleep(rng.uniform(0.5, 1.5))
        victims = rng.choice(["emitter", "server", "both"])
        if victims in ("server", "both"):
            server.kill()
        time.sleep(rng.uniform(0.0, 0.5))  # the emitter goes on spooling while Custody is down
        emitting.send_signal(signal.SIGKILL if victims in ("emitter", "both") else signal.SIGTERM)
        emitting.wait(timeout=30)
        assert emitting.stdout is not None
        emitting.stdout.close()
        if server.process is not None and server.process.poll() is not None:
            server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    draining = start(0)  # drain what the spool holds
    output, _ = draining.communicate(timeout=180)
    assert "drained" in output, output[-2000:]
    assert server.stop() == 0
    promised = returned.read_text().split()
    rows = [row for row in read_lake(tmp_path / "data", "emitter, seq, event_id") if row[0] == emitter]
    stored = [row[2] for row in rows]
    assert len(promised) > at_least
    assert len(stored) == len(set(stored)), "an event is in the lake twice"
    assert set(promised) <= set(stored), f"{len(set(promised) - set(stored))} events emit returned for are missing"
    assert [row[1] for row in rows] == list(range(1, len(rows) + 1)), "the chain has a gap"


@pytest.mark.slow
def test_kill_9_of_the_emitter_and_the_server_loses_nothing_emit_returned(tmp_path: Path) -> None:
    def command(url: str, spool: Path, key_file: Path, returned: Path, count: int) -> list[str]:
        return [sys.executable, "-c", EMITTING, url, str(spool), str(key_file), str(returned), str(count)]

    kill_rounds(tmp_path, "gw-kill", command, cwd=tmp_path, rounds=6, seed=5, at_least=200)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_its_canonical_bytes_are_the_servers_for_any_value(value: Any) -> None:
    """The SDK's canonicalizer (a walk, then the standard library's encoder) against the server's, or both refuse."""
    try:
        expected: bytes | None = server_canonicalize(value)
    except CanonicalizationError:
        expected = None
    try:
        got: bytes | None = canonicalize(value)
    except ValueError:
        got = None
    assert got == expected


def test_the_sdk_ships_the_log_verifier_unchanged() -> None:
    """custody_sdk/_tlog.py is store/ground/tlog.py (standard library and cryptography only), copied: one text."""
    assert (SDK / "custody_sdk" / "_tlog.py").read_bytes() == (REPO / "store" / "ground" / "tlog.py").read_bytes()


def test_with_the_log_key_it_checks_receipts_and_detects_a_forked_history(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from custody_sdk import LogMisbehaved

    from store.ground.tlog import NoteKey
    from tests.test_transparency_log import log_key, post_chain

    honest, fork = tmp_path / "honest", tmp_path / "fork"
    with open_harness(honest) as log:
        vkey = log_key(honest).vkey
        key, kid = log.register("gw-sdk")
        options: dict[str, Any] = {"client": log.client, "send": False, "log_key": vkey}
        gateway = Emitter("http://t", "gw-sdk", "acme", key, kid, spool=tmp_path / "spool", **options)
        for n in range(4):
            gateway.emit(**invocation(trace_id=f"t-{n}"))
        gateway.flush()
        assert gateway.delivery.misbehaved is None
        assert len(gateway.delivery.receipts) == 1
        log.server.store.merkle.publish()
        first = gateway.check_log()
        gateway.emit(**invocation())
        gateway.flush()
        log.server.store.merkle.publish()
        assert gateway.check_log().size > first.size
        (fork / "state").mkdir(parents=True)
        (fork / "state" / "server_key.pem").write_bytes((honest / "state" / "server_key.pem").read_bytes())
    with open_harness(fork) as other:
        post_chain(other, "gw-x", 20)
        other.server.store.merkle.publish()
        gateway._client = other.client  # pointed at another history under the same key
        seen = gateway.checkpoint
        with pytest.raises(LogMisbehaved, match="does not extend checkpoint"):
            gateway.check_log()
        assert gateway.checkpoint == seen  # the evidence is kept
        gateway.close()
        # A log key of the same name but another key: no checkpoint, no receipt of this log verifies with it.
        impostor = NoteKey.of(log_key(fork).name, Ed25519PrivateKey.generate()).vkey
        key, kid = other.register("gw-sdk-2")
        options = {"client": other.client, "send": False, "log_key": impostor}
        stranger = Emitter("http://t", "gw-sdk-2", "acme", key, kid, spool=tmp_path / "spool-2", **options)
        with pytest.raises(LogMisbehaved, match="carries no signature by"):
            stranger.check_log()
        stranger.emit(**invocation())
        with pytest.raises(LogMisbehaved, match="receipt does not verify"):
            stranger.flush()
        stranger.close()
