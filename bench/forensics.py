"""Forensics benchmark: generate a large lake straight to Parquet (valid hashes and chains), then time the
queries analysts run during an incident. Prints the machine, the lake's size and every figure.

    .venv/bin/python bench/forensics.py [--events 10000000] [--emitters 200] [--keep DIR]

The JWS signatures in the generated lake are placeholders (signing 10M events would take longer than the
benchmark), so it measures hash + chain verification, not signature verification.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine
from query.blast import forward_taint, identity_blast_radius
from query.findings import findings
from query.index.reach_copies import ReachCopies
from query.index.tree_index import TreeIndex
from query.lake import LakeReader
from query.paths import delegation_path
from query.verify.chains import verify_chains
from store.lake import Lake
from store.schema import Signed, event_table

HEADER = "eyJhbGciOiJFZERTQSIsImtpZCI6ImJlbmNoIn0"  # {"alg":"EdDSA","kid":"bench"}
TOOLS = [(f"tool_{i}", f"mcp-{i % 6}", f"scope:{i % 25}") for i in range(40)]
START = datetime(2026, 10, 1, tzinfo=UTC)


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def generate_emitters(job: tuple[Path, list[int], int, int]) -> int:
    """Write the chains of some emitters; every 5th call is the child of the previous one (task trees)."""
    root, emitters, per_emitter, tenants = job
    rng = random.Random(emitters[0])
    written = 0
    for emitter_index in emitters:
        emitter, tenant = f"gw-{emitter_index:04d}", f"t{emitter_index % tenants}"
        previous, parent = "0" * 64, None
        by_day: dict[str, list[Signed]] = {}
        for seq in range(1, per_emitter + 1):
            agent = f"agent-{rng.randrange(25)}"
            tool, server, scope = TOOLS[rng.randrange(40)]
            occurred = START + timedelta(seconds=seq * (30 * 86400 // per_emitter))
            event_id = (
                f"{emitter_index:08x}-{seq >> 16 & 0xFFFF:04x}-4{seq >> 4 & 0xFFF:03x}-8{seq & 0xF:03x}-{seq:012x}"
            )
            payload: dict[str, Any] = {
                "v": 1,
                "event_id": event_id,
                "type": "tool.invocation",
                "occurred_at": occurred.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "emitter": emitter,
                "tenant": tenant,
                "seq": seq,
                "prev_hash": previous,
                "delegation": {
                    "sub": f"user{rng.randrange(60)}@{tenant}.example",
                    "act": {"sub": agent, "act": {"sub": f"agent-{rng.randrange(25)}"}},
                },
                "credential": {
                    "id": f"tok-{agent}-{rng.randrange(3)}",
                    "kind": "agent_token",
                    "client_id": agent,
                    "scopes": [f"scope:{rng.randrange(25)}" for _ in range(4)],
                },
                "tool": {"name": tool, "server": server},
                "resource": {"type": "record", "id": f"r-{rng.randrange(100000)}", "tenant": tenant},
                "decision": {"result": "allow" if rng.random() < 0.9 else "deny", "required_scope": scope},
                "outcome": "success",
                "trace_id": f"trace-{emitter_index}-{seq // 20}",
            }
            if parent and seq % 5:
                payload["parent_event_id"] = parent
            parent = event_id
            canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
            previous = hashlib.sha256(canonical).hexdigest()
            jws = f"{HEADER}.{b64(canonical)}.AAAA"
            log_index = emitter_index * per_emitter + seq - 1  # unique and without a hole over the whole lake
            by_day.setdefault(payload["occurred_at"][:10], []).append(
                Signed(payload, jws, "bench", previous, int(occurred.timestamp() * 1e6), log_index)
            )
        for day, events in by_day.items():
            directory = root / f"tenant={tenant}" / f"date={day}"
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(event_table(events), directory / f"seg-{emitter_index:012d}.parquet", compression="zstd")
            written += len(events)
    return written


def build_lake(data_dir: Path, events: int, emitters: int, tenants: int) -> None:
    """Generate the benchmark lake into data_dir (kept as it is if it exists), compacted as a server keeps it."""
    events_dir = data_dir / "lake" / "events"
    if events_dir.exists():
        return
    started = time.perf_counter()
    jobs = [(events_dir, list(range(i, emitters, 8)), events // emitters, tenants) for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        total = sum(pool.map(generate_emitters, jobs))
    print(f"generated {total:,} events in {time.perf_counter() - started:,.0f} s")
    started = time.perf_counter()
    merged = Lake(data_dir / "lake").compact(min_files=2)  # what the server's tiered compaction keeps up
    print(f"compacted {merged:,} files in {time.perf_counter() - started:,.0f} s")


def timed_verify(data_dir: Path) -> tuple[int, int, float, float]:
    started = time.perf_counter()
    report = verify_chains(data_dir)
    elapsed = time.perf_counter() - started
    return report.events, len(report.problems), elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, function: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    best, median = min(times), statistics.median(times)
    print(f"  {label}: median {median * 1000:,.0f} ms, best {best * 1000:,.0f} ms ({repeat} runs)", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--emitters", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="generate into this data dir and keep it (reused if present)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="custody-forensics-"))
    events_dir = data_dir / "lake" / "events"
    per_emitter = args.events // args.emitters
    build_lake(data_dir, args.events, args.emitters, args.tenants)
    files = list(events_dir.glob("**/*.parquet"))
    size = sum(path.stat().st_size for path in files)
    print(f"lake: {per_emitter * args.emitters:,} events, {len(files):,} files, {size / 2**30:.2f} GiB")
    reader = LakeReader(data_dir)
    probe = f"{7:08x}-0000-4{0x123 >> 4 & 0xFFF:03x}-8{0x123 & 0xF:03x}-{0x123:012x}"
    print("queries:")
    timed("delegation path of one event (ancestors + descendants)", lambda: delegation_path(reader, probe))
    started = time.perf_counter()
    index = TreeIndex(reader)
    index.refresh()
    print(f"  task-tree index (read API, dashboard) built in {time.perf_counter() - started:,.1f} s")
    timed(
        "delegation path through the task-tree index",
        lambda: delegation_path(index.reader_for(probe), probe),
    )
    index.close()
    timed(
        "identity blast radius of an agent, from the lake (CLI without copies)",
        lambda: identity_blast_radius(reader, "agent", "agent-3"),
    )
    started = time.perf_counter()
    copies = ReachCopies(reader)
    copies.refresh()
    print(f"  reach copies (read API, dashboard) written in {time.perf_counter() - started:,.1f} s")
    reach = identity_blast_radius(reader, "agent", "agent-3", copies=copies)
    print(
        f"  agent-3: {reach.events:,} events, {reach.resources_total:,} resources ({len(reach.resources):,} listed),"
        f" {len(reach.tools_reachable)} tools reachable"
    )
    timed(
        "identity blast radius of an agent, through the reach copies",
        lambda: identity_blast_radius(reader, "agent", "agent-3", copies=copies),
    )
    timed(
        "identity blast radius of an agent, through the reach copies, every resource listed",
        lambda: identity_blast_radius(reader, "agent", "agent-3", copies=copies, resource_limit=None),
    )
    since = START + timedelta(days=29)
    timed(
        "forward taint of a credential (last day)", lambda: forward_taint(reader, "credential", "tok-agent-3-1", since)
    )
    timed("all findings", lambda: findings(reader), repeat=1)
    # In a fresh process, as `custody verify --hash-chain-only` runs (this one holds the caches and arenas of
    # every query above: 376k events/s here against 465k in a process of its own).
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        events, problems, elapsed, peak_verify = pool.apply(timed_verify, (data_dir,))
    print(
        f"  verify hash + chain (own process): {events:,} events in {elapsed:,.1f} s = {events / elapsed:,.0f}"
        f" events/s, {problems} problems, peak RSS {peak_verify:,.0f} MiB"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (this process): {peak:,.0f} MiB")
    if args.keep is None:
        shutil.rmtree(data_dir)


if __name__ == "__main__":
    main()
