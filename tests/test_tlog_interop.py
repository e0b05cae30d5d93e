"""An implementation of signed notes and RFC 6962 proofs that is not ours checks our log: Go's
golang.org/x/mod/sumdb/note and sumdb/tlog (Debian's golang-golang-x-mod-dev; ``.ci/setup-system`` installs it with
Go) run ``tests/interop/tlogcheck`` against a real ``custody serve``: they verify the checkpoint with the log's
verifier key, our inclusion and consistency proofs, and prove the same from our tiles over HTTP."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from store.ground.layout import DataDir
from store.ground.tlog import NoteKey, open_checkpoint
from store.merkle_log import LogReader, log_key
from tests.conftest import ServerProcess
from tests.signing import chain, hash_of
from tests.test_server_process import register

pytestmark = pytest.mark.slow

CHECKER = Path(__file__).parent / "interop" / "tlogcheck"
GOPATH = "/usr/share/gocode"


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("go") is None or not Path(GOPATH, "src/golang.org/x/mod/sumdb/note").is_dir():
        pytest.fail("Go and golang-golang-x-mod-dev are needed: .ci/setup-system installs them")
    binary = tmp_path_factory.mktemp("go") / "tlogcheck"
    home = tmp_path_factory.mktemp("gohome")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "GOFLAGS": "",
        "HOME": str(home),
        "GOCACHE": str(home / "cache"),
    }
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=CHECKER, env=env, check=True, timeout=300)
    return binary


def new_checkpoint(url: str, key: NoteKey, above: int) -> tuple[str, int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/checkpoint")
        if response.status_code == 200 and (size := open_checkpoint(response.text, key).size) > above:
            return response.text, size
        time.sleep(0.1)
    raise AssertionError("no new checkpoint within 30 s")


def test_go_checks_our_checkpoint_proofs_and_tiles(tmp_path: Path, tlogcheck: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    private = DataDir(server.data_dir).server_key()
    key = log_key(private)
    signer, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 700, signer, kid)
    acked = []
    for start in range(0, 40, 20):
        acked += httpx.post(f"{server.url}/v1/events", json={"events": tokens[start : start + 20]}).json()["results"]
    old_note, old_size = new_checkpoint(server.url, key, 0)
    for start in range(40, 700, 100):
        acked += httpx.post(f"{server.url}/v1/events", json={"events": tokens[start : start + 100]}).json()["results"]
    note, size = new_checkpoint(server.url, key, acked[-1]["log_index"])  # crosses two full level-0 tiles
    consistency = httpx.get(f"{server.url}/v1/log/consistency", params={"from": old_size, "to": size}).json()
    reader = LogReader(DataDir(server.data_dir))
    bodies = [json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "==")) for t in tokens]
    chosen = [0, 255, 256, 511, 699]
    inclusions = [
        {
            "index": acked[n]["log_index"],
            "event_hash": hash_of(bodies[n]),
            "proof": [base64.b64encode(h).decode() for h in reader.inclusion(acked[n]["log_index"], size)],
        }
        for n in chosen
    ]
    assert all(result["status"] == "accepted" for result in acked)
    request = {
        "url": server.url,
        "vkey": key.vkey,
        "checkpoint": note,
        "old_size": old_size,
        "old_root": base64.b64encode(open_checkpoint(old_note, key).root).decode(),
        "consistency": consistency["proof"],
        "inclusions": inclusions,
    }
    checked = subprocess.run([str(tlogcheck)], input=json.dumps(request), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("OK: leaf") == len(chosen)
    assert f"OK: the tree of size {size} extends the tree of size {old_size}" in checked.stdout

    # the same checker refuses what it must: a checkpoint whose size was changed, a proof for another leaf
    lines = note.split("\n")
    lines[1] = str(size - 1)
    forged = subprocess.run(
        [str(tlogcheck)], input=json.dumps({**request, "checkpoint": "\n".join(lines)}), capture_output=True, text=True
    )
    assert forged.returncode == 1
    assert "FAIL: checkpoint signature" in forged.stdout
    wrong = [{**inclusions[0], "index": inclusions[1]["index"]}]
    refused = subprocess.run(
        [str(tlogcheck)], input=json.dumps({**request, "inclusions": wrong}), capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "as Custody served it" in refused.stdout
    assert server.stop() == 0
