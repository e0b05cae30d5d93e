"""Continuous detection benchmark, real processes: a `custody serve` with detection on (and off, for comparison),
the load generator of bench/ingest.py, a webhook receiver.

1. Ingest throughput with detection on and off (alternating rounds, pre-signed batches at full speed).
2. Detection latency at half of the measured maximum: while that load runs, probes revoke a fresh credential and then
   use it; each probe's latency runs from the acknowledgement of the use to the critical alert at the webhook.
3. Memory of the detector's state after N synthetic events of A agents (in this process: tracemalloc and Arrow).

    .venv/bin/python bench/detection.py [--rounds 2] [--probes 20] [--state-events 1000000] [--agents 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custody_sdk import Emitter, generate_key, public_jwk

from bench.common import Server, machine
from bench.ingest import ADMIN, TOKEN, post_all, presign, register
from query.detect.engine import Detector
from query.lake import LakeReader
from store.schema import EVENT_SCHEMA


class Receiver:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.arrivals.setdefault(body["subject"], time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def throughput(root: Path, detect: bool, emitters: int, events: int) -> float:
    data = root / f"data-{uuid.uuid4().hex[:8]}"
    data.mkdir()
    server = Server(data, TOKEN, extra=() if detect else ("--no-detect",))
    try:
        chains = presign(emitters, events)
        register(server.url, chains)
        rate, _ = post_all(server.url, chains, batch=500, clients=8)
        return rate
    finally:
        server.stop()


def latency(root: Path, rate: float, probes: int) -> list[float]:
    receiver = Receiver()
    (root / "secret").write_text("bench-secret")
    (root / "alerts.toml").write_text(
        f'[[channel]]\nname = "hook"\ntype = "webhook"\nurl = "{receiver.url}"\nsecret_file = "secret"\n'
        'min_severity = "critical"\n'
    )
    data = root / "data-latency"
    data.mkdir()
    server = Server(data, TOKEN, extra=("--alerts", str(root / "alerts.toml")))
    try:
        idp_key, gw_key = generate_key(), generate_key()
        for name, key, kind in (("bench-idp", idp_key, "idp"), ("bench-probe", gw_key, "gateway")):
            httpx.put(
                f"{server.url}/v1/emitters/{name}",
                headers=ADMIN,
                json={"tenant": "t0", "kind": kind, "keys": [public_jwk(key, f"{name}-k1")]},
            ).raise_for_status()
        chains = presign(16, int(rate * (probes * 1.3 + 8) / 16) + 100)  # load for as long as the probes take
        register(server.url, chains)

        def steady_load() -> None:
            with contextlib.suppress(OSError):  # the server stops once the probes are done
                post_all(server.url, chains, 500, 8, rate)

        load = threading.Thread(target=steady_load, daemon=True)
        load.start()
        time.sleep(3)
        acked: dict[str, float] = {}
        spool = root / "spools"
        with (
            Emitter(server.url, "bench-idp", "t0", idp_key, "bench-idp-k1", spool=spool / "idp") as idp,
            Emitter(server.url, "bench-probe", "t0", gw_key, "bench-probe-k1", spool=spool / "gw") as gateway,
        ):
            for number in range(probes):
                credential = f"probe-{number}-{uuid.uuid4().hex[:6]}"
                revoked = datetime.now(UTC) - timedelta(seconds=1)
                idp.emit(
                    type="credential.revoked",
                    credential={"id": credential, "kind": "agent_token", "client_id": "c", "scopes": []},
                    revoked_at=revoked.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                )
                idp.flush()
                gateway.emit(
                    type="tool.invocation",
                    delegation={"sub": "alice", "act": {"sub": "probe-agent"}},
                    credential={"id": credential, "kind": "agent_token", "client_id": "c", "scopes": ["s"]},
                    tool={"name": "read", "server": "probe-mcp"},
                    decision={"result": "allow", "required_scope": "s"},
                    outcome="success",
                )
                gateway.flush()
                acked[credential] = time.time()
                time.sleep(1.0)
        deadline = time.time() + 60
        while len(receiver.arrivals) < len(acked) and time.time() < deadline:
            time.sleep(0.1)
        load.join(timeout=120)  # the load was sized to outlast the probes: let it finish before the server stops
        missing = set(acked) - set(receiver.arrivals)
        if missing:
            print(f"  {len(missing)} probes never alerted: {sorted(missing)[:3]}")
        return [receiver.arrivals[c] - acked[c] for c in acked if c in receiver.arrivals]
    finally:
        server.stop()
        receiver.server.shutdown()


def state_memory(events: int, agents: int) -> tuple[float, float, int]:
    """Feed the detector ``events`` synthetic events of ``agents`` agents; (MiB of Python objects it holds, MiB of
    its Arrow tables, rows kept)."""
    names = EVENT_SCHEMA.names
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    detector = Detector(
        LakeReader(
            Path("/nonexistent"),
            rows=pa.table(
                {n: pa.array([], EVENT_SCHEMA.field(n).type) for n in names}
                | {"tenant": pa.array([], pa.string()), "date": pa.array([], pa.date32())}
            ),
        )
    )
    started = datetime.now(UTC) - timedelta(days=30)
    batch_size = 20_000
    for start in range(0, events, batch_size):
        rows: list[dict[str, Any]] = []
        for index in range(start, min(events, start + batch_size)):
            agent = f"agent-{index % agents}"
            rows.append(
                {
                    "event_id": str(uuid.UUID(int=index)),
                    "type": "tool.invocation",
                    "occurred_at": started + timedelta(milliseconds=index * 250),
                    "received_at": started + timedelta(milliseconds=index * 250),
                    "log_index": index,
                    "emitter": f"gw-{index % 50}",
                    "seq": index // 50 + 1,
                    "tenant": f"t{index % 3}",
                    "user": f"user-{index % 500}@t.example",
                    "agent": agent,
                    "delegation_chain": [f"user-{index % 500}@t.example", agent],
                    "delegation_depth": 1,
                    "credential_id": f"tok-{agent}",
                    "credential_kind": "agent_token",
                    "credential_client_id": agent,
                    "credential_scopes": ["tickets:read"],
                    "tool_name": "read_ticket",
                    "tool_server": "helpdesk-mcp",
                    "resource_type": "ticket",
                    "resource_id": f"T-{index}",
                    "decision_result": "allow",
                    "decision_required_scope": "tickets:read",
                }
            )
        table = pa.Table.from_pylist(
            [{**{n: None for n in names}, **row, "date": row["occurred_at"].date()} for row in rows],
            schema=pa.schema([*EVENT_SCHEMA, pa.field("tenant", pa.string()), pa.field("date", pa.date32())]),
        )
        detector.observe(table)
        del rows, table
    gc.collect()
    python = (tracemalloc.get_traced_memory()[0] - base) / 2**20
    tracemalloc.stop()
    state = detector.state
    tables = [
        *state.revocations,
        *([state.denied] if state.denied is not None else []),
        *([state.table] if state.table is not None else []),
    ]
    arrow = sum(t.nbytes for t in tables) / 2**20
    return python, arrow, sum(t.num_rows for t in tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds each way (0: the state's memory only)")
    parser.add_argument("--emitters", type=int, default=16)
    parser.add_argument("--events", type=int, default=3000, help="per emitter, per throughput round")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--state-events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=10_000)
    args = parser.parse_args()
    print(machine())
    if args.rounds > 0:
        with tempfile.TemporaryDirectory(prefix="custody-detect-bench-") as tmp:
            measure_service(Path(tmp), args)
    python, arrow, rows = state_memory(args.state_events, args.agents)
    print(
        f"detector state after {args.state_events:,} events of {args.agents:,} agents: {rows:,} rows kept,"
        f" {arrow:.1f} MiB of Arrow, {python:.1f} MiB of Python objects"
    )


def measure_service(root: Path, args: argparse.Namespace) -> None:
    on: list[float] = []
    off: list[float] = []
    for _ in range(args.rounds):
        off.append(throughput(root, False, args.emitters, args.events))
        on.append(throughput(root, True, args.emitters, args.events))
    print(f"ingest, detection off: {', '.join(f'{r:,.0f}' for r in off)} events/s")
    print(f"ingest, detection on:  {', '.join(f'{r:,.0f}' for r in on)} events/s")
    print(f"  on / off (medians): {statistics.median(on) / statistics.median(off):.0%}")
    half = statistics.median(on) / 2
    waits = sorted(latency(root, half, args.probes))
    if waits:
        p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
        print(
            f"ack -> webhook alert at {half:,.0f} events/s (half the maximum with detection), {len(waits)} probes:"
            f" p50 {statistics.median(waits):.2f} s, p99 {p99:.2f} s, max {waits[-1]:.2f} s"
        )


if __name__ == "__main__":
    main()
