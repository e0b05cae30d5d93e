"""An in-memory index of the task trees, so a delegation path reads a few files instead of scanning the lake per level.

A lookup by event id has no index in Parquet: each one scans the ``event_id`` column of every file (0.8 s at 10M
events), and a path needs one per tree level. ``TreeIndex`` keeps, for every event, its id, its parent and the file
it is in (about 40 bytes an event, in DuckDB's memory, for a long-running process such as the dashboard). A path
then asks the index which files hold the event, its ancestors, its descendants and its approval, and runs the
ordinary ``delegation_path`` over those files only: the same SQL, the same rows, so the same answer.

The index is built from the rows of the lake's live files (never from file metadata an attacker could edit apart
from the rows) and brought up to date before every use: new files are read, files gone (compacted away) are
dropped, and a file whose size or modification time changed is read again.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from query.lake import LakeReader, open_duckdb
from query.paths import MAX_TREE_EVENTS

__all__ = ["TreeIndex"]

log = logging.getLogger(__name__)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class TreeIndex:
    def __init__(self, reader: LakeReader, *, memory_limit: str = "1GB") -> None:
        self.reader = reader
        self._lock = threading.Lock()
        self._connection = open_duckdb(memory_limit)
        self._connection.execute(
            "CREATE TABLE tree (event_id UUID, parent UUID, approval VARCHAR, file INTEGER, is_approval BOOLEAN)"
        )
        self._known: dict[Path, tuple[int, int, int]] = {}  # path -> (file id, size, mtime_ns)
        self._next_id = 0

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
            stale = [p for p, (_, size, mtime) in self._known.items() if live.get(p) != (size, mtime)]
            if stale:
                ids = [self._known.pop(p)[0] for p in stale]
                self._connection.execute("DELETE FROM tree WHERE list_contains($ids, file)", {"ids": ids})
            fresh = [p for p in live if p not in self._known]
            for path in fresh:
                self._known[path] = (self._next_id, *live[path])
                self._next_id += 1
            if fresh:
                mapping = [(str(p), self._known[p][0]) for p in fresh]
                self._connection.execute("CREATE OR REPLACE TEMP TABLE fresh (name VARCHAR, id INTEGER)")
                self._connection.executemany("INSERT INTO fresh VALUES (?, ?)", mapping)
                self._connection.execute(
                    "INSERT INTO tree SELECT e.event_id::UUID, e.parent_event_id::UUID, e.approval_id, f.id,"
                    " e.type = 'task.approval' FROM read_parquet($files, filename = true) e"
                    " JOIN fresh f ON e.filename = f.name",
                    {"files": [name for name, _ in mapping]},
                )

    def warm(self) -> None:
        """``refresh`` for a background thread: a failure is logged, and the next lookup refreshes (and raises)."""
        try:
            self.refresh()
        except Exception:
            log.warning("building the task-tree index failed; it is retried at the next lookup", exc_info=True)

    def files_for(self, event_id: str) -> list[Path] | None:
        """The files holding the event's task tree (ancestors, descendants) and its approval; None if unknown."""
        if not _UUID.fullmatch(event_id):
            return None
        self.refresh()
        with self._lock:
            query = self._connection.execute
            found = query("SELECT parent, approval, file FROM tree WHERE event_id = $id", {"id": event_id}).fetchall()
            if not found:
                return None
            files = {row[2] for row in found}
            parents, seen = [row[0] for row in found if row[0] is not None], {event_id}
            while parents and len(seen) < MAX_TREE_EVENTS:
                rows = query(
                    "SELECT event_id, parent, file FROM tree WHERE list_contains($ids::UUID[], event_id)",
                    {"ids": [str(p) for p in parents if str(p) not in seen]},
                ).fetchall()
                seen.update(str(p) for p in parents)
                files.update(row[2] for row in rows)
                parents = [row[1] for row in rows if row[1] is not None and str(row[1]) not in seen]
            frontier = [event_id]
            while frontier and len(seen) < 4 * MAX_TREE_EVENTS:
                rows = query(
                    "SELECT event_id, file FROM tree WHERE list_contains($ids::UUID[], parent)",
                    {"ids": frontier},
                ).fetchall()
                frontier = [str(row[0]) for row in rows if str(row[0]) not in seen]
                seen.update(frontier)
                files.update(row[1] for row in rows)
            approvals = [row[1] for row in found if row[1] is not None]
            if approvals:
                rows = query(
                    "SELECT file FROM tree WHERE is_approval AND list_contains($ids, approval)", {"ids": approvals}
                ).fetchall()
                files.update(row[0] for row in rows)
            by_id = {known[0]: path for path, known in self._known.items()}
        return sorted(by_id[file] for file in files if file in by_id)

    def reader_for(self, event_id: str) -> LakeReader:
        """A reader over just the files of the event's tree, or the whole lake when the index does not know it."""
        files = self.files_for(event_id)
        return self.reader if files is None else self.reader.pinned(files)

    def close(self) -> None:
        self._connection.close()
