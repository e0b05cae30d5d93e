"""The Parquet lake: ``<data-dir>/lake/events/tenant=<t>/date=<YYYY-MM-DD>/seg-<n>.parquet``.

Each write-ahead-log segment becomes one file per partition it touches, named after the segment, so flushing the
same segment twice (a crash between writing Parquet and deleting the segment) rewrites nothing: a file that exists
is whole, because it only appears through an atomic rename after its bytes were fsync'd. Readers glob
``**/*.parquet`` and never see the ``.tmp`` files being written.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.ground.jws import decode_payload
from store.ground.layout import DataDir
from store.lake_files import live_files, segment_level, segment_range
from store.object_lake import home_of
from store.quarantine import Quarantine
from store.rows import row_problem, row_values
from store.schema import EVENT_SCHEMA, Signed, partition_of, rows_table
from store.wal import WalRecord, fsync_directory

__all__ = [
    "MERGE_BUFFER_BYTES",
    "SYNC_EVERY_BYTES",
    "Lake",
    "PacedFile",
    "SegmentWrite",
    "merge_sorted",
    "signed_event",
    "signed_events",
]

log = logging.getLogger(__name__)

SYNC_EVERY_BYTES = 512 * 1024
MERGE_BUFFER_BYTES = 32 * 1024 * 1024  # what a compaction holds of its inputs at a time, all inputs together
# Row groups of lake files: scans of the lake slow down with smaller ones (blast radius over 10M events: 2.7 s
# with 128k rows, 4.3 s with 8k), so a compaction holds one whole row group (about 200 MB of 1.6 KB events)
# before it writes it; events large enough to fill the byte limit first make smaller groups.
ROW_GROUP_ROWS = 128 * 1024
ROW_GROUP_BYTES = 256 * 1024 * 1024
_ORDER = [("emitter", "ascending"), ("seq", "ascending")]
_PROBE_ROWS = 64
_READ_BUFFER_BYTES = 256 * 1024
# A page ends at the first multiple of this many rows past 1 MiB, and a reader decodes a page whole: at the
# default of 1,024, pages of 64 KiB events would be 64 MiB each, and a merge would hold one per input.
_WRITE_BATCH_ROWS = 128
# Columns whose every value is different: a dictionary cannot shrink them, and a reader holds a column chunk's
# dictionary page (up to 1 MiB) while it reads the chunk, which a merge of many files pays once per input.
# Both options name Parquet leaf columns: a list column's is ``<name>.list.element`` (by its bare name it would
# silently get neither dictionary nor statistics).
_LEAVES = {
    field.name: f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name for field in EVENT_SCHEMA
}
_UNIQUE_COLUMNS = frozenset({"event_id", "event_hash", "prev_hash", "jws"})
_DICTIONARY_COLUMNS = [leaf for name, leaf in _LEAVES.items() if name not in _UNIQUE_COLUMNS]
_STATISTICS_COLUMNS = [leaf for name, leaf in _LEAVES.items() if name != "jws"]  # no query filters on jws

_TENANT = re.compile(r"[a-z0-9_][a-z0-9._-]{0,127}")  # a protocol tenant id, or the server's _system


def signed_event(record: WalRecord) -> Signed:
    """A record's signed payload with what the lake stores beside it."""
    return Signed(
        decode_payload(record.jws), record.jws, record.kid, record.event_hash, record.received_at_us, record.log_index
    )


def signed_events(records: Iterable[WalRecord]) -> Iterator[Signed]:
    for record in records:
        yield signed_event(record)


@dataclass(frozen=True)
class SegmentWrite:
    """What writing one WAL segment did: rows newly written, and the (event id, reason) of each quarantined."""

    written: int
    quarantined: list[tuple[str, str]]


