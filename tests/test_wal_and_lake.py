"""The write-ahead log and the lake writer on their own: torn tails, corruption, idempotent flushes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.sdk import generate_key
from store.ground.errors import StorageUnavailable
from store.lake import Lake, PacedFile, signed_events
from store.schema import event_table
from store.wal import WalRecord, WriteAheadLog
from tests import conftest
from tests.signing import chain, hash_of

KEY = generate_key()


def records(count: int, emitter: str = "gw-1") -> list[WalRecord]:
    tokens, bodies = chain(emitter, count, KEY, "k1")
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    return [
        WalRecord(body["event_id"], emitter, body["seq"], hash_of(body), now_us, "k1", token)
        for token, body in zip(tokens, bodies, strict=True)
    ]


def numbered(batch: list[WalRecord], first: int) -> list[WalRecord]:
    return [replace(record, log_index=first + n) for n, record in enumerate(batch)]


def test_append_read_rotate_remove(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, next_log_index=7)
    batch = records(5)
    assert wal.append(batch[:3]) == (1, 7)
    assert wal.append(batch[3:]) == (1, 10)
    assert wal.rotate() == 1
    assert wal.rotate() is None  # nothing new: no empty segments
    assert wal.append(batch[:1]) == (2, 12)
    assert wal.read_segment(1) == numbered(batch, 7)
    assert wal.segments() == [1, 2]
    wal.remove(1)
    assert wal.segments() == [2]
    wal.close()


def test_segment_numbers_continue_after_the_highest_flushed(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, first_segment=42)
    assert wal.append(records(1)) == (42, 0)
    wal.close()
    assert WriteAheadLog(tmp_path, first_segment=10).active_segment == 43


def test_a_torn_tail_is_cut_and_the_whole_records_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wal = WriteAheadLog(tmp_path)
    batch = records(4)
    wal.append(batch)
    wal.close()
    path = tmp_path / "000000000001.wal"
    data = path.read_bytes()
    path.write_bytes(data + batch[0].encode()[:-7])  # a write that died half way
    with caplog.at_level(logging.WARNING):
        assert WriteAheadLog(tmp_path).read_segment(1, repair=True) == numbered(batch, 0)
    assert "torn record" in caplog.text
    assert path.read_bytes() == data


def test_a_corrupt_record_in_the_middle_is_quarantined(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wal = WriteAheadLog(tmp_path)
    batch = records(4)
    wal.append(batch)
    wal.close()
    path = tmp_path / "000000000001.wal"
    data = bytearray(path.read_bytes())
    second = len(batch[0].encode(0))
    data[second + 20] ^= 0xFF  # flip a byte inside record 2
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        kept = WriteAheadLog(tmp_path).read_segment(1, repair=True)
    assert kept == numbered(batch[:1], 0)
    assert (tmp_path / "quarantine" / "000000000001.wal").read_bytes() == bytes(data)
    assert f"bad record at offset {second}" in caplog.text


def test_append_to_an_unwritable_directory_raises_storage_unavailable(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    (tmp_path / "wal").rmdir()
    (tmp_path / "wal").write_text("not a directory")
    with pytest.raises(StorageUnavailable, match="cannot open write-ahead log segment"):
        wal.append(records(1))


def test_lake_segment_write_is_idempotent_and_partitioned(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    batch = records(3) + records(2, emitter="gw-2")
    assert lake.write_segment(7, batch).written == 5
    assert lake.write_segment(7, batch).written == 0  # a crash after the rename, before the WAL delete
    files = lake.files()
    today = datetime.now(UTC).date().isoformat()
    assert [path.relative_to(lake.events_dir).as_posix() for path in files] == [
        f"tenant=acme/date={today}/seg-000000000007.parquet"
    ]
    table = pq.read_table(files[0])
    assert table.column("emitter").to_pylist() == ["gw-1"] * 3 + ["gw-2"] * 2
    assert "tenant" not in table.column_names  # partition keys live in the path
    assert lake.highest_segment() == 7


def test_unfinished_parquet_files_are_invisible_and_removed(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    partition = lake.events_dir / "tenant=acme" / "date=2026-11-29"
    partition.mkdir(parents=True)
    (partition / ".seg-000000000001.parquet.4711.tmp").write_bytes(b"PAR1 half written")
    (partition / ".compact-L1-000000000001-000000000016.parquet.4711.tmp").write_bytes(b"PAR1 half merged")
    assert lake.files() == []
    assert lake.remove_temporary_files() == 2
    assert not list(partition.iterdir())


def test_paced_file_writes_what_pyarrow_writes_and_syncs_every_n_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced_at: list[int] = []
    original = os.fdatasync

    def counted_fdatasync(fd: int) -> None:
        synced_at.append(os.fstat(fd).st_size)
        original(fd)

    monkeypatch.setattr(os, "fdatasync", counted_fdatasync)
    table = event_table(list(signed_events(records(400))))
    with PacedFile(tmp_path / "paced.parquet", sync_every=16 * 1024) as sink:
        pq.write_table(table, sink, compression="zstd", row_group_size=128 * 1024)
    pq.write_table(table, tmp_path / "plain.parquet", compression="zstd", row_group_size=128 * 1024)

    size = (tmp_path / "paced.parquet").stat().st_size
    assert (tmp_path / "paced.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    assert size > 4 * 16 * 1024, "the table is too small to show the pacing"
    assert len(synced_at) >= 2, "no pacing: one sync at the end only"
    gaps = [later - earlier for earlier, later in zip([0, *synced_at], synced_at, strict=False)]
    assert min(gaps) >= 16 * 1024, f"synced before 16 KiB were written: {gaps}"


def test_a_lake_write_that_fails_midway_leaves_no_file_behind(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    partition = lake.events_dir / "tenant=acme" / "date=2026-11-29"

    def row_groups() -> Iterator[pa.Table]:  # a compaction whose input fails after a row group was written
        yield event_table(list(signed_events(records(3))))
        raise OSError("input file unreadable")

    with pytest.raises(OSError, match="unreadable"):
        lake._write_atomic(partition, partition / "seg-000000000001.parquet", row_groups())
    assert list(partition.iterdir()) == []


def _slow_fsync(monkeypatch: pytest.MonkeyPatch, fail_once_after: int | None = None) -> list[int]:
    """The group commit's os.fdatasync made slow (so that writers pile up behind it) and counted; optionally
    failing once."""
    import os as real_os
    import time

    calls: list[int] = []
    original = real_os.fdatasync

    def fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.005)
        if fail_once_after is not None and len(calls) == fail_once_after:
            raise OSError(5, "Input/output error")
        original(fd)

    monkeypatch.setattr("store.wal.os.fdatasync", fsync)
    return calls


def test_group_commit_acknowledges_every_write_with_fewer_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    wal = WriteAheadLog(tmp_path)
    warm = records(1, "warm")
    wal.append(warm)  # the segment's own creation fsyncs are not what is counted
    calls = _slow_fsync(monkeypatch)
    batches = [records(3, f"gw-{n}") for n in range(40)]
    with ThreadPoolExecutor(8) as pool:
        appended = list(pool.map(wal.append, batches))
    assert {segment for segment, _ in appended} == {1}
    assert len(calls) < len(batches)  # writers that arrive during an fsync share the next one
    stored = wal.read_segment(1)
    assert sorted(r.event_id for r in stored) == sorted(r.event_id for b in [warm, *batches] for r in b)
    assert [r.log_index for r in stored] == list(range(1 + 3 * len(batches)))  # in file order, no hole
    assert sorted(first for _, first in appended) == list(range(1, 1 + 3 * len(batches), 3))


def test_a_failed_group_fsync_fails_exactly_the_writes_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    wal = WriteAheadLog(tmp_path)
    wal.append(records(1, "warm"))
    _slow_fsync(monkeypatch, fail_once_after=3)
    batches = [records(2, f"gw-{n}") for n in range(30)]

    def attempt(batch: list[WalRecord]) -> bool:
        try:
            wal.append(batch)
        except StorageUnavailable:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        acknowledged = list(pool.map(attempt, batches))
    assert not all(acknowledged)
    assert any(acknowledged)
    wal.rotate()
    on_disk = {r.event_id for segment in wal.segments() for r in wal.read_segment(segment)}
    for batch, ok in zip(batches, acknowledged, strict=True):
        ids = {r.event_id for r in batch}
        # acknowledged: on disk; failed: never read back (nothing unacknowledged resurfaces in the lake)
        assert (ids <= on_disk) if ok else not (ids & on_disk), (ok, sorted(ids))
    # the cut writes gave their log indexes back: what is on disk is numbered without a hole
    indexes = sorted(r.log_index or 0 for segment in wal.segments() for r in wal.read_segment(segment))
    assert indexes == list(range(len(indexes)))


def test_rotate_creates_the_next_segment_ahead_and_close_does_not(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    batch = records(4)
    wal.append(batch[:2])
    assert wal.rotate() == 1
    assert wal.path(2).exists(), "the next segment is created by rotate, not by the next request"
    assert wal.read_segment(2) == []
    assert wal.append(batch[2:3]) == (2, 2)
    assert wal.read_segment(2) == numbered(batch[2:3], 2)
    wal.close()
    assert wal.segments() == [1, 2], "close leaves no empty segment behind"
    reopened = WriteAheadLog(tmp_path, next_log_index=3)
    assert reopened.append(batch[3:]) == (3, 3)
    reopened.close()


def test_the_lake_writer_yields_to_acks_unless_the_lake_is_far_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lake writer runs under SCHED_IDLE; once the flush lag reaches ``catch_up_after`` (30 s in the server),
    a new writer at normal priority takes over (no process leaves SCHED_IDLE without CAP_SYS_NICE), and once the
    lake has caught up, that writer runs under SCHED_IDLE too."""
    from store.engine import Store
    from tests.test_server_process import helpers_named

    # A spawned process re-runs the parent's __main__; after the dashboard's AppTests that is dashboard/app.py.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    store = Store(tmp_path / "data", flush_interval=3600, catch_up_after=3600.0)
    store.open(lambda _: None)
    batch = records(9)
    try:
        store.start_flusher()
        policies, writers = [], []
        for catch_up_after, events in ((3600.0, batch[:3]), (0.0, batch[3:6]), (3600.0, batch[6:])):
            store.catch_up_after = catch_up_after  # 0: any lag counts as far behind
            store.append(events)
            assert store.flush() == 3
            [writer] = helpers_named(os.getpid(), "custody-lake")
            policies.append(os.sched_getscheduler(writer))
            writers.append(writer)
        assert policies == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_IDLE]
        assert writers[0] != writers[1] == writers[2]
    finally:
        store.close()
    assert len(Lake(tmp_path / "data" / "lake").files()) == 3


