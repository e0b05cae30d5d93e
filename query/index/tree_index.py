"""An index of the task trees for long-running readers (read API, dashboard): a delegation path reads the handful
of rows it needs instead of scanning the lake once per tree level.

A lookup by event id has no index in Parquet: each one scans the ``event_id`` column of every file (0.8 s at 10M
events), and a path needs one per tree level. ``TreeIndex`` keeps, sorted for binary search, 64-bit hashes of
every event's id, parent id and approval id with its file and row (about 60 bytes an event, in NumPy arrays). A
path asks it for the rows of the event, its ancestors, its descendants and its approval, reads only those rows,
and ``delegation_path`` walks them with the same lookups it runs as SQL over the whole lake (a test compares the
two).

Reading a few rows out of a lake file means decoding a whole row group (128k rows); small row groups would make
every scan of the lake slower (more row groups, more per-group overhead). So each lake file
gets a *row copy* beside the lake, ``<data-dir>/index/rows/``: its columns without ``jws``, in the same row order,
in row groups of 2,048 rows. It is derived data, named after the lake file's path, size and modification time,
rebuilt when those change, and removed when the file goes. Where it cannot be written (a read-only data dir) the
rows are read from the lake file itself, only slower. Files are read 65,536 rows at a time, so indexing a big
file takes memory for one batch, not for the file.

Hashes only locate rows: every row read is checked against the event id hash the index expects, and the SQL then
matches the real ids, so a hash collision costs an extra row, never a wrong answer. The index is built from the
rows of the lake's live files and brought up to date before every use: new files are read, files gone (compacted
away) are dropped, and a file whose size or modification time changed is read again. If the rows read do not
match the index (a file rewritten in place with its size and time kept), the file is read again and the lookup
retried, and failing that the path scans the whole lake.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from query.index.copies import CopyDir, CopyWriter
from query.lake import LakeReader
from query.paths import MAX_TREE_EVENTS
from store.ground.layout import DataDir
from store.lake_files import partition_of_file
from store.schema import EVENT_SCHEMA

__all__ = ["TreeIndex"]

log = logging.getLogger(__name__)

_NONE = 0  # "no parent / no approval" in the aligned arrays (a real hash of 0 has odds of 2^-64)
_COPY_ROWS = 2048  # rows per row group of a row copy: one group decodes in a few ms
_COPY_COLUMNS = [name for name in EVENT_SCHEMA.names if name != "jws"]
_KEY_COLUMNS = ["event_id", "parent_event_id", "approval_id", "type"]
_READ_ROWS = 64 * 1024  # rows of a lake file read at a time
_MERGE_AFTER = 32  # files kept apart from the merged arrays before they are merged in


def _hashes(values: pl.Series) -> np.ndarray:
    """64-bit hashes of strings, 0 for nulls; the same function at build time and at lookup time."""
    hashed = values.hash(seed=0).to_numpy()
    return np.where(values.is_null().to_numpy(), np.uint64(_NONE), hashed).astype(np.uint64)


@dataclass
class _File:
    """One lake file: where its rows can be read, and its hashes in row order."""

    path: Path
    size: int
    mtime: int
    copy: Path | None  # its row copy, or None: read the lake file
    metadata: pq.FileMetaData
    ids: np.ndarray
    parents: np.ndarray
    approvals: np.ndarray
    is_approval: np.ndarray

    def forget_hashes(self) -> None:
        """Once merged, the file's hashes live in the merged arrays only."""
        self.ids = self.parents = self.approvals = np.empty(0, np.uint64)
        self.is_approval = np.empty(0, np.bool_)


_Table = tuple[np.ndarray, ...]


def _sorted(columns: list[np.ndarray | None]) -> _Table:
    """The columns ordered by the first, each unsorted column released as soon as its sorted copy exists (at most
    one column is held twice)."""
    first = columns[0]
    assert first is not None
    order = np.argsort(first, kind="stable").astype(np.int32 if first.size < 2**31 else np.int64)
    done = []
    for at, column in enumerate(columns):
        assert column is not None
        columns[at] = None
        done.append(column[order])
        del column
    return tuple(done)


