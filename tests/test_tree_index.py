"""The task-tree index gives the same delegation paths as scanning the whole lake, and follows the lake as it
changes: new files, compaction, a file rewritten in place."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from query.lake import LakeReader
from query.paths import DelegationPath, delegation_path
from query.tree_index import TreeIndex
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


def test_paths_through_the_index_equal_paths_over_the_whole_lake(org: dict[str, Any]) -> None:
    reader = LakeReader(org["data"])
    index = TreeIndex(reader)
    injection = next(i for i in org["key"]["incidents"] if i["name"] == "prompt_injection")
    ids = [row[0] for row in read_lake(org["data"], "event_id")]
    chosen = [injection["malicious_event"], injection["refund_events"][0], injection["export_events"][0]]
    chosen += random.Random(5).sample(ids, 25)
    for event_id in chosen:
        narrowed = index.reader_for(event_id)
        assert len(narrowed.files()) < len(reader.files())
        assert shape(delegation_path(narrowed, event_id)) == shape(delegation_path(reader, event_id)), event_id
    tree = delegation_path(index.reader_for(injection["malicious_event"]), injection["malicious_event"])
    assert set(injection["refund_events"]) <= {e["event_id"] for e in tree.descendants}
    assert index.files_for("not-an-event-id") is None
    assert index.files_for("00000000-0000-4000-8000-000000000000") is None
    index.close()


def test_the_index_follows_new_files_compaction_and_rewrites(harness: Harness) -> None:
    built = scenario.build(harness)
    harness.flush()
    reader = LakeReader(harness.data_dir)
    index = TreeIndex(reader)
    export = built.id("export")
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