def _table(rows: list[tuple[WalRecord, tuple[Any, ...]]]) -> tuple[pa.Table, list[tuple[WalRecord, str]]]:
    """The lake table of checked rows. Should Arrow still refuse the batch, each row is tried alone and those it
    refuses are returned with the reason instead."""
    try:
        return rows_table([values for _, values in rows]), []
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    tables, refused = [], []
    for record, values in rows:
        try:
            tables.append(rows_table([values]))
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            refused.append((record, f"the lake refused the row: {type(exc).__name__}: {exc}"))
    return (pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()), refused


class PacedFile:
    """A new file, written through ``os.write``, that is fdatasync'd every ``sync_every`` bytes and fsync'd on
    ``close``: the sink ``pq.write_table`` writes a lake file into.

    Written in one go and fsync'd at the end, a lake file (3 MB a second at 2,000 events/s, 24 MB a compaction)
    puts all its bytes in the disk's queue at once, and a WAL fdatasync behind them waits for them. Synced every
    512 KiB, no more than that is queued ahead of an ack. ``bench/disk.py`` measures the WAL's fdatasync beside a
    lake-like writer both ways.
    """

    def __init__(self, path: Path, sync_every: int = SYNC_EVERY_BYTES) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._sync_every = sync_every
        self._position = 0
        self._unsynced = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])
        self._position += written
        self._unsynced += written
        if self._unsynced >= self._sync_every:
            os.fdatasync(self._fd)
            self._unsynced = 0
        return written

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        """fsync (data and metadata), then close; a failed fsync still closes the descriptor, then raises."""
        if self.closed:
            return
        self.closed = True
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def __enter__(self) -> PacedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:  # the caller removes the file: no point in syncing it
            self.closed = True
            os.close(self._fd)
            return
        self.close()


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.events_dir = root / "events"
        self.events_dir.mkdir(parents=True, exist_ok=True)
        # The lake's home on object storage (lake.json beside lake/), of which this directory is then a copy:
        # every file is uploaded before it gets its final name here, and deleted there before here.
        self.home = home_of(root.parent)
        self.touched: list[Path] = []  # partitions the last write_segment wrote to
        self.quarantine = Quarantine(DataDir(root.parent).quarantine)  # the lake is <data-dir>/lake

    @property
    def glob(self) -> str:
        """The pattern to hand to ``read_parquet(..., hive_partitioning=true)``."""
        return str(self.events_dir / "**" / "*.parquet")

    def write_segment(self, segment: int, records: list[WalRecord]) -> SegmentWrite:
        """Write a WAL segment's records as Parquet, one file per partition. A record the lake cannot hold is
        quarantined with its reason (``store.quarantine``) and every other record is written."""
        by_partition: dict[tuple[str, str], list[tuple[WalRecord, tuple[Any, ...]]]] = defaultdict(list)
        refused: list[tuple[WalRecord, str]] = []
        seen: set[tuple[str, int]] = set()
        for record in records:
            if (record.emitter, record.seq) in seen:
                continue
            seen.add((record.emitter, record.seq))
            try:
                event = signed_event(record)
                values = row_values(event)
                problem = row_problem(values)
                tenant, when = partition_of(event.payload)
                if problem is None and not (isinstance(tenant, str) and _TENANT.fullmatch(tenant)):
                    problem = f"tenant {tenant!r} cannot name a partition directory"
            except Exception as exc:  # one record, however malformed, must not stop the others
                problem = f"cannot read the event: {type(exc).__name__}: {exc}"
            if problem is not None:
                refused.append((record, problem))
                continue
            by_partition[(tenant, when.isoformat())].append((record, values))
        tables = {}
        for partition, rows in by_partition.items():
            rows.sort(key=lambda row: (row[0].emitter, row[0].seq))
            tables[partition], more = _table(rows)
            refused += more
        if refused:
            self.quarantine.put(segment, refused)  # durable before any lake file, and so before the WAL deletes it
        written = 0
        self.touched = [self.events_dir / f"tenant={tenant}" / f"date={day}" for tenant, day in tables]
        for (tenant, day), table in sorted(tables.items()):
            directory = self.events_dir / f"tenant={tenant}" / f"date={day}"
            final = directory / f"seg-{segment:012d}.parquet"
            if (
                table.num_rows == 0
                or final.exists()
                or any(
                    (covered := segment_range(path)) and covered[0] <= segment <= covered[1]
                    for path in directory.glob("compact-*.parquet")
                )
            ):
                continue
            self._write_atomic(directory, final, [table])
            written += table.num_rows
        return SegmentWrite(written, [(record.event_id, reason) for record, reason in refused])

    def _write_atomic(self, directory: Path, final: Path, row_groups: Iterable[pa.Table]) -> None:
        """Write ``row_groups`` (one Parquet row group each, up to ``ROW_GROUP_ROWS`` rows) to ``final`` by an
        atomic rename of a durable temporary file."""
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{final.name}.{os.getpid()}.tmp"  # two writers of one segment never share it
        try:
            with (
                PacedFile(temporary) as sink,
                pq.ParquetWriter(
                    sink,
                    EVENT_SCHEMA,
                    compression="zstd",
                    write_batch_size=_WRITE_BATCH_ROWS,
                    use_dictionary=_DICTIONARY_COLUMNS,
                    write_statistics=_STATISTICS_COLUMNS,
                ) as writer,
            ):
                for table in row_groups:
                    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            if self.home is not None:
                self.home.put(temporary, self._relative(final))
            os.rename(temporary, final)
            fsync_directory(directory)
            if created:
                fsync_directory(directory.parent)
                fsync_directory(directory.parent.parent)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _remove(self, paths: Iterable[Path]) -> None:
        """Delete lake files: from the object store first (if the lake lives there), then here."""
        for path in paths:
            if self.home is not None:
                self.home.delete(self._relative(path))
            path.unlink(missing_ok=True)

    def refresh(self) -> None:
        """This copy brought up to date with the lake's home (a writer that starts to write does it first)."""
        if self.home is not None:
            self.home.refresh(self.root, force=True)

    def highest_segment(self) -> int:
        """The highest segment number that has a file in the lake (0 if none)."""
        ranges = [segment_range(path) for path in self.events_dir.glob("tenant=*/date=*/*.parquet")]
        return max((r[1] for r in ranges if r), default=0)

    def remove_temporary_files(self) -> int:
        removed = 0
        for path in self.events_dir.glob("tenant=*/date=*/.*.tmp"):  # of segment files and of compactions
            path.unlink(missing_ok=True)
            removed += 1
        if self.home is not None:
            removed += self.home.remove_temporary_objects()
        if removed:
            log.info("removed %d unfinished Parquet files of a lake writer that ended", removed)
        return removed

    def files(self) -> list[Path]:
        """Every live Parquet file of the lake (see ``live_files``)."""
        return live_files(self.events_dir.glob("tenant=*/date=*/*.parquet"))

    def compact(self, *, min_files: int = 8, progress: Callable[[str], None] | None = None) -> int:
        """Merge each partition holding at least ``min_files`` live files into one ``compact-LO-HI`` file, sorted
        by (emitter, seq); return the files removed. Safe against readers (``live_files``) and crashes (the
        merged file appears by rename; the small files are deleted only after it is durable)."""
        removed = 0
        partitions: dict[Path, list[Path]] = defaultdict(list)
        for path in self.files():
            partitions[path.parent].append(path)
        for directory, paths in sorted(partitions.items()):
            if len(paths) < min_files:
                continue
            final = self._merge(directory, paths, "compact")
            removed += len(paths)
            if progress is not None:
                progress(f"{directory.relative_to(self.events_dir)}: {len(paths)} files -> {final.name}")
        return removed

    def compact_tiers(self, directories: Iterable[Path], *, fanout: int = 16) -> int:
        """Tiered compaction for the running server: in each partition, every ``fanout`` files of one level are
        merged into one file of the next level, so a partition holds at most ``fanout - 1`` files per level and
        each event is rewritten once per level (a day of one flush a second: 5 levels, < 80 files)."""
        removed = 0
        for directory in directories:
            self.remove_covered_files(directory)
            level = 0
            while level < 10:
                files = sorted(
                    (path for path in live_files(directory.glob("*.parquet")) if segment_level(path) == level),
                    key=lambda path: segment_range(path) or (0, 0),
                )
                if len(files) < fanout:
                    level += 1
                    continue
                self._merge(directory, files[:fanout], f"compact-L{level + 1}")
                removed += fanout
        return removed

    def remove_covered_files(self, directory: Path) -> int:
        """Delete the files of a partition that a wider compacted file holds: the inputs of a compaction whose
        writer ended after its output appeared and before it deleted them (readers skip them: ``live_files``)."""
        paths = list(directory.glob("*.parquet"))
        live = set(live_files(paths))
        covered = sorted(path for path in paths if segment_range(path) is not None and path not in live)
        if covered:
            fsync_directory(directory)  # the wider file's name is on disk before its inputs leave
            self._remove(covered)
            fsync_directory(directory)
            log.info("%s: removed %d files that a compacted file holds", directory, len(covered))
        return len(covered)

    def _merge(self, directory: Path, paths: list[Path], prefix: str) -> Path:
        """One file holding ``paths``, sorted by (emitter, seq); written durably before they are deleted. The
        inputs are streamed (``merge_sorted``): a compaction of a day of one partition holds no more of it in
        memory than one of a few seconds."""
        ranges = [segment_range(path) for path in paths]
        low = min(r[0] for r in ranges if r)
        high = max(r[1] for r in ranges if r)
        final = directory / f"{prefix}-{low:012d}-{high:012d}.parquet"
        self._write_atomic(directory, final, merge_sorted(paths))
        self._remove(paths)
        fsync_directory(directory)
        return final


