"""Witnessing: `custody witness` answers c2sp.org/tlog-witness add-checkpoint as the specification says, and a log
configured with witnesses publishes cosigned checkpoints that bundles carry; a forked log gets no cosignature."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from custody.cli import main
from ingest.witness import Witness, WitnessEndpoint, create_witness_app
from store.ground.layout import DataDir
from store.ground.tlog import COSIGNATURE_V1, NoteKey, open_checkpoint
from tests.conftest import REPO, Harness, free_port, open_harness
from tests.test_transparency_log import log_key, post_chain


def request(old: int, proof: list[bytes], note: str) -> bytes:
    return (f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof) + "\n" + note).encode()


def grow(harness: Harness, emitter: str, count: int) -> str:
    post_chain(harness, emitter, count)
    harness.server.store.merkle.publish()
    return harness.client.get("/checkpoint").text


def test_add_checkpoint_answers_as_the_specification_says(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with open_harness(tmp_path / "data") as harness:
        log = log_key(tmp_path / "data")
        witness = Witness("witness.test/w1", key, [log], tmp_path / "witness.json")
        public = NoteKey.of("witness.test/w1", key, COSIGNATURE_V1)
        merkle = harness.server.store.merkle
        with TestClient(create_witness_app(witness)) as client:
            first = grow(harness, "gw-1", 5)
            answer = client.post("/add-checkpoint", content=request(0, [], first))
            assert answer.status_code == 200, answer.text
            cosigned = open_checkpoint(first + answer.text, log, [public])
            assert list(cosigned.cosigned) == ["witness.test/w1"]
            again = client.post("/add-checkpoint", content=request(0, [], first))
            assert again.status_code == 409
            assert again.headers["content-type"].startswith("text/x.tlog.size")
            assert again.text == f"{cosigned.size}\n"

            second = grow(harness, "gw-2", 7)
            size = open_checkpoint(second, log).size
            proof = merkle.consistency(cosigned.size, size)
            forged = [bytes(32), *proof[1:]]
            assert client.post("/add-checkpoint", content=request(cosigned.size, forged, second)).status_code == 422
            assert client.post("/add-checkpoint", content=request(size + 1, [], second)).status_code == 400
            answer = client.post("/add-checkpoint", content=request(cosigned.size, proof, second))
            assert answer.status_code == 200, answer.text

            stranger = NoteKey.of("custody/elsewhere", Ed25519PrivateKey.generate())
            text = f"{stranger.name}\n1\n{base64.b64encode(bytes(32)).decode()}\n"
            unknown = (
                text + "\n\u2014 custody/elsewhere " + base64.b64encode(stranger.key_id + bytes(64)).decode() + "\n"
            )
            assert client.post("/add-checkpoint", content=request(0, [], unknown)).status_code == 404
            bad = second.replace(second.split("\n")[2], base64.b64encode(bytes(32)).decode())
            assert client.post("/add-checkpoint", content=request(size, [], bad)).status_code == 403
            for junk in (b"", b"old x\n\n" + second.encode(), b"\xff\xfe", b"old 01\n\n" + second.encode()):
                assert client.post("/add-checkpoint", content=junk).status_code == 400, junk
    # what it cosigned survives a restart of the witness
    reopened = Witness("witness.test/w1", key, [log], tmp_path / "witness.json")
    with TestClient(create_witness_app(reopened)) as client:
        assert client.post("/add-checkpoint", content=request(0, [], first)).text == f"{size}\n"


@pytest.mark.slow
def test_a_log_with_a_witness_publishes_cosigned_checkpoints_and_a_fork_gets_none(tmp_path: Path) -> None:
    honest, fork = tmp_path / "honest", tmp_path / "fork"
    with open_harness(honest):  # created once to learn the log key the witness must know
        pass
    log = log_key(honest)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "custody.cli", "witness", "--name", "witness.test/w1", "--key-file",
         str(tmp_path / "w.pem"), "--state", str(tmp_path / "w.json"), "--log", log.vkey, "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        printed = process.stdout.readline()
        assert printed.startswith("witness key: witness.test/w1+")
        vkey = printed.split(": ", 1)[1].strip()
        endpoint = WitnessEndpoint.parse(f"http://127.0.0.1:{port}={vkey}")
        _wait(f"http://127.0.0.1:{port}/")
        with open_harness(honest, witnesses=[endpoint], witness_quorum=1) as harness:
            note = grow(harness, "gw-1", 12)
            checkpoint = open_checkpoint(note, log, [endpoint.key])
            assert list(checkpoint.cosigned) == ["witness.test/w1"]
            grow(harness, "gw-2", 3)  # the next one: old size and a consistency proof
            assert open_checkpoint(harness.client.get("/checkpoint").text, log, [endpoint.key]).cosigned
        _bundle_with_cosignature(honest, tmp_path, log, vkey)
        (fork / "state").mkdir(parents=True)
        shutil.copy(DataDir(honest).server_key_file, DataDir(fork).server_key_file)
        with open_harness(fork, witnesses=[endpoint], witness_quorum=1) as other:
            forked = grow(other, "gw-9", 60)
            assert open_checkpoint(forked, log, [endpoint.key]).cosigned == {}  # refused: not consistent
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def _bundle_with_cosignature(data: Path, tmp_path: Path, log: NoteKey, witness_vkey: str) -> None:
    from tests.conftest import read_lake

    event_id = next(row[0] for row in read_lake(data, "event_id, emitter") if row[1] == "gw-1")
    target = tmp_path / "bundle"
    assert main(["bundle", "write", "--data-dir", str(data), "--event", event_id, "--output", str(target)]) == 0
    verify = ["bundle", "verify", str(target), "--log-key", log.vkey, "--witness", witness_vkey]
    assert main([*verify, "--quorum", "1"]) == 0
    other = NoteKey.of("witness.test/w2", Ed25519PrivateKey.generate(), COSIGNATURE_V1).vkey
    assert main(["bundle", "verify", str(target), "--log-key", log.vkey, "--witness", other, "--quorum", "1"]) == 1


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


def test_hostile_add_checkpoint_requests_are_400_not_500(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = NoteKey.of("custody/test", Ed25519PrivateKey.generate())
    witness = Witness("witness.test/w1", key, [log], tmp_path / "witness.json")
    with TestClient(create_witness_app(witness)) as client:
        for body in (
            b"old " + b"9" * 5000 + b"\n\nx\n",
            b"old 1\n" + b"AAAA\n" * 70 + b"\nx\n",
            b"old 0\n\n" + b"custody/test\n" + b"9" * 5000 + b"\nAAAA\n\n\xe2\x80\x94 custody/test AAAAAAAA\n",
            b"x" * 70_000,
        ):
            answer = client.post("/add-checkpoint", content=body)
            assert answer.status_code in (400, 403), (answer.status_code, answer.text[:200])
