"""The real `custody serve` process: bulk ingest read back with DuckDB, kill -9 under load, full and read-only
data dirs, SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest

from ingest.sdk import Emitter, generate_key, public_jwk
from store.ground.canonical import canonicalize, event_hash
from store.ground.layout import DataDir
from store.ground.tlog import open_checkpoint
from store.merkle_log import LogReader, log_key
from tests.conftest import ADMIN, ServerProcess, invocation, read_lake
from tests.signing import GrowingChain, chain

pytestmark = pytest.mark.slow


def register(url: str, emitter: str, tenant: str = "acme"):
    key = generate_key()
    kid = f"{emitter}-k1"
    response = httpx.put(
        f"{url}/v1/emitters/{emitter}",
        headers=ADMIN,
        json={"tenant": tenant, "kind": "gateway", "keys": [public_jwk(key, kid)]},
    )
    response.raise_for_status()
    return key, kid


def wait_for_lake(data_dir: Path, count: int, timeout: float = 10.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        rows = [
            row
            for row in read_lake(data_dir, "emitter, seq, event_id, event_hash, prev_hash, jws")
            if row[0] != "custody.server"
        ]
        if len(rows) >= count:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{len(rows)} events in the lake after {timeout} s, expected {count}")


def wait_until_flushed(server: ServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/healthz").json()["unflushed_events"]:
        assert time.monotonic() < deadline, "the flusher did not catch up"
        time.sleep(0.05)


def payload_of(jws: str) -> dict:
    part = jws.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_ten_thousand_events_from_five_interleaved_emitters(server_process: ServerProcess) -> None:
    server = server_process.start()
    emitters = []
    for index in range(5):
        key, kid = register(server.url, f"gw-{index}", tenant=("acme", "globex")[index % 2])
        emitters.append(Emitter(server.url, f"gw-{index}", ("acme", "globex")[index % 2], key, kid, batch_size=400))
    rng = random.Random(1)
    sent: dict[str, str] = {}

    def run(emitter: Emitter, count: int) -> None:
        for _ in range(count):
            fields = invocation(resource={"type": "ticket", "id": f"T-{rng.randrange(999)}", "tenant": emitter.tenant})
            event = emitter.emit(**fields)
            sent[event.event_id] = event.event_hash
        emitter.flush()

    threads = [threading.Thread(target=run, args=(emitter, 2000)) for emitter in emitters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for emitter in emitters:
        assert emitter.head[0] == 2000
        emitter.close()

    rows = wait_for_lake(server.data_dir, 10_000, timeout=5.0)  # queries see events within 5 s of the ack
    assert len(rows) == 10_000
    assert Counter(row[0] for row in rows) == {f"gw-{i}": 2000 for i in range(5)}
    assert {row[2]: row[3] for row in rows} == sent
    previous: dict[str, str] = {}
    for emitter, seq, _, digest, prev_hash, jws in rows:
        assert event_hash(canonicalize(payload_of(jws))) == digest
        assert prev_hash == previous.get(emitter, "0" * 64), (emitter, seq)
        previous[emitter] = digest
    tenants = dict(read_lake(server.data_dir, "DISTINCT emitter, tenant"))
    assert tenants["gw-1"] == "globex"
    assert tenants["gw-2"] == "acme"
    assert server.stop() == 0


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie left for an init that does not reap."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    server.start()
    emitters = {f"gw-{i}": register(server.url, f"gw-{i}") for i in range(3)}
    chains = {name: GrowingChain(name, key, kid) for name, (key, kid) in emitters.items()}
    acked: dict[str, set[int]] = {name: set() for name in emitters}
    logged: dict[int, str] = {}  # log index -> event id, from the acks
    checkpoints: list[str] = []  # every checkpoint seen, kills included
    rng = random.Random(9)

    def load(name: str, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            head = client.get(f"/v1/emitters/{name}/head", headers=ADMIN).json()["seq"]
            position = head
            while not stop.is_set():
                batch = chains[name].batch(position, 40)
                try:
                    body = client.post("/v1/events", json={"events": batch}).json()
                except (httpx.TransportError, ValueError):
                    return
                for offset, result in enumerate(body["results"]):
                    assert result["status"] in ("accepted", "duplicate"), result
                    acked[name].add(position + offset + 1)
                    if result["status"] == "accepted":
                        logged[result["log_index"]] = result["event_id"]
                with contextlib.suppress(httpx.TransportError):
                    if (seen := client.get("/checkpoint")).status_code == 200:
                        checkpoints.append(seen.text)
                position += len(batch)

    for round_number in range(5):
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(name, server.url, stop)) for name in emitters]
        before = sum(len(seqs) for seqs in acked.values())
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while sum(len(seqs) for seqs in acked.values()) == before and time.monotonic() < deadline:
            time.sleep(0.02)  # the kill must land while events are being acknowledged
        time.sleep(rng.uniform(0.1, 0.8))
        assert server.process is not None
        helpers = children_of(server.process.pid)
        assert len(helpers) >= 2, helpers  # the verifier processes and the lake writer, at least
        server.kill()
        stop.set()
        for thread in threads:
            thread.join()
        assert sum(len(seqs) for seqs in acked.values()) > before, f"round {round_number}: no ack before the kill"
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in helpers if alive(pid)], f"round {round_number}: helpers outlived the server"
        server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
        server.start()
        for name in emitters:
            head = httpx.get(f"{server.url}/v1/emitters/{name}/head", headers=ADMIN).json()["seq"]
            assert max(acked[name], default=0) <= head, f"round {round_number}: {name} lost acknowledged events"
    assert server.stop() == 0
    rows = [row for row in read_lake(server.data_dir, "emitter, seq, event_id") if row[0] != "custody.server"]
    by_emitter: dict[str, list[int]] = {}
    for emitter, seq, _ in rows:
        by_emitter.setdefault(emitter, []).append(seq)
    assert len({row[2] for row in rows}) == len(rows), "an event is in the lake twice"
    for name, seqs in by_emitter.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{name}: seqs not contiguous or repeated"
        assert acked[name] <= set(seqs), f"{name}: acknowledged seqs missing from the lake"
    assert sum(len(v) for v in acked.values()) > 500
    assert not list((tmp_path / "data" / "wal").glob("*.wal")), "SIGTERM left events in the WAL"
    # the transparency log: every acknowledged index holds its event, no hole, every checkpoint seen still holds
    indexes = dict(read_lake(server.data_dir, "log_index, event_id"))
    assert sorted(indexes) == list(range(len(indexes))), "log indexes with a hole or twice"
    assert all(indexes[index] == event_id for index, event_id in logged.items()), "an acked log index changed"
    log = LogReader(DataDir(server.data_dir))
    key = log_key(DataDir(server.data_dir).server_key())
    assert len(checkpoints) > 10
    for note in checkpoints:
        checkpoint = open_checkpoint(note, key)
        assert log.root(checkpoint.size) == checkpoint.root, f"checkpoint {checkpoint.size} no longer holds"


def helpers_named(pid: int, name: str) -> list[int]:
    """The running children of ``pid`` whose process name is ``name`` (a child may end while we look)."""
    named = []
    for child in children_of(pid):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{child}/comm").read_text().strip() == name and alive(child):
                named.append(child)
    return named


def test_a_verifier_killed_under_load_fails_at_most_its_requests_and_is_replaced(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", "--verify-workers", "2").start()
    assert server.process is not None
    verifiers = helpers_named(server.process.pid, "custody-verify")
    assert len(verifiers) == 2
    [lake_writer] = helpers_named(server.process.pid, "custody-lake")
    assert os.sched_getscheduler(lake_writer) == os.SCHED_IDLE  # it gets a core only when acks do not want it
    assert {os.sched_getscheduler(pid) for pid in verifiers} == {os.SCHED_OTHER}
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 4000, key, kid)
    statuses: Counter[int] = Counter()
    acked: set[int] = set()
    killed = False
    with httpx.Client(base_url=server.url, timeout=30) as client:
        position = 0
        while position < len(tokens):
            if position >= 1000 and not killed:
                os.kill(verifiers[0], signal.SIGKILL)
                killed = True
            response = client.post("/v1/events", json={"events": tokens[position : position + 100]})
            statuses[response.status_code] += 1
            if response.status_code == 503:
                error = response.json()["error"]
                assert error["code"] == "verifier_unavailable", error
                assert client.get("/v1/emitters/gw-1/head", headers=ADMIN).json()["seq"] == position
                continue  # nothing was acknowledged: send the same events again
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert {r["status"] for r in results} == {"accepted"}, results[:2]
            acked.update(range(position + 1, position + len(results) + 1))
            position += len(results)
        assert statuses[503] <= 1, statuses  # only a request with chunks on the killed process
        deadline = time.monotonic() + 60
        while len(helpers_named(server.process.pid, "custody-verify")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        replaced = helpers_named(server.process.pid, "custody-verify")
        assert len(replaced) == 2
        assert verifiers[0] not in replaced
        assert verifiers[1] in replaced
        metrics = client.get("/metrics").text
        assert "custody_verifier_processes 2.0" in metrics
        assert "custody_verifier_restarts_total 1.0" in metrics
        assert re.search(r"^custody_index_pending_entries \d+\.0$", metrics, re.MULTILINE)
    assert server.stop() == 0
    assert [row[1] for row in read_lake(server.data_dir, "emitter, seq") if row[0] == "gw-1"] == sorted(acked)
    assert acked == set(range(1, 4001))


def test_events_that_are_not_strings_get_malformed_jws_from_a_server_with_verifier_processes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", "--verify-workers", "2").start()
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 3, key, kid)
    deep = "[" * 1000 + "]" * 1000  # valid JSON orjson accepts; the pickler does not
    body = f'{{"events": [{tokens[0]!r}, {deep}, {{"a": 1}}, 7, null, {tokens[1]!r}]}}'.replace("'", '"')
    response = httpx.post(f"{server.url}/v1/events", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected", "rejected", "rejected", "rejected", "accepted"]
    assert {r["error"] for r in results[1:5]} == {"malformed_jws"}
    assert server.stop() == 0


def test_a_client_gone_mid_body_is_not_answered_and_nothing_of_its_request_is_stored(tmp_path: Path) -> None:
    """POST /v1/events is served in front of FastAPI (``ingest.app.EventsEndpoint``): a client that closes its
    connection half way through the body leaves nothing behind, and the same event posted again is accepted."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", "--verify-workers", "1").start()
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 1, key, kid)
    body = orjson.dumps({"events": tokens})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = f"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        sock.sendall(head.encode() + b"\r\n\r\n" + body[: len(body) // 2])
        time.sleep(0.3)  # the server has read the headers and the first half
    time.sleep(0.3)
    response = httpx.post(f"{server.url}/v1/events", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == ["accepted"]
    assert "Traceback" not in server.log_path.read_text()
    assert server.stop() == 0
    assert [(row[0], row[1]) for row in wait_for_lake(server.data_dir, 1)] == [("gw-1", 1)]


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path("/tmp/custody-mount-probe")
    probe.mkdir(exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount(8) to make a full or read-only disk")


@needs_mount
def test_full_disk_gives_503_keeps_serving_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(data)], check=True)
    try:
        server = ServerProcess(data, tmp_path / "server.log").start()
        key, kid = register(server.url, "gw-1")
        tokens, _ = chain("gw-1", 200, key, kid)
        first = httpx.post(f"{server.url}/v1/events", json={"events": tokens[:50]}).json()
        assert {r["status"] for r in first["results"]} == {"accepted"}
        filler = data / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        full = httpx.post(f"{server.url}/v1/events", json={"events": tokens[50:150]})
        assert full.status_code == 503
        error = full.json()["error"]
        assert error["code"] == "storage_unavailable"
        assert "No space left on device" in error["message"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        head = httpx.get(f"{server.url}/v1/emitters/gw-1/head", headers=ADMIN).json()
        assert head["seq"] == 50, "a 503 request must acknowledge nothing"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "custody_storage_failures_total 1.0" in metrics
        filler.unlink()
        resumed = httpx.post(f"{server.url}/v1/events", json={"events": tokens[50:150]}).json()
        assert {r["status"] for r in resumed["results"]} == {"accepted"}
        assert server.stop() == 0
        assert [row[1] for row in read_lake(data, "emitter, seq") if row[0] == "gw-1"] == list(range(1, 151))
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


@needs_mount
def test_read_only_wal_gives_503_and_resumes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 40, key, kid)
    assert httpx.post(f"{server.url}/v1/events", json={"events": tokens[:10]}).status_code == 200
    wait_until_flushed(server)  # the flusher closed segment 1 and created segment 2 ahead, open for writing
    wal = server.data_dir / "wal"
    subprocess.run(["mount", "--bind", str(wal), str(wal)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(wal)], check=True)
        # A read-only mount stops new files, not writes to a file already open: segment 2 takes these, durably.
        taken = httpx.post(f"{server.url}/v1/events", json={"events": tokens[10:20]}).json()
        assert {r["status"] for r in taken["results"]} == {"accepted"}
        # The next rotation cannot create the segment after it, so the request after that has nowhere to write.
        deadline = time.monotonic() + 30
        while not re.search(r"wal segment \d+: cannot create it ahead: Read-only", server.log_path.read_text()):
            assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
            time.sleep(0.05)
        response = httpx.post(f"{server.url}/v1/events", json={"events": tokens[20:30]})
        assert response.status_code == 503
        assert "Read-only file system" in response.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/emitters/gw-1/head", headers=ADMIN).json()["seq"] == 20
    finally:
        subprocess.run(["umount", str(wal)], check=True)
    body = httpx.post(f"{server.url}/v1/events", json={"events": tokens[20:40]}).json()
    assert {r["status"] for r in body["results"]} == {"accepted"}
    assert server.stop() == 0
    assert [row[1] for row in read_lake(server.data_dir, "emitter, seq") if row[0] == "gw-1"] == list(range(1, 41))


