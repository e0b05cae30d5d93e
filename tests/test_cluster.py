"""Several `custody serve --state postgresql://` nodes on one real PostgreSQL and one shared data dir.

Every node accepts any emitter; PostgreSQL decides each chain and the log's order. Nodes are killed with SIGKILL
at random under load from many emitters, round after round: every acknowledged event must end in the lake exactly
once, every chain intact, the transparency log consistent, `custody verify` clean.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow.fs as pafs
import pytest

from ingest.sdk import generate_key, public_jwk
from store.ground.canonical import ZERO_HASH
from tests.conftest import ADMIN, REPO, ServerProcess, read_lake
from tests.signing import hash_of, payload, sign

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def node(data_dir: Path, log: Path, state: str, lake: str | None = None) -> ServerProcess:
    extra = ("--lake", lake) if lake else ()
    return ServerProcess(data_dir, log, "--state", state, "--verify-workers", "0", "--no-detect", *extra)


def register(url: str, emitter: str, tenant: str = "acme") -> tuple[Any, str]:
    key = generate_key("EdDSA")
    kid = f"{emitter}-k1"
    response = httpx.put(
        f"{url}/v1/emitters/{emitter}",
        json={"tenant": tenant, "kind": "gateway", "keys": [public_jwk(key, kid)]},
        headers=ADMIN,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return key, kid


class Chain:
    """One emitter's events, signed in order; what the nodes acknowledged of them."""

    def __init__(self, emitter: str, key: Any, kid: str) -> None:
        self.emitter, self.key, self.kid = emitter, key, kid
        self.bodies: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.acked = 0  # events 1..acked are acknowledged (accepted or duplicate)

    def extend(self, count: int) -> None:
        prev = hash_of(self.bodies[-1]) if self.bodies else ZERO_HASH
        for _ in range(count):
            body = payload(self.emitter, len(self.bodies) + 1, prev)
            self.bodies.append(body)
            self.tokens.append(sign(body, self.key, self.kid))
            prev = hash_of(body)


