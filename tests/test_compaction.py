"""Compaction merges small Parquet files without readers ever seeing an event twice or missing one."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq

from query.chains import verify_chains
from query.integrity import verify_lake
from query.lake import LakeReader
from query.search import EventFilter, search
from store.lake import Lake, live_files
from tests.conftest import Harness
from tests.signing import chain
from tests.test_wal_and_lake import records as make_records


def fill(harness: Harness, flushes: int = 4) -> None:
    key, kid = harness.register("gw-1")
    tokens, _ = chain("gw-1", flushes * 5, key, kid)
    for start in range(0, len(tokens), 5):
        harness.post(tokens[start : start + 5])
        harness.flush()


def count(harness: Harness) -> int:
    return search(LakeReader(harness.data_dir), EventFilter()).total


def test_compaction_merges_a_partition_and_everything_still_verifies(harness: Harness) -> None:
    fill(harness)
    lake = Lake(harness.data_dir / "lake")
    before = [path for path in lake.files() if "tenant=acme" in str(path)]
    assert len(before) == 4
    assert count(harness) == 20
    removed = lake.compact(min_files=2)
    after = [path for path in lake.files() if "tenant=acme" in str(path)]
    assert removed >= 4
    assert [path.name for path in after] == [f"compact-{_range(before)}.parquet"]
    assert pq.read_table(after[0]).column("seq").to_pylist() == list(range(1, 21))
    assert count(harness) == 20
    assert verify_lake(harness.data_dir).ok
    assert verify_chains(harness.data_dir).ok


def test_a_crash_between_the_merged_file_and_the_deletes_shows_no_duplicates(harness: Harness) -> None:
    fill(harness)
    lake = Lake(harness.data_dir / "lake")
    partition = next(path.parent for path in lake.files() if "tenant=acme" in str(path))
    small = sorted(partition.glob("seg-*.parquet"))
    saved = harness.data_dir.parent / "saved"
    saved.mkdir()
    for path in small:
        shutil.copy2(path, saved / path.name)
    lake.compact(min_files=2)
    for path in saved.iterdir():  # as if the process died before deleting them
        shutil.copy2(path, partition / path.name)
    assert len(list(partition.glob("*.parquet"))) == len(small) + 1
    assert len(live_files(partition.glob("*.parquet"))) == 1
    assert count(harness) == 20
    assert verify_lake(harness.data_dir).ok
    assert verify_chains(harness.data_dir).ok


def test_replaying_a_compacted_segment_writes_nothing(harness: Harness) -> None:
    fill(harness, flushes=2)
    lake = Lake(harness.data_dir / "lake")
    lake.compact(min_files=2)
    compacted = next(path for path in lake.files() if path.name.startswith("compact-"))
    first_segment = int(compacted.name.split("-")[1])
    # A replay of a compacted segment (its WAL file survived a crash) finds it already in the lake.
    assert lake.write_segment(first_segment, make_records(3)) == 0
    assert not list(compacted.parent.glob("seg-*.parquet"))


def _range(paths) -> str:
    numbers = sorted(int(path.stem.split("-")[1]) for path in paths)
    return f"{numbers[0]:012d}-{numbers[-1]:012d}"
