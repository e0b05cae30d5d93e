"""Compaction merges small Parquet files without readers ever seeing an event twice or missing one."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from query.lake import LakeReader
from query.search import EventFilter, search
from query.verify.chains import verify_chains
from query.verify.integrity import verify_lake
from store.lake import Lake, merge_sorted, signed_events
from store.lake_files import live_files, segment_range
from store.schema import EVENT_SCHEMA, event_table
from store.wal import WalRecord
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
    assert lake.write_segment(first_segment, make_records(3)).written == 0
    assert not list(compacted.parent.glob("seg-*.parquet"))


def _range(paths) -> str:
    numbers = sorted(int(path.stem.split("-")[1]) for path in paths)
    return f"{numbers[0]:012d}-{numbers[-1]:012d}"


def test_tiered_compaction_bounds_files_per_partition_and_keeps_every_event(tmp_path) -> None:
    from tests.signing import chain as signed_chain
    from tests.test_wal_and_lake import KEY

    lake = Lake(tmp_path / "lake")
    tokens, bodies = signed_chain("gw-1", 70, KEY, "k1")
    from store.ground.canonical import canonicalize, event_hash
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


def _sorted_table(rows: list[WalRecord]) -> pa.Table:
    return event_table(sorted(signed_events(rows), key=lambda event: (event.payload["emitter"], event.payload["seq"])))


def test_a_merge_interleaves_its_inputs_in_order_a_batch_at_a_time(tmp_path) -> None:
    """Five files that each hold every fifth event of three emitters, merged 64 rows of each at a time into
    small row groups: the output is exactly the sorted union. A sixth input stored in reverse order loses
    nothing (its rows all appear once)."""
    everything = [record for emitter in ("gw-a", "gw-b", "gw-c") for record in make_records(400, emitter)]
    paths = []
    for index in range(5):
        paths.append(tmp_path / f"in-{index}.parquet")
        pq.write_table(_sorted_table([r for r in everything if r.seq % 5 == index]), paths[-1])
    expected = _sorted_table(everything)

    row_groups = list(merge_sorted(paths, buffer_bytes=5 * 64 * 1024, row_group_bytes=256 * 1024))

    assert len(row_groups) >= 4, "too few row groups to show the streaming"
    merged = pa.concat_tables(row_groups)
    assert merged.equals(expected)

    extra = make_records(30, "gw-d")
    pq.write_table(_sorted_table(extra)[::-1], tmp_path / "reversed.parquet")
    merged = pa.concat_tables(merge_sorted([*paths, tmp_path / "reversed.parquet"], buffer_bytes=64 * 1024))
    assert sorted(merged.column("event_id").to_pylist()) == sorted(r.event_id for r in everything + extra)


def test_a_merge_reads_an_input_of_another_schema_in_the_lakes(tmp_path) -> None:
    """An input written elsewhere (``custody compact`` of an imported lake) that lacks a column and stores another
    as a wider type is merged in the lake's schema: the missing column null, the other cast, as reading it with
    the lake's schema gives."""
    ours = _sorted_table(make_records(30, "gw-a"))
    theirs = _sorted_table(make_records(30, "gw-b"))
    theirs = theirs.drop_columns(["attrs"]).set_column(
        theirs.schema.get_field_index("delegation_depth"),
        "delegation_depth",
        theirs["delegation_depth"].cast(pa.int64()),
    )
    pq.write_table(ours, tmp_path / "ours.parquet")
    pq.write_table(theirs, tmp_path / "theirs.parquet")
    assert not pq.read_schema(tmp_path / "theirs.parquet").equals(EVENT_SCHEMA)

    merged = pa.concat_tables(merge_sorted([tmp_path / "ours.parquet", tmp_path / "theirs.parquet"]))

    expected = pa.concat_tables([ours, pq.read_table(tmp_path / "theirs.parquet", schema=EVENT_SCHEMA)]).sort_by(
        [("emitter", "ascending"), ("seq", "ascending")]
    )
    assert merged.schema.equals(EVENT_SCHEMA)
    assert merged.equals(expected)


_BOUNDED_MERGE = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
from store.lake import Lake, merge_sorted
from store.schema import EVENT_SCHEMA

root, rows = Path(sys.argv[1]), int(sys.argv[2])
lake = Lake(root / "lake")
partition = lake.events_dir / "tenant=acme" / "date=2026-11-29"
files = 16
for index in range(files):
    seqs = [index + files * row for row in range(rows)]
    columns = {field.name: pa.nulls(rows, field.type) for field in EVENT_SCHEMA}
    columns["emitter"] = pa.array(["gw-1"] * rows)
    columns["seq"] = pa.array(seqs, pa.int64())
    columns["jws"] = pa.array([f"{seq:08d}" + "x" * 4000 for seq in seqs])  # 4 KB each, all different
    table = pa.Table.from_pydict(columns, schema=EVENT_SCHEMA)
    lake._write_atomic(partition, partition / f"seg-{index + 1:012d}.parquet", [table])
    del table, columns
before = pa.default_memory_pool().max_memory()
paths = sorted(partition.iterdir())
final = partition / f"compact-L1-{1:012d}-{files:012d}.parquet"
lake._write_atomic(partition, final, merge_sorted(paths, buffer_bytes=4 << 20, row_group_bytes=4 << 20))
merged = pq.read_table(final, columns=["seq"]).column("seq").to_pylist()
assert merged == list(range(files * rows)), "not the sorted union"
print(files * rows * 4008, before, pa.default_memory_pool().max_memory())
"""


def _merge_in_a_process(root: Path, rows: int) -> tuple[int, int, int]:
    """(bytes of strings merged, Arrow's peak before the merge, Arrow's peak) for 16 files of ``rows`` events."""
    result = subprocess.run(
        [sys.executable, "-c", _BOUNDED_MERGE, str(root), str(rows)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    total, before, peak = map(int, result.stdout.split())
    return total, before, peak


@pytest.mark.slow
def test_a_merge_holds_as_much_in_memory_for_a_large_input_as_for_a_small_one(tmp_path) -> None:
    """16 files of 4 KB events, merged with 4 MiB of input buffers and 4 MiB row groups: Arrow's memory peaks
    at about the same for 2 MB and for 16 MB of each file, and far below what the files hold. Read whole (as
    compaction did), a merge of 16 files of 64,000 events peaked at 4.5 GB of RSS."""
    small_total, _, small_peak = _merge_in_a_process(tmp_path / "small", 500)
    total, before, peak = _merge_in_a_process(tmp_path / "large", 4000)
    assert before < peak, "writing the inputs peaked higher than the merge: nothing measured"
    assert peak < small_peak * 1.5, f"{peak >> 20} MiB for {total >> 20} MB, {small_peak >> 20} for {small_total >> 20}"
    assert peak < total / 3, f"the merge peaked at {peak >> 20} MiB of Arrow memory for {total >> 20} MB of input"
