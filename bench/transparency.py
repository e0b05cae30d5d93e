"""Transparency-log benchmark: on the forensics benchmark's lake (10M events by default, each with a log index),
time what the log costs and answers. Prints the machine and every figure.

    .venv/bin/python bench/transparency.py [--events 10000000] [--keep DIR]

- the tree and its tiles rebuilt from the lake (what a server does when its tiles are lost);
- inclusion and consistency proofs from the tiles on disk, each from a cold reader (p50, p99, max);
- `custody verify`'s log check: the tree rebuilt from the lake's columns and compared with a checkpoint;
- the same run's verification of hashes and chains, for comparison.

Checkpoint latency after an ack and ingest with the log are measured by bench/ingest.py.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bench.common import machine
from bench.forensics import build_lake
from query.verify.log import verify_log
from store.ground.layout import DataDir
from store.ground.tlog import LogError, verify_consistency, verify_inclusion
from store.merkle_log import LogReader, MerkleLog


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--emitters", type=int, default=200)
    parser.add_argument("--proofs", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="generate into this data dir and keep it (reused if present)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="custody-transparency-"))
    build_lake(data_dir, args.events, args.emitters, 3)
    layout = DataDir(data_dir)
    if not layout.server_key_file.exists():
        layout.state.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        layout.server_key_file.write_bytes(pem)
    layout.log.mkdir(exist_ok=True)

    from store.engine import Store

    store = Store(data_dir, writer_process=False)
    started = time.perf_counter()
    merkle = MerkleLog(layout)
    merkle.recover(store._leaves_from, print)  # the rebuild a server runs when its tiles are lost
    elapsed = time.perf_counter() - started
    size = merkle.size
    print(f"tree and tiles rebuilt from the lake: {size:,} leaves in {elapsed:.1f} s ({size / elapsed:,.0f} leaves/s)")
    merkle.sign_with(layout.server_key())
    started = time.perf_counter()
    checkpoint = merkle.publish()
    assert checkpoint is not None
    print(
        f"checkpoint signed and written in {(time.perf_counter() - started) * 1000:.1f} ms (size {checkpoint.size:,})"
    )

    rng = random.Random(1)
    inclusion, consistency = [], []
    for _ in range(args.proofs):
        index = rng.randrange(size)
        reader = LogReader(layout)  # cold: no tile cached
        began = time.perf_counter()
        proof = reader.inclusion(index, size)
        inclusion.append(time.perf_counter() - began)
        leaf = reader.hash_at(0, index)
        verify_inclusion(leaf, index, size, proof, checkpoint.root)
        old = rng.randrange(1, size)
        reader = LogReader(layout)
        began = time.perf_counter()
        proof = reader.consistency(old, size)
        consistency.append(time.perf_counter() - began)
        verify_consistency(old, size, proof, reader.root(old), checkpoint.root)
    print(f"inclusion proofs at {size:,} leaves, cold reader: {percentiles(inclusion)} ({args.proofs} proofs)")
    print(f"consistency proofs to {size:,} leaves, cold reader: {percentiles(consistency)} ({args.proofs} proofs)")

    started = time.perf_counter()
    checked = verify_log(data_dir)
    elapsed = time.perf_counter() - started
    if checked.problems:
        raise LogError(f"the log check found problems: {checked.problems[:3]}")
    print(
        f"custody verify's log check: {checked.tree_size:,} leaves rebuilt and compared with checkpoint"
        f" {checked.checkpoint.size if checked.checkpoint else None:,} in {elapsed:.1f} s"
        f" ({checked.tree_size / elapsed:,.0f} events/s)"
    )


if __name__ == "__main__":
    main()