def merge_sorted(
    paths: Sequence[Path], *, buffer_bytes: int = MERGE_BUFFER_BYTES, row_group_bytes: int = ROW_GROUP_BYTES
) -> Iterator[pa.Table]:
    """The rows of lake files that are each sorted by (emitter, seq), merged in that order, as tables of one
    output row group each (up to ``ROW_GROUP_ROWS`` rows and about ``row_group_bytes``).

    A k-way merge a batch at a time: each input holds a batch of about ``buffer_bytes / k`` bytes; every held row
    up to the smallest of the inputs' largest held keys is final (no input can still hold a smaller one), so
    those rows are sorted together and passed on, and the input that set that bound reads its next batch.
    Memory is bounded by ``buffer_bytes`` plus one row group, whatever the inputs hold (16 files of 1.6 KB
    events: 642-809 MiB of RSS for 256,000 to 2,560,000 events); read whole, 1,024,000 events took 4,528 MiB.
    An input that is not sorted loses nothing: its rows all appear once, only not in order."""
    inputs = [_Input(_batches(path, buffer_bytes // max(1, len(paths)))) for path in paths]
    pending: list[pa.Table] = []
    pending_rows = pending_bytes = 0
    while True:
        for source in inputs:
            source.fill()
        held = [source for source in inputs if source.rows is not None]
        if not held:
            break
        bound = min((source.largest for source in held if not source.exhausted), default=None)
        ready = [taken for source in held if (taken := source.take(bound)) is not None]
        merged = pa.concat_tables(ready).sort_by(_ORDER)
        pending.append(merged)
        pending_rows += merged.num_rows
        pending_bytes += merged.nbytes
        if pending_rows >= ROW_GROUP_ROWS:  # a full row group; the rest starts the next one
            held_back = pa.concat_tables(pending)
            yield held_back.slice(0, ROW_GROUP_ROWS)
            pending = [held_back.slice(ROW_GROUP_ROWS)]
            pending_rows, pending_bytes = pending[0].num_rows, pending[0].nbytes
        elif pending_bytes >= row_group_bytes:  # large events: fewer rows
            yield pa.concat_tables(pending)
            pending, pending_rows, pending_bytes = [], 0, 0
    if pending_rows:
        yield pa.concat_tables(pending)


class _Input:
    """One input of ``merge_sorted``: the rows it holds and their smallest and largest (emitter, seq)."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self.exhausted = False
        self.rows: pa.Table | None = None
        self.smallest: tuple[str, int] = ("", 0)
        self.largest: tuple[str, int] = ("", 0)

    def fill(self) -> None:
        while self.rows is None and not self.exhausted:
            batch = next(self._batches, None)
            if batch is None:
                self.exhausted = True
            elif batch.num_rows:
                self.rows = pa.Table.from_batches([batch])
                keys = self.rows.select(["emitter", "seq"])
                self.smallest, self.largest = _extreme_key(keys, pc.min), _extreme_key(keys, pc.max)

    def take(self, bound: tuple[str, int] | None) -> pa.Table | None:
        """Hand over the held rows up to ``bound`` (all with None); keep the rest."""
        rows = self.rows
        if rows is None or (bound is not None and self.smallest > bound):
            return None
        if bound is None or self.largest <= bound:
            self.rows = None
            return rows
        upto = _up_to(rows, bound)
        count = pc.sum(upto).as_py() or 0
        if pc.all(upto.slice(0, count)).as_py() is not False:  # sorted, as lake files are: a prefix
            taken, self.rows = rows.slice(0, count), rows.slice(count)
        else:
            taken, self.rows = rows.filter(upto), rows.filter(pc.invert(upto))
        keys = self.rows.select(["emitter", "seq"])
        self.smallest = _extreme_key(keys, pc.min)
        return taken


def _batches(path: Path, budget: int) -> Iterator[pa.RecordBatch]:
    """``path``'s rows in the lake's schema (columns a file predates are null), about ``budget`` bytes at a time.

    Read a page at a time through a small buffer: by default pyarrow reads each column chunk of a row group whole
    before decoding it (``pre_buffer``), 9 MB of compressed ``jws`` per input for a file of 64,000 events. The
    row size comes from the first rows decoded: the file's metadata gives encoded sizes, which dictionaries make
    far smaller."""
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES)
    # use_threads=False: Arrow's pool threads would keep the scheduling of the thread that started them, and the
    # lake writer changes its own (store.engine)
    probe = next(parquet.iter_batches(batch_size=_PROBE_ROWS, use_threads=False), None)
    if probe is None:
        return
    rows = max(_PROBE_ROWS, min(64 * 1024, budget * probe.num_rows // max(1, probe.nbytes)))
    for batch in parquet.iter_batches(batch_size=rows, use_threads=False):
        yield _conform(batch)


def _conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    if batch.schema.equals(EVENT_SCHEMA):
        return batch
    names = set(batch.schema.names)
    return pa.RecordBatch.from_arrays(
        [
            batch.column(field.name).cast(field.type) if field.name in names else pa.nulls(batch.num_rows, field.type)
            for field in EVENT_SCHEMA
        ],
        schema=EVENT_SCHEMA,
    )


def _extreme_key(keys: pa.Table, extreme: Callable[[Any], pa.Scalar]) -> tuple[str, int]:
    """The smallest (``pc.min``) or largest (``pc.max``) (emitter, seq) of ``keys``; a missing key counts as the
    smallest, so that a row missing one is never held back."""
    if keys["emitter"].null_count or keys["seq"].null_count:
        return ("", 0) if extreme is pc.min else max(("", 0), _extreme_key(keys.drop_null(), extreme))
    if not keys.num_rows:
        return ("", 0)
    emitter = extreme(keys["emitter"]).as_py()
    return emitter, extreme(keys.filter(pc.equal(keys["emitter"], emitter))["seq"]).as_py()


def _up_to(table: pa.Table, bound: tuple[str, int]) -> pa.ChunkedArray:
    """Which rows sort at or before ``bound`` (rows missing a key count as before: none is ever held back)."""
    emitter, seq = table["emitter"], table["seq"]
    before = pc.or_(pc.less(emitter, bound[0]), pc.and_(pc.equal(emitter, bound[0]), pc.less_equal(seq, bound[1])))
    return pc.fill_null(before, True)
