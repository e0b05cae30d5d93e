"""The event index written behind the ack path: what lookups see, what SQLite has, and what a failure keeps."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from store.engine import Store
from store.ground.errors import StorageUnavailable
from store.indexer import IndexWriter
from store.state import IndexEntry, StateDB
from store.wal import WalRecord
from tests.test_wal_and_lake import records


def entries(count: int, emitter: str = "gw-1") -> list[IndexEntry]:
    return [IndexEntry(r.event_id, r.emitter, r.seq, r.event_hash) for r in records(count, emitter)]


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def read_only(state: StateDB, on: bool) -> None:
    """A real SQLite write failure: 'attempt to write a readonly database' while on."""
    state._conn.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


def test_entries_are_found_at_once_and_reach_sqlite_behind(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.sqlite")
    index = IndexWriter(state)
    batch = entries(5)
    index.add(batch)  # not started: nothing writes SQLite yet
    assert state.find_event_ids([e.event_id for e in batch]) == {}
    assert index.find_event_ids([batch[0].event_id, "00000000-0000-4000-8000-000000000000"]) == {
        batch[0].event_id: batch[0]
    }
    assert index.hashes_at("gw-1", [2, 3, 99]) == {2: batch[1].event_hash, 3: batch[2].event_hash}
    index.start()
    wait_for(lambda: index.pending == 0)
    assert state.find_event_ids([e.event_id for e in batch]) == {e.event_id: e for e in batch}
    assert state.heads()["gw-1"].seq == 5
    assert index.hashes_at("gw-1", [5]) == {5: batch[4].event_hash}
    index.stop()


def test_a_failing_sqlite_keeps_entries_visible_and_retries(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.sqlite")
    index = IndexWriter(state, retry_after=0.05)
    index.start()
    read_only(state, True)
    batch = entries(3)
    index.add(batch)
    wait_for(lambda: index.last_error is not None)
    assert "readonly" in (index.last_error or "")
    assert index.pending == 3
    assert index.find_event_ids([batch[1].event_id]) == {batch[1].event_id: batch[1]}
    with pytest.raises(Exception, match="readonly"):
        index.drain()
    read_only(state, False)
    wait_for(lambda: index.pending == 0)
    assert index.last_error is None
    assert set(state.find_event_ids([e.event_id for e in batch])) == {e.event_id for e in batch}
    index.stop()


def test_drain_waits_for_appends_that_began_before_it(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.sqlite")
    index = IndexWriter(state)
    batch = entries(2)
    ticket = index.begin()
    drained = threading.Event()

    def drain() -> None:
        index.drain()
        drained.set()

    draining = threading.Thread(target=drain)
    draining.start()
    assert not drained.wait(0.2), "drain returned while an append that began before it was still open"
    index.add(batch)
    index.end(ticket)
    draining.join(timeout=10)
    assert drained.is_set()
    assert set(state.find_event_ids([e.event_id for e in batch])) == {e.event_id for e in batch}


def test_a_failing_index_keeps_wal_segments_until_sqlite_has_their_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", writer_process=False)
    store.open()
    batch = records(4)
    store.append(batch[:2])
    read_only(store.state, True)
    store.append(batch[2:])  # acknowledged: the WAL has it; SQLite does not
    with pytest.raises(StorageUnavailable, match="cannot write the event index, the WAL keeps every segment"):
        store.flush()
    assert store.wal.segments(), "a segment left the disk before its entries were indexed"
    assert store.lake.files() == []
    assert store.flush_stats.last_error is not None
    assert "event index" in store.flush_stats.last_error
    assert set(store.find_event_ids([r.event_id for r in batch])) == {r.event_id for r in batch}
    read_only(store.state, False)
    assert store.flush() == 4
    assert store.wal.segments() == [store.wal.active_segment]  # only the next one, created ahead and empty
    assert store.state.heads()["gw-1"].seq == 4
    store.close()


def crash(store: Store) -> None:
    """What kill -9 leaves: nothing flushed or drained, every file descriptor closed."""
    store.state._conn.close()
    store.wal.close()
    assert store._lock_fd is not None
    os.close(store._lock_fd)


def crash_with_entries_pending(data: Path) -> list[WalRecord]:
    """Append 3 events while SQLite refuses writes, then crash: the WAL has them, SQLite does not."""
    store = Store(data, writer_process=False)
    store.open()
    batch = records(3)
    read_only(store.state, True)
    store.append(batch)
    assert store.index.pending == 3
    crash(store)
    return batch


def test_entries_pending_at_a_crash_are_indexed_again_by_the_wal_replay(tmp_path: Path) -> None:
    data = tmp_path / "data"
    batch = crash_with_entries_pending(data)
    store = Store(data, writer_process=False)
    store.open()
    assert store.index.pending == 0
    assert set(store.state.find_event_ids([r.event_id for r in batch])) == {r.event_id for r in batch}
    assert store.state.heads()["gw-1"].seq == 3
    store.close()


@pytest.mark.slow
def test_the_replay_keeps_a_segment_whose_entries_sqlite_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    batch = crash_with_entries_pending(data)
    # Another connection holds SQLite's write lock through the restart: the replay's index write times out.
    blocker = sqlite3.connect(data / "state" / "state.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    store = Store(data, writer_process=False)
    store.open()
    assert store.index.pending == 3
    kept = store.wal.segments()
    assert kept, "a segment left the disk before SQLite had its entries"
    assert {r.event_id for segment in kept for r in store.wal.read_segment(segment)} == {r.event_id for r in batch}
    assert [row[0] for row in read_lake(store)] == [1, 2, 3]  # the lake has them all the same
    blocker.execute("ROLLBACK")
    blocker.close()
    store.flush()  # the flusher drains the index, then deletes the segment
    assert store.wal.segments() == []
    assert store.index.pending == 0
    assert store.state.heads()["gw-1"].seq == 3
    store.close()


def read_lake(store: Store) -> list[tuple[int]]:
    return duckdb.sql(f"SELECT seq FROM read_parquet('{store.lake.glob}') ORDER BY seq").fetchall()


class CountingState(StateDB):
    """A real StateDB that counts its write transactions."""

    transactions = 0

    def record_events(self, *args: object, **kwargs: object) -> None:
        self.transactions += 1
        super().record_events(*args, **kwargs)  # type: ignore[arg-type]


def test_batches_that_arrive_together_share_one_sqlite_transaction(tmp_path: Path) -> None:
    state = CountingState(tmp_path / "state.sqlite")
    index = IndexWriter(state, gather=0.5)
    index.start()
    batches = [entries(3, f"gw-{n}") for n in range(20)]
    for batch in batches:
        index.add(batch)
    wait_for(lambda: index.pending == 0)
    assert state.transactions == 1  # the thread woke on the first batch and gathered the other 19
    wanted = [entry.event_id for batch in batches for entry in batch]
    assert set(state.find_event_ids(wanted)) == set(wanted)
    index.stop()


def test_stop_does_not_wait_out_the_gathering_and_writes_what_is_pending(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.sqlite")
    index = IndexWriter(state, gather=60)
    index.start()
    batch = entries(4)
    index.add(batch)
    started = time.monotonic()
    index.stop()
    assert time.monotonic() - started < 30  # far less than the 60 s gathering window
    assert index.pending == 0
    assert set(state.find_event_ids([e.event_id for e in batch])) == {e.event_id for e in batch}
