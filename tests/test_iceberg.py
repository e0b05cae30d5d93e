"""The lake as an Apache Iceberg table: pyiceberg (Apache's reader, not Custody code) reads the same events the
query library reads, per tenant; a sync is exactly-once by log index; new events arrive as a new snapshot."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.compute as pc
import pytest
from custody_sdk import Emitter, generate_key, public_jwk
from pyiceberg.catalog.sql import SqlCatalog

from query.iceberg import LOG_INDEX_MAX, IcebergMirror
from query.lake import LakeReader
from tests.conftest import ADMIN, ServerProcess, copy_data_dir, invocation, open_harness


def test_an_independent_iceberg_reader_agrees_with_the_lake(org: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    copy_data_dir(org["data"], data)
    mirror = IcebergMirror(data)
    first = mirror.sync()
    assert first.appended > 0
    assert mirror.sync().appended == 0  # exactly once: a second sync has nothing to add
    # A reader that knows nothing of Custody: the catalog and the table, by name.
    home = data / "iceberg"
    catalog = SqlCatalog("custody", uri=f"sqlite:///{home / 'catalog.db'}", warehouse=(home / "warehouse").as_uri())
    table = catalog.load_table("custody.events").scan().to_arrow()
    with LakeReader(data).connect() as connection:
        lake = dict(connection.execute("SELECT tenant, count(*) FROM all_events GROUP BY 1").fetchall())
        [(denied,)] = connection.execute("SELECT count(*) FROM events WHERE decision_result = 'deny'").fetchall()
    iceberg = {
        row["tenant"]: row["count"]
        for row in table.group_by("tenant")
        .aggregate([("event_id", "count")])
        .rename_columns(["tenant", "count"])
        .to_pylist()
    }
    assert iceberg == lake
    assert pc.sum(pc.equal(table["decision_result"], "deny")).as_py() == denied
    assert len(set(table["event_id"].to_pylist())) == table.num_rows  # no event twice
    snapshot = catalog.load_table("custody.events").current_snapshot()
    assert snapshot is not None
    assert int(snapshot.summary.additional_properties[LOG_INDEX_MAX]) == first.log_index_max
    assert first.log_index_max == table.num_rows - 1


def test_new_events_arrive_as_a_new_snapshot_and_old_snapshots_expire(tmp_path: Path) -> None:
    with open_harness(tmp_path / "data") as harness:
        emitter = harness.emitter("gw-1")
        for _ in range(5):
            emitter.emit(**invocation())
        emitter.flush()
        harness.flush()
        mirror = IcebergMirror(tmp_path / "data")
        assert mirror.sync().appended == 5 + harness_admin_events(mirror)
        for _ in range(3):
            emitter.emit(**invocation())
        emitter.flush()
        harness.flush()
        second = mirror.sync()
        assert second.appended == 3
        assert second.snapshots == 1
        table = mirror.table()
        assert table is not None
        assert len(table.snapshots()) == 2
        assert mirror.expire(datetime.now(UTC) + timedelta(seconds=1)) == 1  # all but the current one
        assert mirror.table().scan().to_arrow().num_rows == second.log_index_max + 1  # type: ignore[union-attr]


def harness_admin_events(mirror: IcebergMirror) -> int:
    """The server's own events (its key, the registrations) are in the lake and the table too."""
    table = mirror.table()
    assert table is not None
    rows = table.scan().to_arrow()
    return int(pc.sum(pc.equal(rows["tenant"], "_system")).as_py())


@pytest.mark.slow
def test_custody_serve_keeps_the_table_after_every_flush(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", "--iceberg").start()
    key, kid = generate_key(), "gw-1-k1"
    httpx.put(
        f"{server.url}/v1/emitters/gw-1",
        json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, kid)]},
        headers=ADMIN,
    ).raise_for_status()
    with Emitter(server.url, "gw-1", "acme", key, kid, spool=tmp_path / "spool") as emitter:
        for _ in range(20):
            emitter.emit(**invocation())
        emitter.flush()
    mirror = IcebergMirror(tmp_path / "data")
    deadline = time.monotonic() + 60
    while (table := mirror.table()) is None or table.scan(row_filter="tenant == 'acme'").to_arrow().num_rows < 20:
        assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.2)
    server.stop()


