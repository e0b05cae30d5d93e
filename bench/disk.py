"""WAL fdatasync latency beside the lake writer's file writes: the disk pattern of the ingest path, without the
server, so that how lake files are written can be compared on its own.

One thread does what the WAL does at 6,500 events/s of 20-event requests: a 26 KB append and an fdatasync every
4 ms, and times each. Beside it, a lake-like writer writes a 3 MB file every 0.7 s and, every 8 files, a 24 MB
compaction, each renamed into place, either in one go with an fsync at the end (``bulk``) or through
``store.lake.PacedFile`` (fdatasync every N KiB). Rounds of each mode are taken in turn, because this VM's disk
speed drifts.

    .venv/bin/python bench/disk.py [--appends 3000] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine
from store.lake import PacedFile
from store.wal import fsync_directory

APPEND = 26_000
FILE = 3 << 20
COMPACTION = 24 << 20


def write_file(path: Path, data: bytes, sync_every: int) -> None:
    if sync_every == 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with PacedFile(path, sync_every) as sink:
        for offset in range(0, len(data), 64 << 10):  # pyarrow hands over a page or a column chunk at a time
            sink.write(data[offset : offset + (64 << 10)])


def lake_writer(directory: Path, sync_every: int, stop: threading.Event) -> None:
    small, large = os.urandom(FILE), os.urandom(COMPACTION)
    number = 0
    while not stop.wait(0.7):
        write_file(directory / ".seg.tmp", small, sync_every)
        os.rename(directory / ".seg.tmp", directory / f"seg-{number}.parquet")
        fsync_directory(directory)
        number += 1
        if number % 8 == 0:
            write_file(directory / ".compact.tmp", large, sync_every)
            os.rename(directory / ".compact.tmp", directory / f"compact-{number}.parquet")
            for old in range(number - 8, number):
                (directory / f"seg-{old}.parquet").unlink()
            fsync_directory(directory)


def wal_appends(directory: Path, appends: int, sync_every: int) -> list[float]:
    lake = directory / "lake"
    lake.mkdir()
    stop = threading.Event()
    writer = threading.Thread(target=lake_writer, args=(lake, sync_every, stop), daemon=True)
    writer.start()
    record = os.urandom(APPEND)
    fd = os.open(directory / "1.wal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    latencies = []
    try:
        for _ in range(appends):
            started = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.004)
    finally:
        stop.set()
        writer.join()
        os.close(fd)
    return latencies


def quantiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000

    return f"p50 {at(0.5):5.2f}  p99 {at(0.99):5.2f}  p99.9 {at(0.999):6.2f}  max {ordered[-1] * 1000:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--appends", type=int, default=3000, help="WAL appends per round (4 ms apart)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    print(machine())
    modes = [
        ("bulk, fsync at the end", 0),
        ("paced, 256 KiB", 256 << 10),
        ("paced, 512 KiB", 512 << 10),
        ("paced, 1 MiB", 1 << 20),
    ]
    for round_number in range(1, args.rounds + 1):
        for name, sync_every in modes:
            with tempfile.TemporaryDirectory(prefix="custody-disk-", dir=args.dir) as tmp:
                latencies = wal_appends(Path(tmp), args.appends, sync_every)
            print(f"round {round_number}  {name:24s} WAL fdatasync {quantiles(latencies)}", flush=True)


if __name__ == "__main__":
    main()
