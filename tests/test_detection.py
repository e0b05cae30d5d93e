"""Incremental detection against the on-demand queries: the demo organisation replayed batch by batch through the
detector gives every finding the whole-lake query gives, with the same evidence."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from query.detect.engine import INCREMENTAL_KINDS, Detector
from query.detect.loop import DetectionLoop
from query.detect.records import STATUSES
from query.findings import findings
from query.lake import LakeReader


def replay(data: Any, batch_size: int, restart_at: int | None = None) -> dict[tuple[str, str, str], set[str]]:
    """Every finding the detector reports, feeding it the lake in log order, ``batch_size`` events at a time; with
    ``restart_at``, a new detector takes over at that event, its state rebuilt from the lake before it."""
    reader = LakeReader(data)
    with reader.connect() as connection:
        lake = connection.sql("SELECT * FROM all_events ORDER BY log_index").to_arrow_table()
    detector = Detector(reader)
    found: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for start in range(0, lake.num_rows, batch_size):
        batch = lake.slice(start, batch_size)
        if restart_at is not None and start >= restart_at:
            cursor = lake["log_index"][start - 1].as_py()
            detector = Detector(LakeReader(data, rows=lake.slice(0, start)))
            detector.warm(cursor)
            restart_at = None
        # the lookups of history see the lake as it was when the batch arrived
        upto = pc.max(batch["log_index"]).as_py()
        detector.lake = LakeReader(data, rows=lake.filter(pc.less_equal(lake["log_index"], upto)))
        for finding in detector.observe(batch):
            found[(finding.kind, finding.tenant, finding.subject)].update(finding.evidence)
    return found


@pytest.mark.parametrize("batch_size", [97, 1000])
def test_incremental_detection_gives_what_the_whole_lake_query_gives(org: dict[str, Any], batch_size: int) -> None:
    expected = {
        (f.kind, f.tenant, f.subject): set(f.evidence)
        for f in findings(LakeReader(org["data"]), kinds=INCREMENTAL_KINDS)
    }
    assert {kind for kind, _, _ in expected} >= {"action_after_revocation", "borrowed_session", "shared_credential"}
    assert replay(org["data"], batch_size) == expected


def test_a_restarted_detector_rebuilds_its_state_from_the_lake(org: dict[str, Any]) -> None:
    expected = {
        (f.kind, f.tenant, f.subject): set(f.evidence)
        for f in findings(LakeReader(org["data"]), kinds=INCREMENTAL_KINDS)
    }
    with LakeReader(org["data"]).connect() as connection:
        [(total,)] = connection.execute("SELECT count(*) FROM all_events").fetchall()
    assert replay(org["data"], 500, restart_at=(total // 1000) * 500) == expected


def test_the_detection_loop_records_every_kind_as_the_on_demand_query_finds_it(
    org: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(org["data"], data)
    loop = DetectionLoop(data)
    try:
        assert loop.run_once() > 0  # every event through the incremental path, as if it had just arrived
        loop.run_periodic(force=True)
        records = loop.store.queue(tenant=None, statuses=STATUSES, limit=10_000)
        recorded = {(r.kind, r.tenant, r.subject): set(loop.store.evidence(r.id, limit=100_000)) for r in records}
        assert loop.run_once() == 0  # nothing new: nothing read again
    finally:
        loop.stop()
    expected = {(f.kind, f.tenant, f.subject): set(f.evidence) for f in findings(LakeReader(data))}
    assert "over_privileged" in {kind for kind, _, _ in expected}
    assert recorded == expected


def test_a_findings_store_new_on_a_lake_with_events_records_them_without_alerting(
    org: dict[str, Any], tmp_path: Path
) -> None:
    from query.detect.alerts import AlertChannels, ChannelConfig

    data = tmp_path / "data"
    shutil.copytree(org["data"], data)
    (tmp_path / "secret").write_text("s")
    hook = ChannelConfig(name="hook", type="webhook", url="http://127.0.0.1:9/x", secret_file=tmp_path / "secret",
                         min_severity="low")  # fmt: skip
    loop = DetectionLoop(data, channels=AlertChannels("http://d", (hook,)))
    try:
        loop.catch_up()
        assert loop.run_once() == 0  # the whole lake is history now
        assert loop.store.queue(tenant=None)  # its findings are recorded ...
        assert loop.store.pending_alerts() == 0  # ... and nobody is paged for events from before detection
    finally:
        loop.stop()