class _Lookup:
    """Sorted arrays over some files: events by id, events by parent id, approval events by approval id. Each is
    a tuple of aligned columns, the sorted key first, then the file number and the row."""

    def __init__(self, by_id: _Table, by_parent: _Table, by_approval: _Table) -> None:
        self.by_id, self.by_parent, self.by_approval = by_id, by_parent, by_approval

    @classmethod
    def of(cls, files: list[tuple[int, _File]], *, consume: bool = False) -> _Lookup:
        """The lookup over these files; with ``consume``, each file's own arrays are dropped once copied."""

        def join(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.empty(0, dtype)

        number = join([np.full(f.ids.size, n, np.int32) for n, f in files], np.int32)
        rows = join([np.arange(f.ids.size, dtype=np.int32) for _, f in files], np.int32)
        ids = join([f.ids for _, f in files], np.uint64)
        parents = join([f.parents for _, f in files], np.uint64)
        approvals = join([f.approvals for _, f in files], np.uint64)
        approval = join([f.is_approval for _, f in files], np.bool_) & (approvals != _NONE)
        if consume:
            for _, indexed in files:
                indexed.forget_hashes()
        by_approval = _sorted([approvals[approval], number[approval], rows[approval], ids[approval]])
        child = parents != _NONE
        by_parent = _sorted([parents[child], number[child], rows[child], ids[child]])
        del child, approval
        columns: list[np.ndarray | None] = [ids, number, rows, parents, approvals]
        del ids, number, rows, parents, approvals
        return cls(_sorted(columns), by_parent, by_approval)

    def without(self, numbers: set[int]) -> _Lookup:
        """The same minus the entries of some files (the order stays sorted)."""
        gone = np.fromiter(numbers, dtype=np.int32, count=len(numbers))

        def keep(table: _Table) -> _Table:
            kept = ~np.isin(table[1], gone)
            return tuple(column[kept] for column in table)

        return _Lookup(keep(self.by_id), keep(self.by_parent), keep(self.by_approval))

    def merged(self, other: _Lookup) -> _Lookup:
        def merge(a: _Table, b: _Table) -> _Table:
            if not a[0].size or not b[0].size:
                return a if b[0].size == 0 else b
            return _sorted([np.concatenate([x, y]) for x, y in zip(a, b, strict=True)])

        return _Lookup(
            merge(self.by_id, other.by_id),
            merge(self.by_parent, other.by_parent),
            merge(self.by_approval, other.by_approval),
        )

    @staticmethod
    def find(table: tuple[np.ndarray, ...], keys: np.ndarray) -> list[tuple[int, ...]]:
        """The entries whose key is one of ``keys``: (key, file number, row, *the rest)."""
        sorted_keys = table[0]
        low = np.searchsorted(sorted_keys, keys, side="left")
        high = np.searchsorted(sorted_keys, keys, side="right")
        hit = high > low
        if not hit.any():
            return []
        at = np.concatenate([np.arange(lo, hi) for lo, hi in zip(low[hit], high[hit], strict=True)])
        return list(zip(*(column[at].tolist() for column in table), strict=True))


class TreeIndex:
    def __init__(self, reader: LakeReader) -> None:
        self.reader = reader
        self.copies = CopyDir(DataDir(reader.data_dir).row_copies, reader.events_dir)
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[int, _File]] = {}  # path -> (file number, file)
        self._next = 0
        self.progress: tuple[int, int] = (0, 0)  # (files read, files to read) of the refresh running, if any
        self._merged = _Lookup.of([])  # most files; their per-file arrays are dropped once merged
        self._apart: dict[int, _File] = {}  # files read since the last merge
        self._recent = _Lookup.of([])

    # -- keeping up with the lake ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the files that are new or changed since the last refresh; forget the ones that are gone."""
        with self._lock:
            live = {}
            for path in self.reader.files():
                try:
                    stat = path.stat()
                except FileNotFoundError:  # compacted away between listing and stat
                    continue
                live[path] = (stat.st_size, stat.st_mtime_ns)
            gone: set[int] = set()
            for path in [p for p, (_, f) in self._files.items() if live.get(p) != (f.size, f.mtime)]:
                number, dropped = self._files.pop(path)
                self._apart.pop(number, None)
                gone.add(number)
                if dropped.copy is not None:
                    dropped.copy.unlink(missing_ok=True)
            fresh = False
            unread = [path for path in live if path not in self._files]
            self.progress = (0, len(unread))
            for path, (size, mtime) in live.items():
                if path not in self._files:
                    self.progress = (self.progress[0] + 1, len(unread))
                    try:
                        indexed = self._read(path, size, mtime)
                    except FileNotFoundError:
                        continue
                    self._files[path] = (self._next, indexed)
                    self._apart[self._next] = indexed
                    self._next += 1
                    fresh = True
                    if self._next % 16 == 0:  # reading files leaves freed buffers behind in the allocators
                        _give_back_memory()
            if gone:
                self._merged = self._merged.without(gone)
            if len(self._apart) > _MERGE_AFTER:
                self._merged = self._merged.merged(_Lookup.of(list(self._apart.items()), consume=True))
                self._apart = {}
                _give_back_memory()
            if gone or fresh:
                self._recent = _Lookup.of(list(self._apart.items()))
                self._remove_orphan_copies()
            self.progress = (0, 0)

    @property
    def building(self) -> bool:
        """True while a refresh reads files (a lookup now waits for it); ``progress`` says how far it is."""
        return self.progress[1] > 0

    def _remove_orphan_copies(self) -> None:
        self.copies.remove_except({f.copy.name for _, f in self._files.values() if f.copy is not None})

    def _read(self, path: Path, size: int, mtime: int) -> _File:
        """Index one lake file, and write its row copy unless it has one; a batch of rows at a time, so that a
        compacted file of millions of events costs no more memory than one of thousands."""
        name = self.copies.name(path, size, mtime)
        copy: Path | None = name
        parquet = pq.ParquetFile(path)
        copying = not name.exists()  # else written by this process earlier or by another reader of this data dir
        writer: CopyWriter | None = None
        hashes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        rows = 0
        columns = _COPY_COLUMNS if copying else _KEY_COLUMNS
        for batch in parquet.iter_batches(batch_size=_READ_ROWS, columns=columns):
            table = pa.Table.from_batches([batch]).select(columns)
            if copying:
                writer = writer or self.copies.writer(name, table.schema, row_group_size=_COPY_ROWS)
                writer.add(table)
            frame = pl.DataFrame(table.select(_KEY_COLUMNS))
            rows += frame.height
            hashes.append(
                (
                    _hashes(frame.get_column("event_id")),
                    _hashes(frame.get_column("parent_event_id")),
                    _hashes(frame.get_column("approval_id")),
                    (frame.get_column("type") == "task.approval").fill_null(False).to_numpy(),
                )
            )
        if copying:
            copy = None if writer is None else writer.finish()
        metadata = None
        if copy is not None:
            try:
                metadata = pq.ParquetFile(copy).metadata
            except (OSError, ValueError):
                metadata = None
            if metadata is None or metadata.num_rows != rows:  # unreadable, or not this file's rows
                copy.unlink(missing_ok=True)
                copy, metadata = None, None
        ids, parents, approvals, is_approval = (
            np.concatenate([part[at] for part in hashes]) if hashes else np.empty(0, np.bool_ if at == 3 else np.uint64)
            for at in range(4)
        )
        return _File(path, size, mtime, copy, metadata or parquet.metadata, ids, parents, approvals, is_approval)

    def warm(self) -> None:
        """``refresh`` for a background thread: a failure is logged, and the next lookup refreshes (and raises)."""
        try:
            self.refresh()
        except Exception:
            log.warning("building the task-tree index failed; it is retried at the next lookup", exc_info=True)

    # -- lookups -----------------------------------------------------------------------------------------------

    def locate(self, event_id: str) -> dict[Path, dict[int, int]] | None:
        """The rows (file -> row -> expected event id hash) of the event's task tree and its approval; None if the
        index does not know the event."""
        self.refresh()
        with self._lock:
            lookups = (self._merged, self._recent)
            paths = {number: f.path for number, f in self._files.values()}

        def find(table: str, keys: set[int]) -> list[tuple[int, ...]]:
            wanted = np.fromiter(keys, dtype=np.uint64, count=len(keys))
            return [hit for lookup in lookups for hit in _Lookup.find(getattr(lookup, table), wanted)]

        start = int(_hashes(pl.Series([event_id], dtype=pl.String))[0])
        found = find("by_id", {start})
        if not found:
            return None
        located: dict[Path, dict[int, int]] = {}

        def place(number: int, row: int, key: int) -> None:
            if number in paths:
                located.setdefault(paths[number], {})[row] = key

        for key, number, row, _, _ in found:
            place(number, row, key)
        seen = {start}
        parents = {parent for *_, parent, _ in found if parent} - seen
        while parents and len(seen) < MAX_TREE_EVENTS:
            seen |= parents
            hits = find("by_id", parents)
            for key, number, row, _, _ in hits:
                place(number, row, key)
            parents = {parent for *_, parent, _ in hits if parent} - seen
        frontier = {start}
        while frontier and len(seen) < 4 * MAX_TREE_EVENTS:
            children = find("by_parent", frontier)
            for _, number, row, key in children:
                place(number, row, key)
            frontier = {key for *_, key in children} - seen
            seen |= frontier
        approvals = {approval for *_, approval in found if approval}
        if approvals:
            for _, number, row, key in find("by_approval", approvals):
                place(number, row, key)
        return located

    def reader_of(self, event_ids: Sequence[str]) -> LakeReader | None:
        """A reader over just the rows of these events (without ``jws``: a finding's evidence), or None when the
        index is being built, does not know every one of them, or the lake changed under it (scan the lake)."""
        if self.building or not event_ids:
            return None
        self.refresh()
        with self._lock:
            lookups = (self._merged, self._recent)
            paths = {number: f.path for number, f in self._files.values()}
        wanted = np.unique(_hashes(pl.Series(list(event_ids), dtype=pl.String)))
        located: dict[Path, dict[int, int]] = {}
        known: set[int] = set()
        for lookup in lookups:
            for key, number, row, _, _ in _Lookup.find(lookup.by_id, wanted):
                if number in paths:
                    located.setdefault(paths[number], {})[row] = key
                    known.add(key)
        if len(known) < len(wanted):
            return None
        return self._reader_over(located)

    def reader_for(self, event_id: str) -> LakeReader:
        """A reader over just the rows of the event's task tree (without ``jws``), or the whole lake when the
        index does not know the event or the lake changed under it."""
        for _ in range(2):
            located = self.locate(event_id)
            if located is None:
                return self.reader
            reader = self._reader_over(located)
            if reader is not None:
                return reader
        log.warning("the task-tree index disagrees with the lake for %s; scanning the whole lake", event_id)
        return self.reader

    def _reader_over(self, located: dict[Path, dict[int, int]]) -> LakeReader | None:
        """A reader over exactly the located rows; None when a file no longer matches the index (it is read
        again at the next refresh)."""
        tables = {path: self._read_rows(path, rows) for path, rows in located.items()}
        stale = [path for path, table in tables.items() if table is None]
        if stale:
            with self._lock:
                for path in stale:
                    if path in self._files:
                        self._files[path][1].size = -1
            return None
        rows = pa.concat_tables([table for table in tables.values() if table is not None])
        return self.reader.pinned(sorted(located), rows=rows)

    def _read_rows(self, path: Path, rows: dict[int, int]) -> pa.Table | None:
        """Those rows of the file as the lake reads them (``jws`` null); None if they do not match the index."""
        with self._lock:
            known = self._files.get(path)
        if known is None:
            return None
        indexed = known[1]
        wanted = np.array(sorted(rows), dtype=np.int64)
        metadata = indexed.metadata
        sizes = np.array([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, wanted, side="right") - 1
        groups = sorted(set(group_of.tolist()))
        source = indexed.copy if indexed.copy is not None else path
        try:
            part = pq.ParquetFile(source, metadata=metadata).read_row_groups(
                groups, columns=_COPY_COLUMNS, use_threads=False
            )
        except (OSError, ValueError):
            return None
        placed, at = {}, 0
        for group in groups:  # where each group's rows begin in ``part``
            placed[group], at = at, at + int(sizes[group])
        local = [placed[g] + int(row - starts[g]) for row, g in zip(wanted.tolist(), group_of.tolist(), strict=True)]
        table = part.take(local)
        expected = np.array([rows[row] for row in wanted.tolist()], dtype=np.uint64)
        if not np.array_equal(expected, _hashes(pl.Series(table.column("event_id")))):
            return None
        count = table.num_rows
        tenant, day = partition_of_file(path)
        return (
            table.append_column("jws", pa.nulls(count, pa.string()))
            .select(EVENT_SCHEMA.names)
            .cast(EVENT_SCHEMA)
            .append_column("tenant", pa.array([tenant] * count, pa.string()))
            .append_column("date", pa.array([day] * count, pa.date32()))
        )

    def close(self) -> None:
        with self._lock:
            self._files.clear()
            self._apart.clear()
            self._merged = self._recent = _Lookup.of([])


def _give_back_memory() -> None:
    """Return the build's freed memory to the kernel: glibc keeps freed blocks of the many mid-sized per-file arrays
    in its heap (10M events: RSS 1.39 -> 0.97 GB after the merge), and Arrow's pool keeps its own."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
