"""The task-tree index gives the same delegation paths as scanning the whole lake, and follows the lake as it
changes: new files, compaction, a file rewritten in place."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from query.index import tree_index
from query.index.tree_index import TreeIndex
from query.lake import LakeReader
from query.paths import DelegationPath, delegation_path
from store.lake import Lake
from store.schema import EVENT_SCHEMA
from tests import scenario
from tests.conftest import Harness, read_lake


def shape(path: DelegationPath) -> tuple[Any, ...]:
    return (
        path.event["event_id"],
        [e["event_id"] for e in path.ancestors],
        [e["event_id"] for e in path.descendants],
        path.approval["event_id"] if path.approval else None,
        sorted((n.id, n.kind, n.label) for n in path.nodes),
        sorted((e.source, e.target, e.kind, e.event_id) for e in path.edges),
        path.truncated,
    )


@pytest.mark.slow
def test_paths_through_the_index_equal_paths_over_the_whole_lake(org: dict[str, Any]) -> None:
    reader = LakeReader(org["data"])
    index = TreeIndex(reader)
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:  # what the dashboard's path page shows while the index is built
        while not done.is_set():
            seen.append(index.progress)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    index.refresh()
    done.set()
    watcher.join()
    assert not index.building
    files = len(reader.files())
    assert any(0 < done <= total == files for done, total in seen), seen[-5:]  # progress while it read the files
    injection = next(i for i in org["key"]["incidents"] if i["name"] == "prompt_injection")
    ids = [row[0] for row in read_lake(org["data"], "event_id")]
    chosen = [injection["malicious_event"], injection["refund_events"][0], injection["export_events"][0]]
    chosen += random.Random(5).sample(ids, 25)
    total = len(ids)
    for event_id in chosen:
        narrowed = index.reader_for(event_id)
        with narrowed.connect() as connection:
            rows = connection.execute("SELECT count(*) FROM all_events").fetchall()[0][0]
        assert 0 < rows < total / 100  # the rows of one task tree, not the lake
        assert shape(delegation_path(narrowed, event_id)) == shape(delegation_path(reader, event_id)), event_id
    tree = delegation_path(index.reader_for(injection["malicious_event"]), injection["malicious_event"])
    assert set(injection["refund_events"]) <= {e["event_id"] for e in tree.descendants}
    assert index.locate("not-an-event-id") is None
    assert index.locate("00000000-0000-4000-8000-000000000000") is None
    assert index.reader_for("00000000-0000-4000-8000-000000000000") is reader  # unknown: the whole lake decides
    index.close()


def indexed_scenario(harness: Harness) -> tuple[Any, LakeReader, TreeIndex, str]:
    """The hand-built scenario in the lake, a reader, a task-tree index over it, and the export event's id."""
    built = scenario.build(harness)
    harness.flush()
    reader = LakeReader(harness.data_dir)
    return built, reader, TreeIndex(reader), built.id("export")


def test_the_index_follows_new_files_compaction_and_rewrites(harness: Harness) -> None:
    built, reader, index, export = indexed_scenario(harness)
    before = shape(delegation_path(index.reader_for(export), export))
    assert before == shape(delegation_path(reader, export))

    child = harness.emitter("gw-late")  # a new emitter, a new file: a late descendant of the export
    child.emit(**scenario.invocation(built, "late-child", 30, ["alice@acme.example", "support-agent"],
               scenario.credential("tok-late", "agent_token", "support-agent", ["tickets:read"]), "read_ticket",
               "helpdesk-mcp", "tickets:read", ("ticket", "T-77", "acme"), parent="export"))  # fmt: skip
    child.flush()
    harness.flush()
    after = delegation_path(index.reader_for(export), export)
    assert built.id("late-child") in {e["event_id"] for e in after.descendants}
    assert shape(after) == shape(delegation_path(reader, export))

    Lake(harness.data_dir / "lake").compact(min_files=2)  # files replaced by wider ones
    assert shape(delegation_path(index.reader_for(export), export)) == shape(delegation_path(reader, export))

    target = next(p for p in reader.files() if any(r["event_id"] == built.id("late-child")
                                                    for r in pq.read_table(p).to_pylist()))  # fmt: skip
    rows = [r for r in pq.read_table(target).to_pylist() if r["event_id"] != built.id("late-child")]
    pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), target)  # rewritten in place, one row fewer
    rewritten = delegation_path(index.reader_for(export), export)
    assert built.id("late-child") not in {e["event_id"] for e in rewritten.descendants}
    assert shape(rewritten) == shape(delegation_path(reader, export))
    index.close()