def test_compaction_rewrites_small_files_as_one_per_partition_and_keeps_every_event(tmp_path: Path) -> None:
    with open_harness(tmp_path / "data") as harness:
        emitter = harness.emitter("gw-1")
        mirror = IcebergMirror(tmp_path / "data")
        for _ in range(4):  # four flushes, four syncs: four data files in acme's partition
            for _ in range(3):
                emitter.emit(**invocation())
            emitter.flush()
            harness.flush()
            mirror.sync()
        table = mirror.table()
        assert table is not None
        before = table.scan().to_arrow().sort_by("log_index")
        newest = mirror.log_index_max()
        files = table.inspect.files().to_pylist()
        acme = [row for row in files if row["partition"]["tenant"] == "acme"]
        assert len(acme) == 4
        compacted = mirror.compact(min_files=2)
        assert compacted.partitions >= 1
        table = mirror.table()
        assert table is not None
        after = [row for row in table.inspect.files().to_pylist() if row["partition"]["tenant"] == "acme"]
        assert len(after) == 1
        assert table.scan().to_arrow().sort_by("log_index").equals(before)  # the same events, each once
        assert mirror.log_index_max() == newest  # the next sync appends after the same log index
        assert mirror.sync().appended == 0


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_keeps_the_table_with_its_catalog_in_postgresql(tmp_path: Path, postgres: Any) -> None:
    """Two nodes with --iceberg: the leader keeps the table; its catalog is a SQL catalog in the cluster's own
    PostgreSQL, which an Iceberg reader that knows nothing of Custody opens by name."""
    state = postgres.database()
    shared = tmp_path / "shared"
    extra = ("--state", state, "--iceberg", "--verify-workers", "0", "--no-detect")
    nodes = [ServerProcess(shared, tmp_path / f"node{number}.log", *extra).start() for number in range(2)]
    try:
        for number, server in enumerate(nodes):  # registered through the first node, emitting to each
            key, name = generate_key(), f"gw-ice-{number}"
            response = httpx.put(
                f"{nodes[0].url}/v1/emitters/{name}",
                json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, f"{name}-k1")]},
                headers=ADMIN,
            )
            assert response.status_code == 200, response.text
            with Emitter(server.url, name, "acme", key, f"{name}-k1", spool=tmp_path / name) as emitter:
                for _ in range(10):
                    emitter.emit(**invocation())
                emitter.flush()
        catalog = SqlCatalog("custody", uri="postgresql+psycopg://" + state.split("://", 1)[1])
        deadline = time.monotonic() + 60
        rows = 0
        while time.monotonic() < deadline:
            try:
                table = catalog.load_table("custody.events").scan().to_arrow()
            except Exception:  # not created yet
                time.sleep(0.5)
                continue
            rows = int(pc.sum(pc.starts_with(table["emitter"], "gw-ice-")).as_py() or 0)
            if rows == 20:
                break
            time.sleep(0.5)
        assert rows == 20
    finally:
        for server in nodes:
            server.stop()
    with LakeReader(shared).connect() as connection:
        [(in_lake,)] = connection.execute("SELECT count(*) FROM all_events").fetchall()
    try:
        assert catalog.load_table("custody.events").scan().to_arrow().num_rows == in_lake
    finally:
        catalog.engine.dispose()  # its PostgreSQL connections closed now, not by the garbage collector


def test_syncs_running_at_once_add_each_event_once(tmp_path: Path) -> None:
    """Two writers (another node's sync, `custody iceberg sync` beside `serve --iceberg`) syncing at the same
    moment: one commits, the other's commit fails and it starts over; no event is appended twice."""
    import threading

    with open_harness(tmp_path / "data") as harness:
        emitter = harness.emitter("gw-1")
        mirrors = [IcebergMirror(tmp_path / "data"), IcebergMirror(tmp_path / "data")]
        for _ in range(4):
            for _ in range(7):
                emitter.emit(**invocation())
            emitter.flush()
            harness.flush()
            start = threading.Barrier(2)

            def sync(mirror: IcebergMirror, start: threading.Barrier = start) -> None:
                start.wait()
                mirror.sync()

            threads = [threading.Thread(target=sync, args=(mirror,)) for mirror in mirrors]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        table = mirrors[0].table()
        assert table is not None
        rows = table.scan().to_arrow()
        with LakeReader(tmp_path / "data").connect() as connection:
            [(in_lake,)] = connection.execute("SELECT count(*) FROM all_events").fetchall()
        assert rows.num_rows == in_lake
        assert len(set(rows["event_id"].to_pylist())) == rows.num_rows
        assert table.properties["commit.retry.num-retries"] == "0"
