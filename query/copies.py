"""Derived per-file copies kept beside the lake, in ``<data-dir>/index/<kind>/``.

A copy holds some of one lake file's rows laid out for one kind of query (the task-tree index's row copies, the
blast radius's reach copies). It is named after the lake file's path, size and modification time, so a file that
changes gets a new name and its old copy is never read again; copies of files that are gone are removed. Copies
are written atomically (a temporary name, then a rename); where the data dir is read-only none are written and the
readers read the lake file instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["CopyDir"]

log = logging.getLogger(__name__)


class CopyDir:
    def __init__(self, directory: Path, events_dir: Path) -> None:
        self.directory = directory
        self.events_dir = events_dir

    def name(self, path: Path, size: int, mtime: int) -> Path:
        """Where the copy of lake file ``path`` at this size and modification time (ns) lives."""
        relative = str(path.relative_to(self.events_dir))
        return self.directory / f"{hashlib.sha256(relative.encode()).hexdigest()[:24]}-{size}-{mtime}.parquet"

    def write(self, copy: Path, table: pa.Table, *, row_group_size: int) -> Path | None:
        """Write ``table`` as ``copy``; None (logged) when the directory cannot take it."""
        temporary = copy.with_name(f".{copy.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, temporary, compression="zstd", row_group_size=row_group_size)
            os.replace(temporary, copy)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            log.info("no copy %s (%s); its rows are read from the lake file", copy, exc)
            return None
        return copy

    def remove_except(self, kept: set[str]) -> None:
        """Remove the copies not named in ``kept`` (of files gone or changed, left by this or another process)."""
        try:
            names = [entry.name for entry in os.scandir(self.directory) if entry.name.endswith(".parquet")]
        except OSError:
            return
        for name in names:
            if name not in kept:
                (self.directory / name).unlink(missing_ok=True)
