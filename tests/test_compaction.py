"""Compaction merges small Parquet files without readers ever seeing an event twice or missing one."""

from __future__ import annotations

import itertools
import shutil

import duckdb
import pyarrow.parquet as pq

from query.chains import verify_chains
from query.integrity import verify_lake
from query.lake import LakeReader
from query.search import EventFilter, search
from store.lake import Lake, live_files, segment_range
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


def test_tiered_compaction_bounds_files_per_partition_and_keeps_every_event(tmp_path) -> None:
    from tests.signing import chain as signed_chain
    from tests.test_wal_and_lake import KEY

    lake = Lake(tmp_path / "lake")
    tokens, bodies = signed_chain("gw-1", 70, KEY, "k1")
    from store.canonical import canonicalize, event_hash
    from store.wal import WalRecord

    records = [
        WalRecord(b["event_id"], "gw-1", b["seq"], event_hash(canonicalize(b)), 0, "k1", t)
        for t, b in zip(tokens, bodies, strict=True)
    ]
    for segment, record in enumerate(records, 1):  # one event per segment: the worst case
        lake.write_segment(segment, [record])
        lake.compact_tiers(lake.touched, fanout=4)
    files = lake.files()
    levels = [path.name.split("-")[1] if path.name.startswith("compact-") else "L0" for path in files]
    assert all(levels.count(level) < 4 for level in set(levels)), levels
    assert len(files) <= 9
    seqs = sorted(seq for path in files for seq in pq.read_table(path).column("seq").to_pylist())
    assert seqs == list(range(1, 71))
    ranges = sorted(r for r in (segment_range(path) for path in files) if r)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges  # disjoint


def test_inputs_left_by_a_writer_killed_mid_compaction_are_removed(tmp_path) -> None:
    """A lake writer killed after a compaction's output appeared and before it deleted its inputs (the flusher
    kills a starved writer): readers skip the inputs at once, and the next compaction of the partition deletes
    them, so a plain DuckDB glob counts every event once again."""
    lake = Lake(tmp_path / "lake")
    records = make_records(5)
    for segment, record in enumerate(records[:4], 1):
        lake.write_segment(segment, [record])
    [partition] = {path.parent for path in lake.files()}
    inputs = {path: path.read_bytes() for path in lake.files()}
    merged = lake._merge(partition, sorted(inputs), "compact-L1")
    for path, data in inputs.items():  # the state the killed writer left: output and inputs side by side
        path.write_bytes(data)

    def plain_count() -> int:
        return int(duckdb.sql(f"select count(*) from read_parquet('{lake.glob}')").fetchall()[0][0])

    assert lake.files() == [merged]
    assert plain_count() == 8
    lake.write_segment(5, records[4:])
    assert lake.compact_tiers(lake.touched) == 0  # nothing to merge: 2 files at two levels
    assert sorted(path.name for path in partition.iterdir()) == [merged.name, "seg-000000000005.parquet"]
    assert plain_count() == 5