def test_the_dashboard_keeps_one_index_per_data_dir(tmp_path: Path) -> None:
    from dashboard.data import tree_index

    assert tree_index(str(tmp_path)) is tree_index(str(tmp_path))


def test_row_copies_that_no_longer_match_the_lake_are_never_used(harness: Harness) -> None:
    _, reader, index, export = indexed_scenario(harness)
    expected = shape(delegation_path(reader, export))
    assert shape(delegation_path(index.reader_for(export), export)) == expected
    copies = sorted((harness.data_dir / "index" / "rows").glob("*.parquet"))
    assert len(copies) == len(reader.files())  # one row copy per lake file, beside the lake

    for copy in copies:  # rows shuffled in every copy: each row read is checked against the index's hashes
        table = pq.read_table(copy)
        pq.write_table(table.take(list(reversed(range(table.num_rows)))), copy)
    assert shape(delegation_path(index.reader_for(export), export)) == expected

    for copy in (harness.data_dir / "index" / "rows").glob("*.parquet"):  # copies deleted: read again
        copy.unlink()
    assert shape(delegation_path(index.reader_for(export), export)) == expected

    Lake(harness.data_dir / "lake").compact(min_files=2)
    assert shape(delegation_path(index.reader_for(export), export)) == expected
    left = {p.name for p in (harness.data_dir / "index" / "rows").glob("*.parquet")}
    live = {index.copies.name(p, p.stat().st_size, p.stat().st_mtime_ns).name for p in reader.files()}
    assert left
    assert left <= live  # no copy of a compacted-away file is left behind
    index.close()


@pytest.mark.slow
def test_files_read_in_small_batches_give_the_same_index_and_row_copies(
    org: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lake file is read, and its row copy written, a batch of rows at a time (a compacted file can hold
    millions of events): in batches of 25 rows, every event's task tree is located in the same files and rows,
    and each row copy holds its file's rows in order."""
    built = {}
    for read_rows in (None, 25):
        data = tmp_path / f"batches-{read_rows}"
        shutil.copytree(org["data"] / "lake", data / "lake")
        if read_rows is not None:
            monkeypatch.setattr(tree_index, "_READ_ROWS", read_rows)
        index = TreeIndex(LakeReader(data))
        index.refresh()
        ids = [row[0] for row in read_lake(data, "event_id")]
        located = {
            event_id: {path.relative_to(data): rows for path, rows in (index.locate(event_id) or {}).items()}
            for event_id in ids[::7]
        }
        copies = {path.name: pq.read_table(path) for path in sorted((data / "index" / "rows").glob("*.parquet"))}
        built[read_rows] = (located, copies, index)
    (located, copies, _), (located_small, copies_small, _) = built[None], built[25]
    assert located == located_small
    assert sum(len(rows) for found in located.values() for rows in found.values()) > 1000
    assert copies.keys() == copies_small.keys()
    assert len(copies) > 10
    assert all(copies_small[name].equals(copies[name]) for name in copies)
    largest = max(copies_small.values(), key=lambda table: table.num_rows)
    assert largest.num_rows > 4 * 25, "no file needed more than a few batches"
    for _, _, index in built.values():
        index.close()
