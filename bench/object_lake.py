"""The lake on S3-compatible object storage vs on local disk: the forensic questions on both, the same lake.

Generates the forensics benchmark's lake (bench/forensics.py) on disk, uploads it to an S3-compatible server
(moto's server mode, in its own process on 127.0.0.1), and points a second data dir at it (lake.json). Measured:
the upload, the first read of the S3-homed data dir (its copy filled from the objects: a reader's cold start),
and each forensic question on disk and on S3 (warm: each query lists the objects first, at most once a second).

    .venv/bin/python bench/object_lake.py [--events 10000000] [--emitters 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, machine
from bench.forensics import START, build_lake, timed
from query.blast import forward_taint, identity_blast_radius
from query.findings import findings
from query.lake import LakeReader
from query.paths import delegation_path
from store.object_lake import ObjectStore, configure
from tests.s3_kit import S3Server


def questions(reader: LakeReader) -> dict[str, float]:
    probe = f"{7:08x}-0000-4{0x123 >> 4 & 0xFFF:03x}-8{0x123 & 0xF:03x}-{0x123:012x}"
    since = START + timedelta(days=29)
    return {
        "delegation path of one event": timed("delegation path", lambda: delegation_path(reader, probe)),
        "identity blast radius of an agent": timed(
            "blast radius", lambda: identity_blast_radius(reader, "agent", "agent-3")
        ),
        "forward taint of a credential (last day)": timed(
            "forward taint", lambda: forward_taint(reader, "credential", "tok-agent-3-1", since)
        ),
        "denied calls by agent (one SQL)": timed("denied by agent", lambda: _denied(reader)),
        "all findings": timed("all findings", lambda: findings(reader), repeat=1),
    }


def _denied(reader: LakeReader) -> object:
    with reader.connect() as connection:
        return connection.execute(
            "SELECT agent, count(*) FROM events WHERE decision_result = 'deny' GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--emitters", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="generate the disk lake into this data dir and keep it")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="custody-object-lake-"))
    disk = args.keep or work / "disk"
    build_lake(disk, args.events, args.emitters, args.tenants)
    files = sorted((disk / "lake" / "events").glob("tenant=*/date=*/*.parquet"))
    size = sum(path.stat().st_size for path in files)
    print(f"lake: {args.events:,} events, {len(files):,} files, {size / 2**30:.2f} GiB")
    s3 = S3Server(free_port(), work / "moto.log").start()
    try:
        uri = s3.bucket()
        store = ObjectStore(uri)
        started = time.perf_counter()
        for path in files:
            store.put(path, str(path.relative_to(disk / "lake")))
        upload = time.perf_counter() - started
        print(f"upload: {upload:,.1f} s ({size / 2**20 / upload:,.0f} MiB/s)")
        remote = work / "s3-homed"
        configure(remote, uri)
        started = time.perf_counter()
        LakeReader(remote).files()
        cold = time.perf_counter() - started
        print(
            f"first read of the S3-homed data dir (its copy filled): {cold:,.1f} s ({size / 2**20 / cold:,.0f} MiB/s)"
        )
        started = time.perf_counter()
        store.refresh(remote / "lake", force=True)
        listed = (time.perf_counter() - started) * 1000
        print(f"one refresh with nothing new (a LIST of {len(files):,} objects): {listed:,.0f} ms")
        print("on disk:")
        on_disk = questions(LakeReader(disk))
        print("on S3 (warm copy):")
        on_s3 = questions(LakeReader(remote))
    finally:
        s3.stop()
    print("| question | disk (median) | S3, warm copy (median) | ratio |")
    print("|---|---|---|---|")
    for name, seconds in on_disk.items():
        print(f"| {name} | {seconds * 1000:,.0f} ms | {on_s3[name] * 1000:,.0f} ms | {on_s3[name] / seconds:.2f} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "s3-homed", ignore_errors=True)


if __name__ == "__main__":
    main()
