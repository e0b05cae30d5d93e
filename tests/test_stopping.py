"""Every Custody process stops cleanly on SIGTERM, SIGINT and SIGHUP sent to it alone (not its process group, as
docker stop, systemd and CI send them), and takes down what it started; killed with SIGKILL, what it started
notices and stops by itself: no orphan keeps a port or the data dir's lock."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from ingest.sdk import generate_key, public_jwk
from tests.conftest import ADMIN, ServerProcess, read_lake
from tests.signing import chain
from tests.test_demo_browser import start_demo, stop_demo

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids still alive after ``timeout`` seconds (none, normally)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {pid for pid in pids if alive(pid)}
        if not left:
            return set()
        time.sleep(0.1)
    return {pid for pid in pids if alive(pid)}


def closed(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    except httpx.TransportError:
        return True
    return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_custody_serve_under_load_stops_on_each_signal_with_every_ack_in_the_lake(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    tokens: dict[str, list[str]] = {}
    for number in range(4):
        emitter, key = f"gw-{number}", generate_key("EdDSA")
        response = httpx.put(
            f"{server.url}/v1/emitters/{emitter}",
            json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, f"{emitter}-k1")]},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text
        tokens[emitter] = chain(emitter, 3000, key, f"{emitter}-k1")[0]
    acked: dict[str, list[str]] = {emitter: [] for emitter in tokens}

    def post(emitter: str) -> None:
        sent = 0
        with httpx.Client(timeout=10) as client:
            while sent < len(tokens[emitter]):
                batch = tokens[emitter][sent : sent + 50]
                try:
                    response = client.post(f"{server.url}/v1/events", json={"events": batch})
                except httpx.TransportError:
                    return  # the server stopped: what it acknowledged is what counts
                if response.status_code != 200:
                    return
                results = response.json()["results"]
                assert all(result["status"] == "accepted" for result in results), results[:2]
                acked[emitter] += [result["event_id"] for result in results]
                sent += len(batch)

    threads = [threading.Thread(target=post, args=(emitter,)) for emitter in acked]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # in the middle of the load
    assert server.process is not None
    helpers = descendants(server.process.pid)  # the verifier and lake-writer processes
    started = time.monotonic()
    os.kill(server.process.pid, stop_signal)  # the process alone
    assert server.process.wait(timeout=30) == 0
    took = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=30)
    print(f"stopped in {took:.2f} s")
    assert took < 10, f"stopping took {took:.1f} s"
    assert not wait_gone(helpers, 10)
    assert sum(map(len, acked.values())) > 0
    stored = {row[0] for row in read_lake(tmp_path / "data", "event_id")}
    for emitter, event_ids in acked.items():
        assert set(event_ids) <= stored, f"{emitter}: acknowledged events missing from the lake after the stop"
    # and at once again, on the same port and data dir
    again = ServerProcess(tmp_path / "data", tmp_path / "again.log")
    again.port, again.url = server.port, server.url
    again.start()
    assert again.stop() == 0


def test_the_demo_stops_on_sigterm_starts_again_at_once_and_its_servers_outlive_no_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    size = ("--days", "3", "--tasks-per-day", "20")
    process, _, ports, _ = start_demo(data, *size)
    try:
        children = descendants(process.pid)
        assert len(children) >= 4  # ingest, read API, gateway, dashboard (and their helpers)
        os.kill(process.pid, signal.SIGTERM)  # the demo alone, as docker stop or systemd would
        assert process.wait(timeout=90) == 0
        assert not wait_gone(children, 30), "demo servers outlived the demo"
        assert all(closed(port) for port in ports.values())
    finally:
        stop_demo(process)
    # at once, on the same ports and the same data dir
    second, _, _, output = start_demo(data, *size, ports=ports)
    try:
        assert "reusing" in output
        children = descendants(second.pid)
        os.kill(second.pid, signal.SIGKILL)  # the parent dies without stopping anything
        second.wait(timeout=30)
        left = wait_gone(children, 30)
        assert not left, f"orphans after the demo's SIGKILL: {sorted(left)}"
        assert all(closed(port) for port in ports.values())
    finally:
        stop_demo(second)
    # the data dir's lock is free: a server takes it
    server = ServerProcess(data, tmp_path / "after.log").start()
    assert server.stop() == 0
