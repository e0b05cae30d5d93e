"""The durable spool: every signed event is on disk before ``emit`` returns, until Custody has acknowledged it.

A spool is a directory of numbered segment files of framed records (``<u32 length><u32 crc32(body)><body>``,
body = JSON ``[seq, event_id, event_hash, jws]``), appended with ``O_APPEND`` and fdatasync'd per append, and a
``cursor.json`` naming the first record not yet acknowledged (written atomically and fsync'd after each
acknowledged batch). Opening a spool cuts a torn last record (a crash mid-append: ``emit`` never returned for it),
reloads the unacknowledged records in order and the chain head (the last record), so an emitter resumes at the
right ``seq``. Segments wholly acknowledged are deleted. A spool never holds more than ``max_bytes`` of events
Custody has not acknowledged: ``append`` then raises ``SpoolFull`` (or, with ``when_full="block"``, waits for the
sender to make room). On disk it takes at most that plus one segment (``segment_bytes``, by default an eighth of
``max_bytes`` and at most 16 MiB) of events already acknowledged.

``reserve`` sets room aside before the event exists: a gateway that must not act without an audit record
("no audit, no action") reserves before it forwards a call and writes the event into the reservation afterwards,
so a spool that fills up meanwhile cannot leave an action unrecorded.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolFull", "SpooledEvent"]

_FRAME = struct.Struct("<II")
_SUFFIX = ".seg"


class SpoolFull(Exception):
    """The spool holds ``max_bytes`` of events Custody has not acknowledged; nothing was appended."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    seq: int
    event_id: str
    event_hash: str
    jws: str


