"""Derived per-file copies kept beside the lake, in ``<data-dir>/index/<kind>/``.

A copy holds some of one lake file's rows laid out for one kind of query (the task-tree index's row copies, the
blast radius's reach copies). It is named after the lake file's path, size and modification time, so a file that
changes gets a new name and its old copy is never read again; copies of files that are gone are removed. Copies
are written atomically (a temporary name, then a rename); where the data dir is read-only none are written and the
readers read the lake file instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from store.ground.layout import SYSTEM_TENANT
from store.lake_files import partition_of_file

__all__ = ["BackgroundRefresh", "CopyDir", "CopyWriter"]

log = logging.getLogger(__name__)


class BackgroundRefresh:
    """Calling it runs ``refresh`` in a background thread, unless one is running; a failure is logged (as
    ``what``) and retried at the next call."""

    def __init__(self, refresh: Callable[[], object], name: str, what: str) -> None:
        self._refresh, self._name, self._what = refresh, name, what
        self._running = threading.Lock()

    def __call__(self) -> None:
        if not self._running.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self._refresh()
            except Exception:
                log.warning("%s failed; retried next time", self._what, exc_info=True)
            finally:
                self._running.release()

        threading.Thread(target=run, name=self._name, daemon=True).start()


class CopyDir:
    def __init__(self, directory: Path, events_dir: Path) -> None:
        self.directory = directory
        self.events_dir = events_dir

    def name(self, path: Path, size: int, mtime: int) -> Path:
        """Where the copy of lake file ``path`` at this size and modification time (ns) lives."""
        relative = str(path.relative_to(self.events_dir))
        return self.directory / f"{hashlib.sha256(relative.encode()).hexdigest()[:24]}-{size}-{mtime}.parquet"

    def current(self, path: Path) -> Path | None:
        """The name of the copy of lake file ``path`` as it is now; None once it is gone (compacted away)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return self.name(path, stat.st_size, stat.st_mtime_ns)

    def live(self, files: list[Path]) -> list[tuple[Path, Path]]:
        """(lake file, the name of its current copy) of each of ``files`` outside the server's own stream."""
        named = [(path, self.current(path)) for path in files if partition_of_file(path)[0] != SYSTEM_TENANT]
        return [(path, copy) for path, copy in named if copy is not None]

    def writer(self, copy: Path, schema: pa.Schema, *, row_group_size: int) -> CopyWriter:
        """A copy written a part at a time (``add``), renamed into place by ``finish``."""
        return CopyWriter(self.directory, copy, schema, row_group_size)

    def remove_except(self, kept: set[str]) -> None:
        """Remove the copies not named in ``kept`` (of files gone or changed, left by this or another process)."""
        try:
            names = [entry.name for entry in os.scandir(self.directory) if entry.name.endswith(".parquet")]
        except OSError:
            return
        for name in names:
            if name not in kept:
                (self.directory / name).unlink(missing_ok=True)


class CopyWriter:
    """A copy being written: parts go to a temporary file as they come. If the directory cannot take them (read
    only, full) the writer logs it once and ignores the rest: the caller reads on, and gets None from ``finish``."""

    def __init__(self, directory: Path, copy: Path, schema: pa.Schema, row_group_size: int) -> None:
        self.copy = copy
        self._row_group_size = row_group_size
        self._temporary = copy.with_name(f".{copy.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._writer: pq.ParquetWriter | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._temporary, schema, compression="zstd")
        except OSError as exc:
            self._failed(exc)

    def add(self, table: pa.Table) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write_table(table, row_group_size=self._row_group_size)
        except OSError as exc:
            self._failed(exc)

    def metadata(self, values: dict[bytes, bytes]) -> None:
        """Key-value metadata for the file's footer (known once every part was added)."""
        if self._writer is not None:
            self._writer.add_key_value_metadata(values)

    def finish(self) -> Path | None:
        if self._writer is None:
            return None
        try:
            self._writer.close()
            os.replace(self._temporary, self.copy)
        except OSError as exc:
            self._failed(exc)
            return None
        return self.copy

    def _failed(self, exc: OSError) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        self._temporary.unlink(missing_ok=True)
        log.info("no copy %s (%s); its rows are read from the lake file", self.copy, exc)
