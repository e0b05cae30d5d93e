"""Memory and CPU of one lake compaction: ``--files`` files of ``--events`` events each, in one partition, merged
into one sorted file the way the lake writer's tiered compaction merges them (``Lake._merge``).

The inputs are built from a few thousand signed events of the ingest benchmark's shape, copied with new seqs
(the merge does not verify signatures, and a row's size is what matters), and written as the lake writer writes
them. The merge runs in a fresh process, whose high-water RSS (``VmHWM``; ``ru_maxrss`` would count the
parent's RSS at the fork) is the merge's own.

    .venv/bin/python bench/compaction.py [--files 16] [--events 64000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine
from bench.ingest import presign
from store.ground.jws import decode_payload
from store.lake import Lake
from store.schema import Signed, event_table

PARTITION = Path("events") / "tenant=t0" / "date=2026-11-30"

_MERGE = """
import sys, time
from pathlib import Path
from store.lake import Lake
lake, partition = Lake(Path(sys.argv[1])), Path(sys.argv[1]) / sys.argv[2]
paths = sorted(partition.iterdir())
started, cpu = time.perf_counter(), time.process_time()
lake._merge(partition, paths, "compact-L2")
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(time.perf_counter() - started, time.process_time() - cpu, status["VmHWM"].split()[0])
"""


def build(lake_root: Path, files: int, events: int) -> tuple[int, int]:
    """``files`` sorted lake files of ``events`` rows each; returns (bytes on disk, bytes decoded)."""
    chains = presign(4, 1000)
    tokens = [token for _, (_, signed) in chains.items() for token in signed]
    base = event_table([Signed(decode_payload(t), t, "k1", "ab" * 32, 1_800_000_000_000_000) for t in tokens])
    lake = Lake(lake_root)
    partition = lake_root / PARTITION
    copies = -(-events // base.num_rows)
    decoded = 0
    for index in range(files):
        parts = []
        for copy in range(copies):
            offset = pa.scalar((index * copies + copy) * 10_000, pa.int64())
            parts.append(base.set_column(base.schema.get_field_index("seq"), "seq", pc.add(base["seq"], offset)))
        table = pa.concat_tables(parts).slice(0, events).sort_by([("emitter", "ascending"), ("seq", "ascending")])
        decoded += table.nbytes
        segments = f"{index * 16 + 1:012d}-{index * 16 + 16:012d}"
        lake._write_atomic(partition, partition / f"compact-L1-{segments}.parquet", [table])
    return sum(path.stat().st_size for path in partition.iterdir()), decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16, help="input files (the tiered compaction merges 16)")
    parser.add_argument("--events", type=int, default=64_000, help="events per input file")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="custody-compaction-", dir=args.dir) as tmp:
        root = Path(tmp) / "lake"
        started = time.perf_counter()
        on_disk, decoded = build(root, args.files, args.events)
        total = args.files * args.events
        print(
            f"inputs: {args.files} files x {args.events:,} events = {total:,} events, {on_disk / 2**20:,.0f} MiB on"
            f" disk, {decoded / 2**20:,.0f} MiB decoded (built in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        result = subprocess.run(
            [sys.executable, "-c", _MERGE, str(root), str(PARTITION)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        wall, cpu, peak_kib = (float(value) for value in result.stdout.split())
        [merged] = (root / PARTITION).iterdir()
        metadata = pq.ParquetFile(merged).metadata
        print(
            f"merge: {wall:.1f} s ({cpu:.1f} s CPU, {total / cpu:,.0f} events/s), peak RSS {peak_kib / 1024:,.0f} MiB"
            f" (VmHWM of the merging process, imports included); output {metadata.num_rows:,} rows in"
            f" {metadata.num_row_groups} row groups, {merged.stat().st_size / 2**20:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