class Spool:
    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int | None = None,
        when_full: str = "raise",
    ) -> None:
        if when_full not in ("raise", "block"):
            raise ValueError(f"when_full must be 'raise' or 'block', not {when_full!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes, self.when_full = max_bytes, when_full
        self.segment_bytes = segment_bytes or min(16 << 20, max(64 << 10, max_bytes // 8))
        self._lock = threading.Condition()
        # (event, its segment, the offset after it, its frame's size)
        self._unsent: deque[tuple[SpooledEvent, int, int, int]] = deque()
        self._written: deque[tuple[SpooledEvent, int, int, int]] = deque()  # written, not yet known to be on disk
        self._durable: tuple[int, int] = (0, 0)  # (segment, offset) up to which the spool is on disk
        self._syncing = False
        self.head: tuple[int, str] | None = None  # (seq, event hash) of the last event appended
        self._fd: int | None = None
        self._active = 0
        self._size = 0
        self._held = 0  # bytes of segment files on disk
        self._owed = 0  # bytes of the events Custody has not acknowledged: what max_bytes bounds
        self._reserved = 0  # bytes set aside by reserve() for events not written yet
        self._recover()

    # -- opening ------------------------------------------------------------------------------------------------

    def _segments(self) -> list[int]:
        return sorted(int(path.stem) for path in self.directory.glob(f"*{_SUFFIX}") if path.stem.isdigit())

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:012d}{_SUFFIX}"

    def _recover(self) -> None:
        cursor = self._read_cursor()
        segments = self._segments()
        for number in segments:
            data = self._path(number).read_bytes()
            offset = 0
            while offset + _FRAME.size <= len(data):
                length, crc = _FRAME.unpack_from(data, offset)
                body = data[offset + _FRAME.size : offset + _FRAME.size + length]
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                seq, event_id, digest, jws = json.loads(body)
                offset += _FRAME.size + length
                event = SpooledEvent(seq, event_id, digest, jws)
                self.head = (seq, digest)
                if (number, offset) > cursor:
                    self._unsent.append((event, number, offset, _FRAME.size + length))
                    self._owed += _FRAME.size + length
            if offset < len(data):
                if number != segments[-1]:
                    raise ValueError(f"spool segment {self._path(number)} is damaged before its end")
                with self._path(number).open("r+b") as handle:  # a torn append: emit never returned for it
                    handle.truncate(offset)
                    os.fsync(handle.fileno())
        self._active = segments[-1] if segments else 1
        self._fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._held = sum(self._path(number).stat().st_size for number in self._segments())
        self._durable = (self._active, self._size)
        _fsync_directory(self.directory)

    def _read_cursor(self) -> tuple[int, int]:
        try:
            cursor = json.loads((self.directory / "cursor.json").read_text())
        except FileNotFoundError:
            return (0, 0)
        return (int(cursor["segment"]), int(cursor["offset"]))

    # -- appending ----------------------------------------------------------------------------------------------

    def append(self, event: SpooledEvent) -> None:
        """Write ``event`` and return once it is on disk."""
        self.wait_durable(self.write(event))

    def reserve(self, nbytes: int) -> None:
        """Set ``nbytes`` aside for a later ``write(..., reserved=nbytes)``; SpoolFull (or wait) if there is no room.
        Give unused room back with ``release``."""
        with self._lock:
            self._make_room(nbytes)
            self._reserved += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes
            self._lock.notify_all()

    def _make_room(self, nbytes: int) -> None:
        """Under the lock: return once ``nbytes`` more fit in ``max_bytes``, or raise SpoolFull."""
        while self._owed + self._reserved + nbytes > self.max_bytes:
            if self.when_full == "raise":
                raise SpoolFull(
                    f"the spool {self.directory} holds {self._owed:,} bytes Custody has not acknowledged"
                    f" and {self._reserved:,} reserved (max_bytes {self.max_bytes:,})"
                )
            self._lock.wait(1.0)

    def write(self, event: SpooledEvent, *, reserved: int = 0) -> tuple[int, int]:
        """Write ``event`` (in the order of the calls) and return its place, for ``wait_durable``. Writers that
        arrive while an fdatasync runs share the next one (group commit): threads emitting at once are not
        serialized on the disk. ``reserved``: room set aside by ``reserve`` for this event, used (or given back)
        now; an event larger than its reservation still needs the difference."""
        body = json.dumps([event.seq, event.event_id, event.event_hash, event.jws], separators=(",", ":")).encode()
        frame = _FRAME.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            self._reserved -= reserved
            try:
                self._make_room(len(frame))
            except SpoolFull:
                self._reserved += reserved
                raise
            if self._size + len(frame) > self.segment_bytes and self._size > 0:
                self._rotate()
            assert self._fd is not None
            os.write(self._fd, frame)
            self._size += len(frame)
            self._held += len(frame)
            self._owed += len(frame)
            self._written.append((event, self._active, self._size, len(frame)))
            self.head = (event.seq, event.event_hash)
            return (self._active, self._size)

    def wait_durable(self, place: tuple[int, int]) -> None:
        """Return once everything written up to ``place`` is on disk (leading an fdatasync if none is running)."""
        with self._lock:
            while self._durable < place:
                if self._syncing:
                    self._lock.wait()
                    continue
                self._syncing = True
                target = (self._active, self._size)
                assert self._fd is not None
                fd = os.dup(self._fd)
                self._lock.release()
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                    self._lock.acquire()
                    self._syncing = False
                self._settle(target)
                self._lock.notify_all()

    def _settle(self, target: tuple[int, int]) -> None:
        """Under the lock: what was written up to ``target`` is durable, and the sender may see it."""
        self._durable = max(self._durable, target)
        while self._written and (self._written[0][1], self._written[0][2]) <= target:
            self._unsent.append(self._written.popleft())

    def _rotate(self) -> None:
        """Under the lock: the active segment, synced, is closed; the next one starts."""
        assert self._fd is not None
        os.fdatasync(self._fd)
        self._settle((self._active, self._size))
        os.close(self._fd)
        self._active += 1
        self._fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        _fsync_directory(self.directory)

    # -- sending ------------------------------------------------------------------------------------------------

    def unsent(self, limit: int) -> list[SpooledEvent]:
        with self._lock:
            return [event for event, _, _, _ in list(self._unsent)[:limit]]

    def wait_for_events(self, timeout: float) -> bool:
        with self._lock:
            if not self._unsent:
                self._lock.wait(timeout)
            return bool(self._unsent)

    def mark_sent(self, count: int) -> None:
        """The first ``count`` unsent events are acknowledged: move the cursor past them, durably."""
        if count <= 0:
            return
        with self._lock:
            for _ in range(count):
                _, segment, offset, size = self._unsent.popleft()
                self._owed -= size
            cursor = {"segment": segment, "offset": offset}
            temporary = self.directory / "cursor.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(cursor).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.directory / "cursor.json")
            for number in self._segments():
                if number < segment:  # wholly acknowledged
                    self._held -= self._path(number).stat().st_size
                    self._path(number).unlink(missing_ok=True)
            self._lock.notify_all()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._unsent)

    def bytes_held(self) -> int:
        """Bytes of spool segments on disk (acknowledged events stay until their whole segment is)."""
        return self._held

    def bytes_owed(self) -> int:
        """Bytes of the events Custody has not acknowledged (at most ``max_bytes``)."""
        return self._owed

    def wait_until_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._unsent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
