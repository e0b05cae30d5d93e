"""Incremental detection against the on-demand queries: the demo organisation replayed batch by batch through the
detector gives every finding the whole-lake query gives, with the same evidence."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from query.detect.engine import INCREMENTAL_KINDS, Detector
from query.detect.loop import DetectionLoop, findings_store_path
from query.detect.records import STATUSES, recorded_findings
from query.findings import MAX_EVIDENCE, findings
from query.lake import LakeReader
from tests import scenario
from tests.conftest import Harness, copy_data_dir


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
    copy_data_dir(org["data"], data)
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
    copy_data_dir(org["data"], data)
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


def whole_log(found: Any) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    """What the Findings page shows of each finding over the whole log."""
    return {
        (f.kind, f.tenant, f.subject): (f.severity, f.title, f.evidence_total, f.first_seen, f.last_seen) for f in found
    }


@pytest.mark.parametrize("path", ["incremental", "catch-up"])
def test_the_recorded_whole_log_findings_are_the_whole_lake_querys(
    org: dict[str, Any], tmp_path: Path, path: str
) -> None:
    """The dashboard reads whole-log findings from the store: each finding once (its records merged), every
    evidence id counted, each tenant's own; whether detection saw the events arrive or met them on a new store."""
    data = tmp_path / "data"
    copy_data_dir(org["data"], data)
    loop = DetectionLoop(data)
    try:
        if path == "catch-up":
            loop.catch_up()
        else:
            loop.run_once()
        loop.run_periodic(force=True)
    finally:
        loop.stop()
    on_demand = findings(LakeReader(data), evidence_limit=None)
    recorded = recorded_findings(findings_store_path(data), None)
    assert recorded is not None
    examined, found = recorded
    with LakeReader(data).connect() as connection:
        [(newest,)] = connection.execute("SELECT max(log_index) FROM all_events").fetchall()
    assert examined == newest
    assert whole_log(item.finding for item in found) == whole_log(on_demand)
    assert [item.finding.kind for item in found] == [f.kind for f in on_demand]  # the same order: most severe first
    for item in found:
        assert item.status == "open"
        assert item.agents is not None
    acme = recorded_findings(findings_store_path(data), "acme")
    assert acme is not None
    assert acme[1]
    assert whole_log(item.finding for item in acme[1]) == whole_log(f for f in on_demand if f.tenant == "acme")


def test_evidence_past_the_listing_limit_is_counted_exactly_across_batches(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of 1,300 denied calls, met by the detector 250 events at a time with its denied history kept
    between batches: the store counts 1,300 evidence events, not the 1,000 a listing shows nor the kept rows
    twice."""
    import query.detect.loop

    s = scenario.Scenario()
    intern = scenario.credential("tok-intern", "agent_token", "intern-agent", ["tickets:read"])
    gateway = harness.emitter("gw-help", "acme")
    for index in range(1300):
        gateway.emit(**scenario.invocation(
            s, f"denied-{index}", index / 1000, ["carl@acme.example", "intern-agent"], intern, "update_ticket",
            "helpdesk-mcp", "tickets:write", ("ticket", "T-1", "acme"), result="deny",
        ))  # fmt: skip
        if index % 50 == 49:  # the harness's server takes 50 events a request
            gateway.flush()
    gateway.flush()
    harness.flush()
    [expected] = findings(LakeReader(harness.data_dir), kinds=("denied_burst",))
    assert expected.evidence_total == 1300
    assert len(expected.evidence) == MAX_EVIDENCE
    monkeypatch.setattr(query.detect.loop, "BATCH", 250)
    loop = DetectionLoop(harness.data_dir)
    try:
        assert loop.run_once() >= 1300
        assert loop.stats.batches >= 6
    finally:
        loop.stop()
    recorded = recorded_findings(findings_store_path(harness.data_dir), "acme")
    assert recorded is not None
    [burst] = [item for item in recorded[1] if item.finding.kind == "denied_burst"]
    assert burst.finding.evidence_total == 1300
    assert burst.finding.evidence_truncated
    assert len(burst.finding.evidence) == MAX_EVIDENCE
    assert set(burst.finding.evidence) <= {s.id(f"denied-{index}") for index in range(1300)}
    assert burst.agents == ["intern-agent"]
