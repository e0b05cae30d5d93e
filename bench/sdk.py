"""custody-sdk benchmark: events signed and durably spooled per second (no server: the sender is off), with one
thread and with several emitting at once (they share fdatasyncs), the spool's p50/p99 emit latency, and events per
CPU-second of the process (the rate one core sustains when the disk's fdatasync latency is not the limit).

    .venv/bin/python bench/sdk.py [--events 4000] [--threads 1 4 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custody_sdk import Emitter, generate_key

from bench.common import machine

FIELDS = {
    "type": "tool.invocation",
    "delegation": {"sub": "alice@acme.example", "act": {"sub": "triage-agent"}},
    "credential": {"id": "tok-1", "kind": "agent_token", "client_id": "triage-agent", "scopes": ["tickets:read"]},
    "tool": {"name": "read_ticket", "server": "helpdesk-mcp"},
    "resource": {"type": "ticket", "id": "T-1", "tenant": "acme"},
    "decision": {"result": "allow", "required_scope": "tickets:read", "policy": "p1"},
    "outcome": "success",
}


def run(threads: int, events: int) -> tuple[float, float, list[float]]:
    """Events/s (wall clock), events per CPU-second of the process (the per-core rate), emit latencies."""
    with tempfile.TemporaryDirectory(prefix="custody-sdk-bench-") as tmp:
        emitter = Emitter("http://127.0.0.1:9", "gw-1", "acme", generate_key(), "gw-1-k1", spool=Path(tmp), send=False)
        emitter._head = (0, "0" * 64)  # no server to ask for the head
        latencies: list[float] = []
        per_thread = events // threads

        def work() -> None:
            for _ in range(per_thread):
                began = time.perf_counter()
                emitter.emit(**FIELDS)
                latencies.append(time.perf_counter() - began)

        started, cpu_started = time.perf_counter(), time.process_time()
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        emitter.close()
    return per_thread * threads / elapsed, per_thread * threads / cpu, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 4, 16])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for threads in args.threads:
        rate, per_cpu_second, latencies = run(threads, args.events)
        ordered = sorted(latencies)
        p99 = ordered[int(len(ordered) * 0.99)]
        print(
            f"{threads} emitting threads: {rate:,.0f} events/s signed and spooled (fdatasync'd),"
            f" {per_cpu_second:,.0f} per CPU-second;"
            f" emit p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
