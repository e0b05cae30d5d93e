"""The store as one object: write-ahead log + Parquet lake + derived state, with recovery and a background flusher.

The data dir's layout is ``store.ground.layout.DataDir``.

``open`` recovers before anything else: it removes unfinished ``.tmp`` files, rebuilds the derived state if it is
missing, replays every WAL segment into the state and the lake, and only then starts the flusher.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from store.ground.errors import CorruptState, CustodyError, StorageUnavailable
from store.ground.jws import decode_payload
from store.ground.layout import SERVER_EMITTER, DataDir
from store.indexer import IndexWriter
from store.lake import Lake, SegmentWrite
from store.merkle_log import MerkleLog
from store.orphans import exit_with_parent, name_process
from store.sequencing import LocalSequencer, Sequencer
from store.state import IndexEntry, StateDB
from store.wal import WalRecord, WriteAheadLog, read_records

__all__ = [
    "FlushStats",
    "Reingested",
    "Store",
    "lock_data_dir",
    "reingest_quarantined",
]

log = logging.getLogger(__name__)


@dataclass
class FlushStats:
    """What the flusher has not yet written, for /metrics."""

    unflushed_events: int = 0
    oldest_unflushed_at: float | None = None
    last_error: str | None = None
    quarantined_events: int = 0  # acknowledged events the lake refused, kept in <data-dir>/quarantine

    def lag_seconds(self) -> float:
        return 0.0 if self.oldest_unflushed_at is None else time.monotonic() - self.oldest_unflushed_at


def lock_data_dir(data_dir: Path) -> int:
    """Take ``<data-dir>/custody.lock`` (flock, released when the returned descriptor is closed or the process
    ends); raise CustodyError when another process holds it. ``custody serve`` holds it while it runs, and so does
    anything else that rewrites the lake."""
    fd = os.open(DataDir(data_dir).lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise CustodyError(f"{data_dir} is in use by another custody process") from exc
    return fd


CATCH_UP_AFTER = 30.0  # seconds of flush lag after which the lake writer stops yielding every core to acks
_REBUILD_BATCH_ROWS = 16 * 1024  # rows of a lake file read at a time while the event index is rebuilt
_WRITER_POLL = 0.5  # how often the flusher, waiting for a lake write, checks whether the lake is far behind
_idle_writer = False  # this process is the lake writer and runs under SCHED_IDLE (set in that process only)


def write_segment_file(wal_path: Path, lake_root: Path, segment: int, *, idle: bool = False) -> SegmentWrite:
    """Read a closed WAL segment, write it to the lake, and compact the partitions it touched (tiered); runs in
    the lake-writer process. ``idle``: run under ``SCHED_IDLE`` from now on (a writer started at normal priority
    to catch up is told so once the lake has caught up)."""
    if idle:
        _become_idle()
    lake = Lake(lake_root)
    result = lake.write_segment(segment, read_records(wal_path)[0])
    lake.compact_tiers(lake.touched)
    return result


def _start_writer(*, idle: bool) -> tuple[ProcessPoolExecutor, int]:
    """A lake-writer process, started now (not in the middle of a flush), and its pid."""
    writer = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_writer_started,
        initargs=(idle,),
    )
    return writer, writer.submit(os.getpid).result()


def _writer_started(idle: bool) -> None:
    """The lake writer yields the CPU to acknowledgements (a flush may wait, an ack should not), and ends with the
    server.

    It runs under ``SCHED_IDLE``: it gets a core only when no acknowledgement, verification or other ordinary task
    wants it. At nice 10 its share of a busy core still delayed acks (measured in ``bench/ingest.py``; see the
    changelog's performance history). Under saturation it gets almost nothing, and a process cannot leave
    ``SCHED_IDLE`` without ``CAP_SYS_NICE``. So once the lake is
    ``catch_up_after`` seconds behind, the flusher replaces it, even in the middle of a write, with a writer at
    normal priority, which drops to ``SCHED_IDLE`` once the lake has caught up (``Store._write_segment``).
    Acknowledged events are in the WAL all along."""
    exit_with_parent()
    if idle:
        _become_idle()
    name_process("custody-lake")  # last: once ps shows the name, the scheduling above is in place


def _become_idle() -> None:
    """In the lake-writer process: ``SCHED_IDLE`` from now on (lowering the priority needs no privilege); where
    that is refused, nice 10."""
    global _idle_writer
    if _idle_writer:
        return
    _idle_writer = True
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or refused
        log.warning("the lake writer cannot run under SCHED_IDLE (%s); it runs at nice 10 instead", exc)
        os.nice(10)


@dataclass(frozen=True)
class Reingested:
    """What ``reingest_quarantined`` did: events now in the lake, and those the lake still refuses (event id,
    reason), which stay quarantined."""

    written: int
    refused: list[tuple[str, str]]


def reingest_quarantined(data_dir: Path) -> Reingested:
    """Write every quarantined event to the lake (after an upgrade that can store them), with no server running.
    Those the lake still refuses go back to the quarantine with the new reason; none is ever dropped."""
    lock = lock_data_dir(data_dir)
    try:
        layout = DataDir(data_dir)
        lake = Lake(layout.lake)
        lake.remove_temporary_files()
        wal = layout.wal
        in_wal = [int(path.stem) for path in wal.glob("*.wal") if path.stem.isdigit()] if wal.is_dir() else []
        number = max([lake.highest_segment(), lake.quarantine.highest_segment(), *in_wal]) + 1
        number, records = lake.quarantine.begin_reingest(number)
        if not records:
            return Reingested(0, [])
        result = lake.write_segment(number, records)
        lake.compact_tiers(lake.touched)
        lake.quarantine.end_reingest(number)
        return Reingested(result.written, result.quarantined)
    finally:
        os.close(lock)


def _all_below(parquet: pq.ParquetFile, start: int) -> bool:
    """True when every row group's ``log_index`` statistics end below ``start`` (False when any group has none)."""
    metadata = parquet.metadata
    leaves = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    if "log_index" not in leaves:
        return False
    column = leaves.index("log_index")
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        if statistics is None or not statistics.has_min_max or statistics.null_count or statistics.max >= start:
            return False
    return True


class Store:
    def __init__(
        self,
        data_dir: Path,
        *,
        flush_interval: float = 1.0,
        writer_process: bool = True,
        catch_up_after: float = CATCH_UP_AFTER,
        publish_interval: float = 0.5,
    ) -> None:
        self.data_dir = data_dir
        self.flush_interval = flush_interval
        self.publish_interval = publish_interval  # how often new leaves join the Merkle log and get a checkpoint
        self.catch_up_after = catch_up_after
        self._catching_up = False  # the lake writer runs at normal priority until the lake has caught up
        self.layout = DataDir(data_dir)
        self.lake = Lake(self.layout.lake)
        self.merkle = MerkleLog(self.layout)
        self._publisher: threading.Thread | None = None
        self.flush_stats = FlushStats()
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        # Called (in the flusher's thread; they must not block) after a flush that wrote events to the lake.
        self.flush_listeners: list[Callable[[], None]] = []
        self._flusher: threading.Thread | None = None
        self._writer: ProcessPoolExecutor | None = None
        self._writer_pid = 0
        self._rotated_at = time.monotonic()
        self._flushing_in_background = False
        self._writer_process = writer_process
        self._pending: list[tuple[int, int, float]] = []  # (segment, events, monotonic time of first append)
        self._pending_lock = threading.Lock()
        self.state: StateDB
        self.index: IndexWriter
        self.wal: WriteAheadLog

    # -- lifecycle --------------------------------------------------------------------------------------------

    def open(self, progress: Callable[[str], None] = log.info) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.data_dir.stat().st_mode & 0o077:
            log.warning("%s was readable by other accounts; it is now 0700 (owner only)", self.data_dir)
            self.data_dir.chmod(0o700)
        self.layout.state.mkdir(mode=0o700, exist_ok=True)
        self._take_lock()
        self.lake.remove_temporary_files()
        self.lake.refresh()  # a lake on object storage: recovery reads this data dir's copy of it
        self.state = StateDB(self.layout.state_db)
        self.index = IndexWriter(self.state)
        if not self.state.complete:
            self._rebuild_state(progress)
        self.layout.log.mkdir(mode=0o700, exist_ok=True)
        self.merkle.recover(self._leaves_from, progress)
        self.wal = WriteAheadLog(
            self.layout.wal, first_segment=self._highest_segment() + 1, next_log_index=self.merkle.size
        )
        self.flush_stats.quarantined_events = self.lake.quarantine.count()
        self._replay(progress)

    def start_flusher(self) -> None:
        """Flush every ``flush_interval`` seconds from a thread; Parquet encoding runs in a child process so that
        it never competes with the ack path for the GIL."""
        self._flushing_in_background = self._writer_process
        if self._writer_process:
            self._writer, self._writer_pid = _start_writer(idle=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="custody-flusher", daemon=True)
        self._flusher.start()
        self._publisher = threading.Thread(target=self._publish_loop, name="custody-log", daemon=True)
        self._publisher.start()
        self.index.start()

    def close(self) -> None:
        """Stop the flusher and write everything acknowledged to the lake (SIGTERM path)."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        if self._publisher is not None:
            self._publisher.join()
        try:
            self.merkle.publish()
            self.merkle.sync()
        except (OSError, CustodyError) as exc:
            log.error("final checkpoint failed; the next start rebuilds it from the write-ahead log: %s", exc)
        self._flushing_in_background = False  # the last flush runs here: no process to start for it
        try:
            self.flush()
        except CustodyError as exc:
            log.error("final flush failed, events stay in the write-ahead log: %s", exc)
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self.wal.close()
        self.index.stop()
        self.state.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _highest_segment(self) -> int:
        """The highest segment number the lake or the quarantine holds: WAL segments are numbered above it."""
        return max(self.lake.highest_segment(), self.lake.quarantine.highest_segment())

    def _take_lock(self) -> None:
        self._lock_fd = lock_data_dir(self.data_dir)

    # -- recovery ---------------------------------------------------------------------------------------------

    def _rebuild_state(self, progress: Callable[[str], None]) -> None:
        files = self.lake.files()
        progress(f"building the event index from {len(files)} Parquet files")
        self.state.reset()
        admin: list[tuple[int, dict[str, Any], str]] = []
        for number, path in enumerate(files, 1):
            # a batch at a time: a compacted file can hold a day of a busy tenant, too much to hold as Python objects
            batches = pq.ParquetFile(path, pre_buffer=False).iter_batches(
                batch_size=_REBUILD_BATCH_ROWS, columns=["event_id", "emitter", "seq", "event_hash", "jws"]
            )
            for batch in batches:
                columns = batch.to_pydict()
                entries = [
                    IndexEntry(event_id, emitter, seq, digest)
                    for event_id, emitter, seq, digest in zip(
                        columns["event_id"], columns["emitter"], columns["seq"], columns["event_hash"], strict=True
                    )
                ]
                for emitter, seq, jws in zip(columns["emitter"], columns["seq"], columns["jws"], strict=True):
                    if emitter == SERVER_EMITTER:
                        payload = decode_payload(jws)
                        admin.append((seq, payload["admin"], payload["occurred_at"]))
                self.state.record_events(entries)
            if number % 100 == 0:
                progress(f"indexed {number}/{len(files)} files")
        admin.sort(key=lambda item: item[0])
        self.state.record_events([], [(change, occurred_at) for _, change, occurred_at in admin])
        self.state.mark_complete()

    def _leaves_from(self, start: int) -> list[tuple[int, str]]:
        """(log index, event hash) of every event at ``start`` or later in the lake, the quarantine and the WAL;
        an index held twice with two hashes is refused."""
        found: dict[int, str] = {}

        def take(index: int | None, digest: str, where: object) -> None:
            if index is None or index < start:
                return
            if found.setdefault(index, digest) != digest:
                raise CorruptState(f"log index {index} is held by two events ({found[index]} and {digest}, {where})")

        for path in self.lake.files():
            parquet = pq.ParquetFile(path, pre_buffer=False)
            if "log_index" not in parquet.schema_arrow.names:  # written before the transparency log
                continue
            if _all_below(parquet, start):  # the file's statistics say so: no need to read it
                continue
            table = pq.read_table(path, columns=["log_index", "event_hash"], filters=[("log_index", ">=", start)])
            for index, digest in zip(table["log_index"].to_pylist(), table["event_hash"].to_pylist(), strict=True):
                take(index, digest, path)
        for event in self.lake.quarantine.events():
            take(event.record.log_index, event.record.event_hash, "quarantine")
        for path in sorted(self.layout.wal.glob("*.wal")):
            for record in read_records(path)[0]:
                take(record.log_index, record.event_hash, path)
        return sorted(found.items())

    def _replay(self, progress: Callable[[str], None]) -> None:
        segments = self.wal.segments()
        if segments:
            progress(f"replaying {len(segments)} write-ahead log segments")
        for segment in segments:
            records = self.wal.read_segment(segment, repair=True)
            self._index(records, now=True)
            result = self.lake.write_segment(segment, records)
            progress(f"segment {segment}: {len(records)} events in the log, {result.written} written to the lake")
            self._report_quarantined(segment, result)
            if self.index.pending:  # SQLite refused them: the flusher deletes the segment once its drain succeeds
                progress(f"segment {segment}: kept until the event index takes its {self.index.pending} entries")
                continue
            self.wal.remove(segment)

    # -- writing ----------------------------------------------------------------------------------------------

    def append(self, records: Sequence[WalRecord]) -> int:
        """Make records durable (one fsync), then index them: visible to lookups at once, written to SQLite behind
        the ack (``store.indexer``), in the Merkle log at its next publish. Return the log index of the first
        record (the others follow it). Raises StorageUnavailable; then nothing is indexed."""
        if not records:
            return self.wal.next_log_index
        ticket = self.index.begin()
        try:
            segment, first = self.wal.append(records)
            self.merkle.add(first, [record.event_hash for record in records])
            self._index(records)
        finally:
            self.index.end(ticket)
        with self._pending_lock:
            if self._pending and self._pending[-1][0] == segment:
                number, count, since = self._pending[-1]
                self._pending[-1] = (number, count + len(records), since)
            else:
                self._pending.append((segment, len(records), time.monotonic()))
            self._update_stats()
        return first

    def _index(self, records: Sequence[WalRecord], *, now: bool = False) -> None:
        """Index durable records; admin changes (and, with ``now``, everything) in this thread."""
        entries = [IndexEntry(record.event_id, record.emitter, record.seq, record.event_hash) for record in records]
        admin = [
            (payload["admin"], payload["occurred_at"])
            for payload in (decode_payload(record.jws) for record in records if record.emitter == SERVER_EMITTER)
        ]
        if now or admin:
            self.index.write_now(entries, admin)
        else:
            self.index.add(entries)

    @property
    def index_pending(self) -> int:
        """Event-index entries acknowledged but not yet in SQLite (``store.indexer``)."""
        return self.index.pending

    def sequencer(self) -> Sequencer:
        """Who decides chains and the log's order for this store (``store.sequencing``)."""
        return LocalSequencer(self)

    def find_event_ids(self, event_ids: Sequence[str]) -> dict[str, IndexEntry]:
        return self.index.find_event_ids(event_ids)

    def hashes_at(self, emitter: str, seqs: Sequence[int]) -> dict[int, str]:
        return self.index.hashes_at(emitter, seqs)

    # -- flushing ---------------------------------------------------------------------------------------------

    def flush(self) -> int:
        """Move every closed (and the active) WAL segment into the lake; return the events written."""
        self._rotated_at = time.monotonic()
        self.wal.rotate()
        try:
            self.index.drain()  # a segment leaves the disk only once SQLite has its entries
        except sqlite3.Error as exc:
            self.flush_stats.last_error = f"event index: {exc}"
            raise StorageUnavailable(f"cannot write the event index, the WAL keeps every segment: {exc}") from exc
        written = 0
        for segment in self.wal.segments():
            if segment >= self.wal.active_segment:
                continue
            try:
                result = self._write_segment(segment)
                self._report_quarantined(segment, result)
                written += result.written
                self.wal.remove(segment)
            except OSError as exc:
                self.flush_stats.last_error = f"segment {segment}: {exc}"
                raise StorageUnavailable(f"cannot write segment {segment} to the lake: {exc.strerror}") from exc
            with self._pending_lock:
                self._pending = [item for item in self._pending if item[0] != segment]
                self._update_stats()
        self.flush_stats.last_error = None
        return written

    def _report_quarantined(self, segment: int, result: SegmentWrite) -> None:
        """Make quarantined events visible at once: the log names each, /healthz and /metrics count them."""
        for event_id, reason in result.quarantined:
            log.error(
                "segment %s: acknowledged event %s cannot be stored in the lake and is quarantined (%s); see"
                " `custody quarantine list`",
                segment,
                event_id,
                reason,
            )
        if result.quarantined:
            self.flush_stats.quarantined_events = self.lake.quarantine.count()

    def _write_segment(self, segment: int) -> SegmentWrite:
        """Turn one closed WAL segment into Parquet in the lake-writer process (in this one when there is none).

        The writer runs under ``SCHED_IDLE`` and gets almost no CPU while acks keep both cores busy. Once the lake
        is ``catch_up_after`` seconds behind, a writer at normal priority takes over: the idle one is killed, even
        in the middle of a write (the lake is safe against that as against kill -9 of the server: files appear
        by rename, a compaction deletes its inputs only once its output is durable), and the segment is written
        again. It drops back to ``SCHED_IDLE`` once the lag is under a tenth of the limit."""
        wal_path = self.wal.path(segment)
        if not self._flushing_in_background:
            return write_segment_file(wal_path, self.lake.root, segment)
        restarted = False
        while True:
            self._choose_priority()
            if self._writer is None:
                self._writer, self._writer_pid = _start_writer(idle=not self._catching_up)
            try:
                # A writer that died while idle breaks the pool: submit raises at once, and a new one takes over.
                future = self._writer.submit(
                    write_segment_file, wal_path, self.lake.root, segment, idle=not self._catching_up
                )
                while True:
                    try:
                        return future.result(timeout=_WRITER_POLL)
                    except TimeoutError:
                        if not self._catching_up and self._far_behind():
                            self._replace_idle_writer()
                            break
                        self._rotate_when_due()
            except BrokenProcessPool:
                self._writer = None
                if restarted:  # twice in one segment: the flush fails and is retried at the next interval
                    raise
                restarted = True
                log.error("the lake writer process died; starting a new one")

    def _rotate_when_due(self) -> None:
        """While a write waits for CPU, close the active WAL segment every ``flush_interval`` anyway: the next
        flushes then write segments of a second's events each, not one holding all that came in meanwhile (a
        30 s backlog at 7,500 events/s would be one 240 MB segment, read whole into the writer)."""
        if time.monotonic() - self._rotated_at >= self.flush_interval:
            self._rotated_at = time.monotonic()
            self.wal.rotate()

    @property
    def catching_up(self) -> bool:
        """The lake is far behind and a writer at normal priority is catching up: the server then leaves it a
        core (``VerifierPool.check``'s ``leave_free``)."""
        return self._catching_up

    def _far_behind(self) -> bool:
        return self.flush_stats.lag_seconds() >= self.catch_up_after

    def _choose_priority(self) -> None:
        """Catch up at normal priority from a lag of ``catch_up_after`` until the lag is under a tenth of it."""
        if not self._catching_up and self._far_behind():
            self._replace_idle_writer()
        elif self._catching_up and (lag := self.flush_stats.lag_seconds()) < self.catch_up_after / 10:
            self._catching_up = False
            log.info("the lake has caught up (%.1f s behind); the lake writer yields to acknowledgements again", lag)

    def _replace_idle_writer(self) -> None:
        """Kill the idle lake writer (it would get no CPU until the load eases); the next write starts one at
        normal priority. Its unfinished temporary files are removed: no other process writes the lake."""
        log.warning(
            "the lake is %.0f s behind the write-ahead log: a lake writer at normal priority takes over until it"
            " has caught up",
            self.flush_stats.lag_seconds(),
        )
        self._catching_up = True
        if self._writer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._writer_pid, signal.SIGKILL)
            self._writer.shutdown(wait=False, cancel_futures=True)  # an idle process may take seconds to exit
            self._writer = None
        self.lake.remove_temporary_files()

    def _update_stats(self) -> None:
        self.flush_stats.unflushed_events = sum(count for _, count, _ in self._pending)
        self.flush_stats.oldest_unflushed_at = min((since for _, _, since in self._pending), default=None)

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.publish_interval):
            try:
                self.merkle.publish()
                self.merkle.sync_if_due()
            except Exception:  # the next round retries; every leaf stays in the WAL and the lake meanwhile
                log.exception("publishing the transparency log failed, will retry")

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                if self.flush():
                    for listener in self.flush_listeners:
                        listener()
            except CustodyError as exc:
                log.error("flush failed, will retry: %s", exc)
            except Exception as exc:  # the flusher must outlive any one bad segment
                self.flush_stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("flush failed, will retry")
