"""Write-ahead log: the durable record of every acknowledged event until it is in the Parquet lake.

A log is a directory of numbered segment files. Each ``append`` writes one batch of framed records and fsyncs once
(group commit: one fsync per request, not per event); only then may the caller acknowledge the batch. The flusher
``rotate``s the active segment, turns closed segments into Parquet, then ``remove``s them.

Frame: ``<u32 length><u32 crc32(body)><body>``, body = orjson ``[event_id, emitter, seq, event_hash, received_at_us,
kid, jws, log_index]`` (segments written before the transparency log have no ``log_index``). ``append`` numbers the
records it writes with consecutive log indexes, in the order they reach the file: the order of durable
acknowledgement. A write cut away after a failure gives its indexes back, so the numbering never has a hole.
A torn frame at the end of a segment (a crash mid-write, never acknowledged) is cut off on recovery; a bad
frame followed by more data is corruption, and the segment is moved to ``quarantine/`` rather than trusted.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from store.ground.errors import StorageUnavailable

__all__ = ["WalRecord", "WriteAheadLog", "fsync_directory", "read_records"]

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")
_SUFFIX = ".wal"


@dataclass(frozen=True, slots=True)
class WalRecord:
    event_id: str
    emitter: str
    seq: int
    event_hash: str
    received_at_us: int
    kid: str
    jws: str
    log_index: int | None = None

    def encode(self, log_index: int | None = None) -> bytes:
        """The record's frame, numbered ``log_index`` (its own when None)."""
        index = self.log_index if log_index is None else log_index
        body = orjson.dumps(
            [self.event_id, self.emitter, self.seq, self.event_hash, self.received_at_us, self.kid, self.jws, index]
        )
        return _FRAME.pack(len(body), zlib.crc32(body)) + body

    def unnumbered(self) -> tuple[bytes, int]:
        """The body up to its log index, and that part's CRC: ``append`` finishes the frame under its lock with a
        few bytes and a CRC continued over them, not the whole record encoded there."""
        head = orjson.dumps(
            [self.event_id, self.emitter, self.seq, self.event_hash, self.received_at_us, self.kid, self.jws]
        )
        head = head[:-1] + b","
        return head, zlib.crc32(head)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """Segmented append-only log; thread-safe. Segment numbers never repeat (see ``first_segment``)."""

    def __init__(self, directory: Path, *, first_segment: int = 1, next_log_index: int = 0) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        self._lock = threading.Lock()  # the active segment: its fd, size, number, and writes to it
        self._active = max([first_segment - 1, *existing]) + 1
        self._fd: int | None = None
        self._size = 0
        # Group commit: one thread at a time fsyncs everything written so far, for every request waiting.
        self._sync = threading.Condition(threading.Lock())
        self._syncing = False
        self._durable: tuple[int, int] = (0, 0)  # (segment, offset) up to which writes are on disk
        self._failed: tuple[int, int] = (0, 0)  # writes up to here were cut away after a failed fsync
        self.next_log_index = next_log_index  # of the next record written (under the segment lock)
        self._index_at: dict[int, int] = {}  # active segment offset -> the log index of the record written there

    # -- reading ----------------------------------------------------------------------------------------------

    def segments(self) -> list[int]:
        """Numbers of the segment files on disk, oldest first."""
        return sorted(int(path.stem) for path in self.directory.glob(f"*{_SUFFIX}") if path.stem.isdigit())

    def read_segment(self, number: int, *, repair: bool = False) -> list[WalRecord]:
        """Every whole record of a segment. With ``repair``, a torn tail is truncated away on disk."""
        path = self.path(number)
        records, good = read_records(path)
        if repair and good < path.stat().st_size:
            self._cut_bad_tail(path, path.read_bytes(), good)
        return records

    def _cut_bad_tail(self, path: Path, data: bytes, offset: int) -> None:
        """Truncate what follows the last whole record: silently-ish for a torn write, with a quarantined copy
        and an error for anything else."""
        tail = len(data) - offset
        if _looks_torn(data, offset):
            log.warning(
                "wal %s: cutting a torn record of %d bytes at offset %d (never acknowledged)", path, tail, offset
            )
            with path.open("r+b") as handle:
                handle.truncate(offset)
                handle.flush()
                os.fsync(handle.fileno())
            return
        quarantine = self.directory / "quarantine"
        quarantine.mkdir(exist_ok=True)
        copy = quarantine / path.name
        copy.write_bytes(data)
        log.error(
            "wal %s: bad record at offset %d followed by %d more bytes; original kept at %s, using the %d good bytes",
            path,
            offset,
            tail,
            copy,
            offset,
        )
        with path.open("r+b") as handle:
            handle.truncate(offset)
            os.fsync(handle.fileno())

    # -- writing ----------------------------------------------------------------------------------------------

    def append(self, records: Sequence[WalRecord]) -> tuple[int, int]:
        """Write records and return once they are on disk: the segment they are in and the log index of the first
        (the rest follow it). Raises StorageUnavailable, and then none of them will ever be read back.

        Group commit: the write happens under the segment lock, the fsync after it. Requests that wrote while an
        fsync was running wait for the next one, which a single thread runs for all of them: under concurrent
        requests there is one fsync per group, never more than one per request, and a request never waits for the
        segment lock while another request's fsync runs."""
        heads = [record.unnumbered() for record in records]
        with self._lock:
            try:
                fd = self._open_active()
            except OSError as exc:
                raise StorageUnavailable(f"cannot open write-ahead log segment: {exc.strerror}") from exc
            start = self._size
            first = self.next_log_index
            frames = b"".join(_numbered(head, crc, first + number) for number, (head, crc) in enumerate(heads))
            try:
                view = memoryview(frames)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError as exc:
                self._abandon_tail(fd, start)
                raise StorageUnavailable(f"cannot persist to the write-ahead log: {exc.strerror}") from exc
            self._index_at[start] = first
            self._size = start + len(frames)
            self.next_log_index = first + len(records)
            mine = (self._active, self._size)
        self._wait_durable(mine)
        return mine[0], first

    def _wait_durable(self, mine: tuple[int, int]) -> None:
        while True:
            with self._sync:
                while True:
                    if self._durable >= mine:
                        return
                    if self._failed >= mine:
                        raise StorageUnavailable("cannot persist to the write-ahead log: fsync failed")
                    if not self._syncing:
                        self._syncing = True
                        break
                    self._sync.wait()
            self._lead_sync()

    def _lead_sync(self) -> None:
        """fsync everything written to the active segment so far, for every waiting request."""
        durable = None
        try:
            with self._lock:
                target = (self._active, self._size)
                fd = None if self._fd is None else os.dup(self._fd)  # rotate() may close the original meanwhile
            if fd is None:  # rotated: rotate() synced the segment before closing it
                return
            try:
                os.fdatasync(fd)  # the data and the file size, which is all a reader needs
                durable = target
            except OSError as exc:
                log.error("wal segment %d: fsync failed: %s", target[0], exc)
                with self._lock:
                    self._fail_unsynced()
            finally:
                os.close(fd)
        finally:
            self._settle(durable=durable, lead_done=True)

    def _settle(
        self, *, durable: tuple[int, int] | None = None, failed: tuple[int, int] | None = None, lead_done: bool = False
    ) -> None:
        """Record what is now on disk, or cut away, and wake every request waiting on it."""
        with self._sync:
            if durable is not None:
                self._durable = max(self._durable, durable)
            if failed is not None:
                self._failed = max(self._failed, failed)
            if lead_done:
                self._syncing = False
            self._sync.notify_all()

    def _fail_unsynced(self) -> None:
        """Under the segment lock, after a failed fsync: nothing written since the last good fsync may count as
        durable. Cut it away, start a new segment, and fail every request that wrote it."""
        if self._fd is None:
            return
        with self._sync:
            durable_segment, durable_offset = self._durable
        self._abandon_tail(self._fd, durable_offset if durable_segment == self._active else 0)

    def _open_active(self) -> int:
        """The active segment's fd; created here only if ``rotate`` could not create it ahead."""
        if self._fd is None:
            self._fd = self._create(self._active)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _create(self, number: int) -> int:
        """Open (creating) a segment, its entry in the directory on disk. Two fsyncs: ``rotate`` runs this for the
        next segment outside the lock, so that no request waits for them."""
        fd = os.open(self.path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fsync(fd)
            fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _abandon_tail(self, fd: int, start: int) -> None:
        """After a failed write or fsync (under the segment lock): cut the file back to ``start`` so nothing
        unacknowledged can resurface, and start a new segment. Writes up to ``start`` stay (durable once this
        fsync succeeds); every other write to this segment fails."""
        kept = True
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError as exc:
            kept = False
            log.error(
                "wal segment %d: could not cut back to %d bytes after a failed write: %s", self._active, start, exc
            )
        self._settle(durable=(self._active, start) if kept else None, failed=(self._active, max(self._size, start)))
        self.next_log_index = self._index_at.get(start, self.next_log_index)  # the cut writes' indexes are free again
        self._index_at.clear()
        os.close(fd)
        self._fd = None
        self._active += 1
        self._size = 0

    def rotate(self, *, open_next: bool = True) -> int | None:
        """Close the active segment if it holds records; return its number (ready to flush) or None. Everything
        in it is on disk first, so that a flush never moves into the lake a write that could still fail. With
        ``open_next``, the next segment is created first, outside the lock, and becomes the active one."""
        with self._lock:
            if self._fd is None or self._size == 0:
                return None
            upcoming = self._active + 1
        spare = None
        if open_next:
            try:
                spare = self._create(upcoming)
            except OSError as exc:  # the first append will try again, and fail its request if it must
                log.warning("wal segment %d: cannot create it ahead: %s", upcoming, exc.strerror)
        with self._lock:
            closed = None
            if self._fd is not None and self._size > 0:
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    log.error("wal segment %d: fsync before closing failed: %s", self._active, exc)
                    self._fail_unsynced()
                else:
                    self._settle(durable=(self._active, self._size))
                    self._index_at.clear()
                    os.close(self._fd)
                    closed = self._active
                    self._fd = None
                    self._active += 1
            if spare is not None:
                if self._fd is None and self._active == upcoming:
                    self._fd, self._size = spare, 0
                else:  # a failed write moved on meanwhile: this file stays empty, and the replay deletes it
                    os.close(spare)
            return closed

    @property
    def active_segment(self) -> int:
        return self._active

    def remove(self, number: int) -> None:
        self.path(number).unlink(missing_ok=True)
        fsync_directory(self.directory)

    def close(self) -> None:
        self.rotate(open_next=False)  # what was written is on disk (or its requests fail) before it is closed
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def path(self, number: int) -> Path:
        return self.directory / f"{number:012d}{_SUFFIX}"


def _numbered(head: bytes, crc: int, log_index: int) -> bytes:
    tail = b"%d]" % log_index
    return _FRAME.pack(len(head) + len(tail), zlib.crc32(tail, crc)) + head + tail


def read_records(path: Path) -> tuple[list[WalRecord], int]:
    """The whole records at the start of a segment file, and how many bytes they span."""
    data = path.read_bytes()
    records: list[WalRecord] = []
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        body = data[offset + _FRAME.size : offset + _FRAME.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        records.append(WalRecord(*orjson.loads(body)))
        offset += _FRAME.size + length
    return records, offset


def _looks_torn(data: bytes, offset: int) -> bool:
    """A torn write leaves one incomplete frame at the very end; anything after a complete bad frame is not torn."""
    if offset + _FRAME.size > len(data):
        return True
    length: int = _FRAME.unpack_from(data, offset)[0]
    return offset + _FRAME.size + length > len(data)
