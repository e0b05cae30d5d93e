"""Several ingest nodes on one PostgreSQL (serve --state postgresql://), real processes, on this machine.

For 1, 2 and 3 nodes (sharing this machine's cores, so the figure that carries over is events per CPU-second):
pre-signed batches from many emitters, each client thread sticking to one node; measured are acknowledged
events/s, the CPU seconds of the nodes (with their verifier processes) and of PostgreSQL, PostgreSQL commits per
acknowledged request (pg_stat_database), and how long the leader then takes to move everything into the lake.

    .venv/bin/python bench/cluster.py [--nodes 1,2,3] [--emitters 24] [--events 2000] [--batch 100]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, free_port, machine
from bench.ingest import TOKEN, presign, register
from tests.pg_kit import PostgresServer

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def commits(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def wal_syncs(uri: str) -> tuple[int, float, int]:
    """PostgreSQL's WAL flushes so far: (count, milliseconds, bytes written)."""
    with psycopg.connect(uri) as conn:
        row = conn.execute("SELECT wal_sync, wal_sync_time, wal_bytes FROM pg_stat_wal").fetchone()
    assert row is not None
    return int(row[0]), float(row[1]), int(row[2])


def post(urls: list[str], chains: Mapping[str, tuple[object, list[str]]], batch: int, clients: int) -> tuple[int, int]:
    """Every chain in batches; client ``i`` posts to node ``i % len(urls)``. Returns (events, requests)."""
    names = list(chains)
    work = [names[i::clients] for i in range(clients)]
    counts = [0, 0]
    lock = threading.Lock()

    def client(number: int, mine: list[str]) -> None:
        port = int(urls[number % len(urls)].rsplit(":", 1)[1])
        bodies = [
            orjson.dumps({"events": chains[name][1][i : i + batch]})
            for name in mine
            for i in range(0, len(chains[name][1]), batch)
        ]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for body in bodies:
            connection.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
            data = orjson.loads(connection.getresponse().read())
            accepted = sum(1 for result in data["results"] if result["status"] == "accepted")
            assert accepted == len(data["results"]), data["results"][:2]
            with lock:
                counts[0] += accepted
                counts[1] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(number, mine)) for number, mine in enumerate(work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts[0], counts[1]


def run(postgres: PostgresServer, root: Path, nodes: int, args: argparse.Namespace) -> dict[str, float]:
    uri = postgres.database()
    shared = root / f"shared-{nodes}"
    servers = [Server(shared, TOKEN, extra=("--state", uri, "--no-detect")) for _ in range(nodes)]
    chains = presign(args.emitters, args.events)
    register(servers[0].url, chains)
    time.sleep(1.5)  # every node has loaded the registry (it polls every 0.5 s)
    pids = [pid for server in servers for pid in _tree(server.process.pid)]
    pg_pids = _tree(postgres.process.pid) if postgres.process else []
    node_cpu, pg_cpu, pg_commits, wal = cpu_seconds(pids), cpu_seconds(pg_pids), commits(uri), wal_syncs(uri)
    started = time.perf_counter()
    events, requests = post([server.url for server in servers], chains, args.batch, args.clients)
    elapsed = time.perf_counter() - started
    node_cpu = cpu_seconds(pids) - node_cpu
    pg_cpu = cpu_seconds(_tree(postgres.process.pid) if postgres.process else []) - pg_cpu
    pg_commits = commits(uri) - pg_commits
    time.sleep(0.6)  # PostgreSQL publishes its WAL statistics at most every 500 ms
    wal_after = wal_syncs(uri)
    syncs, sync_ms, wal_bytes = (after - before for after, before in zip(wal_after, wal, strict=True))
    held, transactions = 0.0, 0.0
    for server in servers:
        for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("custody_pg_log_lock_seconds "):
                held += float(line.split()[1])
            elif line.startswith("custody_pg_transactions "):
                transactions += float(line.split()[1])
    drained_at = time.perf_counter()
    with psycopg.connect(uri, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM custody_pending").fetchone() != (0,):
            time.sleep(0.2)
    drain = time.perf_counter() - drained_at
    for server in servers:
        server.stop()
    return {
        "nodes": nodes,
        "events_s": events / elapsed,
        "requests": requests,
        "commits_per_request": pg_commits / requests,
        "node_cpu": node_cpu,
        "pg_cpu": pg_cpu,
        "per_cpu_s": events / (node_cpu + pg_cpu),
        "node_per_cpu_s": events / node_cpu,
        "pg_per_cpu_s": events / pg_cpu if pg_cpu else float("inf"),
        "drain_s": drain,
        "hold_ms": 1000 * held / transactions,
        # the log's row is held by one transaction at a time: the cluster's ceiling in events/s at this batch size
        "ceiling": events / requests / (held / transactions),
        "serial": held / elapsed,
        "wal_sync_ms": sync_ms / syncs if syncs else 0.0,
        "wal_syncs_per_request": syncs / requests,
        "wal_bytes_per_event": wal_bytes / events,
        "elapsed": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--emitters", type=int, default=24)
    parser.add_argument("--events", type=int, default=2000, help="events per emitter")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    print(machine())
    postgres = PostgresServer(free_port(), {"track_wal_io_timing": "on"}).start()
    try:
        with tempfile.TemporaryDirectory(prefix="custody-bench-cluster-") as directory:
            rows = [run(postgres, Path(directory), int(nodes), args) for nodes in args.nodes.split(",")]
    finally:
        postgres.stop()
    print(f"{args.emitters} emitters x {args.events} events, batches of {args.batch}, {args.clients} client threads")
    print(
        "| nodes | events/s | PG commits per request | node CPU s | PostgreSQL CPU s | events per CPU-s (all)"
        " | per node CPU-s | per PostgreSQL CPU-s | log row held per commit | ceiling of the log row"
        " | lake drained after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"{row['nodes']:.0f} node(s): PostgreSQL WAL flush {row['wal_sync_ms']:.2f} ms mean,"
            f" {row['wal_syncs_per_request']:.2f} per request, {row['wal_bytes_per_event']:,.0f} WAL bytes per event"
        )
    for row in rows:
        print(
            f"| {row['nodes']:.0f} | {row['events_s']:,.0f} | {row['commits_per_request']:.2f} | {row['node_cpu']:.1f}"
            f" | {row['pg_cpu']:.1f} | {row['per_cpu_s']:,.0f} | {row['node_per_cpu_s']:,.0f}"
            f" | {row['pg_per_cpu_s']:,.0f} | {row['hold_ms']:.2f} ms ({row['serial']:.0%} of the run)"
            f" | {row['ceiling']:,.0f} events/s | {row['drain_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