def test_a_lake_writer_killed_while_idle_is_replaced_at_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.engine import Store
    from tests.test_server_process import helpers_named

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    store = Store(tmp_path / "data", flush_interval=3600)
    store.open(lambda _: None)
    try:
        store.start_flusher()
        [writer] = helpers_named(os.getpid(), "custody-lake")
        os.kill(writer, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{writer}").exists() and Path(f"/proc/{writer}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)  # dead (a zombie until the pool reaps it): the pool is broken now or soon
        store.append(records(3))
        assert store.flush() == 3  # was: BrokenProcessPool for every flush until the lag reached 30 s
        assert store.flush_stats.last_error is None
        [replacement] = helpers_named(os.getpid(), "custody-lake")
        assert replacement != writer
    finally:
        store.close()
    assert len(Lake(tmp_path / "data" / "lake").files()) == 1


_STARVED_WRITER = """
import json, logging, os, signal, sys, threading, time
from pathlib import Path

import duckdb

def may_leave_sched_idle():
    answer = []
    def probe():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            answer.append(True)
        except PermissionError:
            answer.append(False)
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return answer[0]

from store.engine import Store
from store.lake import Lake
from tests.test_server_process import helpers_named
from tests.test_wal_and_lake import records

logging.basicConfig(level=logging.INFO)
data = Path(sys.argv[1])
store = Store(data, flush_interval=3600, catch_up_after=2.0)
store.open(lambda _: None)
store.start_flusher()
[idle] = helpers_named(os.getpid(), "custody-lake")
report = {"privileged": may_leave_sched_idle(), "idle_policy": os.sched_getscheduler(idle)}
os.kill(idle, signal.SIGSTOP)  # starved: no CPU at all, as under a load that keeps every core busy
store.flush_interval = 0.5  # the flusher thread sleeps out its hour; this paces the WAL's rotations meanwhile
batch = records(10)
store.append(batch[:5])
started = time.monotonic()
flushing = threading.Thread(target=lambda: report.update(written=store.flush()))
flushing.start()
time.sleep(0.7)
store.append(batch[5:8])  # comes in while the write waits: closed into a segment of its own meanwhile
flushing.join()
report["seconds"] = time.monotonic() - started
report["lake_files"] = len(Lake(data / "lake").files())
[writer] = helpers_named(os.getpid(), "custody-lake")
report["replaced"] = writer != idle
report["catch_up_policy"] = os.sched_getscheduler(writer)
store.catch_up_after = 3600.0
store.append(batch[8:])
report["written_after"] = store.flush()
report["after_policy"] = os.sched_getscheduler(writer)
report["same_writer_after"] = helpers_named(os.getpid(), "custody-lake") == [writer]
store.close()
report["lake_rows"] = duckdb.sql(f"select count(*) from read_parquet('{Lake(data / 'lake').glob}')").fetchall()[0][0]
report["temporary_files"] = len(list((data / "lake" / "events").glob("**/.*.tmp")))
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_starved_lake_writer_is_replaced_mid_write_without_privileges(tmp_path: Path) -> None:
    """The flusher does not wait for a write that gets no CPU: once the lag reaches the limit, it kills the idle
    writer and a writer at normal priority writes the segment again. Run without CAP_SYS_NICE (as a deployed
    server is), where no process can leave SCHED_IDLE: the replacement needs no privilege."""
    command = [sys.executable, "-c", _STARVED_WRITER, str(tmp_path / "data")]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-sys_nice", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=conftest.REPO, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert "Traceback" not in done.stderr, done.stderr  # a flush that raised in its thread leaves only this
    assert report["privileged"] is False, "the test must run where SCHED_IDLE cannot be left"
    assert report["idle_policy"] == os.SCHED_IDLE
    # the 3 events that came in while the write waited were in a segment closed meanwhile, written by the same flush
    assert report["written"] == 8
    assert report["lake_files"] == 2
    assert 2.0 <= report["seconds"] < 60, report  # it waited for the 2 s limit, not for the stopped writer
    assert report["replaced"]
    assert report["catch_up_policy"] == os.SCHED_OTHER
    assert "a lake writer at normal priority takes over" in done.stderr
    assert report["written_after"] == 2
    assert report["after_policy"] == os.SCHED_IDLE
    assert report["same_writer_after"]
    assert "the lake writer yields to acknowledgements again" in done.stderr
    assert report["lake_rows"] == 10
    assert report["temporary_files"] == 0