def test_sigterm_flushes_and_a_second_server_cannot_share_the_data_dir(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", "--flush-interval", "3600").start()
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 25, key, kid)
    httpx.post(f"{server.url}/v1/events", json={"events": tokens})
    second = ServerProcess(tmp_path / "data", tmp_path / "second.log")
    with pytest.raises(RuntimeError, match="in use by another custody process"):
        second.start(timeout=30)
    compact = [sys.executable, "-m", "custody.cli", "compact", "--data-dir", str(server.data_dir), "--min-files", "1"]
    refused = subprocess.run(compact, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1
    assert "in use by another custody process" in refused.stderr
    assert server.stop() == 0
    assert len([row for row in read_lake(server.data_dir, "emitter") if row[0] == "gw-1"]) == 25
    compacted = subprocess.run(compact, capture_output=True, text=True, timeout=120, check=False)
    assert compacted.returncode == 0, compacted.stderr
    assert compacted.stdout.strip().endswith("files merged")
    assert len([row for row in read_lake(server.data_dir, "emitter") if row[0] == "gw-1"]) == 25


def test_serve_refuses_to_start_without_an_admin_token(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CUSTODY_ADMIN_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "custody.cli", "serve", "--data-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "CUSTODY_ADMIN_TOKEN is not set" in result.stderr


def test_the_data_dir_is_for_the_server_account_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as an operator might create it: the server tightens it
    server = ServerProcess(data, tmp_path / "server.log").start()
    key, kid = register(server.url, "gw-1")
    tokens, _ = chain("gw-1", 5, key, kid)
    assert httpx.post(f"{server.url}/v1/events", json={"events": tokens}).status_code == 200
    assert server.stop() == 0
    assert read_lake(data, "emitter")  # the lake, the WAL, state and keys were all written
    paths = [data, *data.rglob("*")]
    assert any(path.suffix == ".parquet" for path in paths)
    assert any(path.name == "state.sqlite" for path in paths)
    opened = {str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777) for path in paths}
    assert {name: mode for name, mode in opened.items() if int(mode, 8) & 0o077} == {}