def _objects(uri: str) -> list[str]:
    filesystem, base = pafs.FileSystem.from_uri(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    return [info.path[len(base) + 1 :] for info in infos if info.type == pafs.FileType.File]


def test_two_nodes_given_the_same_next_seq_at_once_accept_exactly_one(tmp_path: Path, postgres: Any) -> None:
    state = postgres.database()
    shared = tmp_path / "shared"
    first = node(shared, tmp_path / "a.log", state).start()
    second = node(shared, tmp_path / "b.log", state).start()
    try:
        key, kid = register(first.url, "gw-race")
        prev, outcomes = ZERO_HASH, []
        for seq in range(1, 21):
            rivals = [payload("gw-race", seq, prev) for _ in range(2)]  # two different events, the same seq
            answers: list[dict[str, Any]] = [{}, {}]
            start = threading.Barrier(2)

            def post(
                slot: int, url: str, body: dict[str, Any], start: threading.Barrier, answers: list[dict[str, Any]]
            ) -> None:
                token = sign(body, key, kid)
                start.wait()
                response = httpx.post(f"{url}/v1/events", json={"events": [token]}, timeout=30)
                answers[slot] = response.json()["results"][0]

            threads = [
                threading.Thread(target=post, args=(slot, url, body, start, answers))
                for slot, (url, body) in enumerate(zip((first.url, second.url), rivals, strict=True))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            statuses = sorted(answer["status"] for answer in answers)
            assert statuses == ["accepted", "rejected"], answers
            loser = next(answer for answer in answers if answer["status"] == "rejected")
            assert loser["error"] == "chain_conflict", loser
            winner = rivals[[answer["status"] for answer in answers].index("accepted")]
            outcomes.append(winner["event_id"])
            prev = hash_of(winner)
        first.stop(), second.stop()
        rows = read_lake(shared, "emitter, seq, event_id")
        stored = sorted((seq, event_id) for emitter, seq, event_id in rows if emitter == "gw-race")
        assert stored == list(enumerate(outcomes, 1))
    finally:
        first.stop(), second.stop()


@pytest.mark.parametrize("lake", ["disk", "s3"])
def test_nodes_killed_at_random_under_load_lose_nothing_acknowledged(
    tmp_path: Path, postgres: Any, lake: str, request: pytest.FixtureRequest
) -> None:
    """The lake on the shared disk, or on an S3-compatible server (moto) whose objects are then the lake."""
    state = postgres.database()
    shared = tmp_path / "shared"
    home = request.getfixturevalue("s3").bucket() if lake == "s3" else None
    nodes = [node(shared, tmp_path / f"node{number}.log", state, home) for number in range(3)]
    for server in nodes:
        server.start()
    chains = [Chain(f"gw-{number}", *register(nodes[0].url, f"gw-{number}")) for number in range(12)]
    rng = random.Random(22)
    stop = threading.Event()
    failures: list[str] = []
    attempts = {"errors": 0}

    def emit(chain: Chain) -> None:
        """Post the chain in batches to random nodes; a batch whose answer was lost is sent again (to any node)
        until it is acknowledged: accepted or duplicate both mean the log has it."""
        local = random.Random(chain.emitter)
        while not stop.is_set():
            if len(chain.tokens) < chain.acked + 20:
                chain.extend(20)
            batch = chain.tokens[chain.acked : chain.acked + local.randint(1, 20)]
            url = local.choice(nodes).url
            try:
                response = httpx.post(f"{url}/v1/events", json={"events": batch}, timeout=10)
            except httpx.HTTPError:
                attempts["errors"] += 1
                time.sleep(0.05)
                continue
            if response.status_code != 200:  # 503 from a node starting or losing PostgreSQL: send again
                attempts["errors"] += 1
                time.sleep(0.05)
                continue
            results = response.json()["results"]
            for result in results:
                if result["status"] == "rejected":
                    failures.append(f"{chain.emitter}: {result}")
                    stop.set()
                    return
            chain.acked += len(results)

    threads = [threading.Thread(target=emit, args=(chain,), daemon=True) for chain in chains]
    for thread in threads:
        thread.start()
    rounds = 8
    try:
        for _ in range(rounds):
            time.sleep(rng.uniform(0.5, 1.5))
            victim = rng.choice(nodes)
            victim.kill()  # SIGKILL: whatever it acknowledged must survive it
            time.sleep(rng.uniform(0.0, 0.5))
            victim.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures[:5]
    acked = sum(chain.acked for chain in chains)
    assert acked > 500, f"the load acknowledged only {acked} events"
    print(f"{acked} events acknowledged over {rounds} kill -9 rounds, {attempts['errors']} requests sent again")
    for server in nodes:
        assert server.stop() == 0
    # One node started again and stopped flushes whatever the last leader left in PostgreSQL.
    last = node(shared, tmp_path / "last.log", state, home).start()
    assert last.stop() == 0
    if home is not None:  # the objects are the lake: a reader with no copy of it gets everything from them
        objects = _objects(home)
        assert objects
        # the Hive layout, and no temporary object of an upload a killed leader left unfinished
        assert all(re.fullmatch(r"events/tenant=[^/]+/date=[-0-9]+/[^/]+\.parquet", key) for key in objects)
        shutil.rmtree(shared / "lake")
    # custody verify reads the lake as every reader does (from the object store: the copy was just deleted)
    verified = subprocess.run(
        [sys.executable, "-m", "custody.cli", "verify", "--data-dir", str(shared)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]

    rows = read_lake(shared, "emitter, seq, event_id, log_index")
    by_emitter: dict[str, list[tuple[int, str]]] = {}
    for emitter, seq, event_id, _ in rows:
        by_emitter.setdefault(emitter, []).append((seq, event_id))
    for chain in chains:
        stored = sorted(by_emitter.get(chain.emitter, []))
        # every acknowledged event exactly once, in its place; events sent but never acknowledged may be there too
        assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1)), chain.emitter
        assert len(stored) >= chain.acked
        assert [event_id for _, event_id in stored[: chain.acked]] == [
            body["event_id"] for body in chain.bodies[: chain.acked]
        ]
    indexes = sorted(index for *_, index in rows)
    assert indexes == list(range(len(indexes))), "the log's indexes are not 0..n-1 without a gap or a repeat"
    with psycopg.connect(state) as conn:
        assert conn.execute("SELECT count(*) FROM custody_pending").fetchone() == (0,)
        size = conn.execute("SELECT size FROM custody_log").fetchone()
    assert size == (len(rows),)
    print(verified.stdout[-1500:])
    assert f"{len(rows)}" in verified.stdout.replace(",", "")


def test_a_node_outlives_a_postgresql_restart_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """PostgreSQL stops under a running node (every session ends) and comes back: while it is down, requests
    answer 503 storage_unavailable and acknowledge nothing; afterwards the node carries on by itself (new
    connections, the lead taken again) and every acknowledged event reaches the lake once."""
    from tests.conftest import free_port
    from tests.pg_kit import PostgresServer

    database = PostgresServer(free_port()).start()  # its own server: the session's stays up for the other tests
    try:
        state = database.database()
        shared = tmp_path / "shared"
        server = node(shared, tmp_path / "node.log", state).start()
        chain = Chain("gw-pg", *register(server.url, "gw-pg"))
        chain.extend(60)

        def post(batch: list[str]) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/events", json={"events": batch}, timeout=30)

        first = post(chain.tokens[:20])
        assert [r["status"] for r in first.json()["results"]] == ["accepted"] * 20
        chain.acked = 20
        database.stop(remove=False)
        refused = post(chain.tokens[20:40])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "storage_unavailable"
        database.run()
        deadline = time.monotonic() + 60
        while True:  # the pool's broken connections are replaced as requests meet them
            response = post(chain.tokens[20:40])
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert {r["status"] for r in response.json()["results"]} == {"accepted"}
        last = post(chain.tokens[40:60])
        assert {r["status"] for r in last.json()["results"]} == {"accepted"}
        assert server.stop() == 0
        rows = read_lake(shared, "emitter, seq, event_id")
        stored = sorted((seq, event_id) for emitter, seq, event_id in rows if emitter == "gw-pg")
        assert stored == [(seq, body["event_id"]) for seq, body in enumerate(chain.bodies, 1)]
    finally:
        database.stop()
