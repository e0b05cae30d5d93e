"""The lake's files as readers see them: names, partitions, which files are live, and how DuckDB must read them.

Kept apart from the lake writer (``store.lake``), so that a reader imports no write-ahead log or writer code.
A WAL segment becomes ``seg-<n>.parquet`` in each partition it touches; compactions merge them into
``compact-L<k>-<lo>-<hi>.parquet``, holding segments lo..hi.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from pathlib import Path

__all__ = ["HIVE_OPTIONS", "live_files", "partition_of_file", "segment_level", "segment_range"]

# The partition keys as DuckDB must read them: without types it guesses from the directory names, and a tenant
# named "0" or "007" would come back as the integer 0 or 7 (found by tests/test_lake_roundtrip.py).
HIVE_OPTIONS = "hive_partitioning = true, hive_types = {'tenant': VARCHAR, 'date': DATE}"

_SEGMENT_FILE = re.compile(r"^seg-(\d{12})\.parquet$")
_COMPACT_FILE = re.compile(r"^compact-(?:L(\d+)-)?(\d{12})-(\d{12})\.parquet$")


def segment_range(path: Path) -> tuple[int, int] | None:
    """The WAL segments a lake file holds: ``seg-N`` holds N, ``compact-LO-HI`` holds LO..HI."""
    if match := _SEGMENT_FILE.match(path.name):
        return int(match.group(1)), int(match.group(1))
    if match := _COMPACT_FILE.match(path.name):
        return int(match.group(2)), int(match.group(3))
    return None


def segment_level(path: Path) -> int:
    """0 for a segment file, k for ``compact-Lk-...``; a full compaction (no level) counts as the top."""
    if _SEGMENT_FILE.match(path.name):
        return 0
    match = _COMPACT_FILE.match(path.name)
    return int(match.group(1)) if match and match.group(1) else 99


def live_files(paths: Iterable[Path]) -> list[Path]:
    """The files a reader must read: a file whose segments a wider compacted file of the same partition holds is
    left out (it is about to be deleted), so readers never count an event twice during a compaction."""
    by_partition: dict[Path, list[tuple[Path, tuple[int, int]]]] = defaultdict(list)
    for path in paths:
        covered = segment_range(path)
        if covered is not None:
            by_partition[path.parent].append((path, covered))
    live = []
    for files in by_partition.values():
        for path, (low, high) in files:
            wider = any(
                other != path and other_low <= low and high <= other_high and (other_low, other_high) != (low, high)
                for other, (other_low, other_high) in files
            )
            if not wider:
                live.append(path)
    return sorted(live)


def partition_of_file(path: Path | str) -> tuple[str | None, date | None]:
    """The (tenant, date) partition of a lake file, from its ``tenant=<t>/date=<YYYY-MM-DD>`` directories."""
    values = dict(part.split("=", 1) for part in Path(path).parts if "=" in part)
    day = values.get("date")
    return values.get("tenant"), date.fromisoformat(day) if day else None
