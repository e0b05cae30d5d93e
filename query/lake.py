"""Read-only DuckDB access to the lake, from any process, while the ingest server writes.

Each query opens a fresh connection (a cursor of the process's in-memory DuckDB database) with its own views over
the live files of ``<data-dir>/lake/events/``, listed anew (for a lake on object storage, that directory is a copy
refreshed first: ``store.object_lake``): new Parquet files (flushed about every second) are
visible to the next query, no query sees another's views, and nothing is ever written to the lake. The
``events`` view hides the server's own stream (tenant ``_system``); ``all_events`` has it.
User input only ever reaches DuckDB as bound parameters.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from store.ground.layout import SYSTEM_TENANT, DataDir
from store.lake_files import HIVE_OPTIONS, live_files
from store.object_lake import refresh
from store.schema import EVENT_SCHEMA

__all__ = ["LakeReader", "open_duckdb", "sql_paths"]

# Where DuckDB spills when a query outgrows its memory limit: the system's temporary directory, never the
# process's working directory (DuckDB's default for an in-memory database is ./.tmp) and never the data dir.
SPILL_DIR = Path(tempfile.gettempdir()) / f"custody-duckdb-{os.getuid()}"


_instances: dict[str | None, duckdb.DuckDBPyConnection] = {}
_instances_lock = threading.Lock()


def open_duckdb(memory_limit: str | None = "1GB") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection as every reader uses it: 2 threads, a memory limit (None: DuckDB's default, 80% of RAM),
    UTC, and a private spill dir.

    It is a cursor of one in-memory database per memory limit, kept for the life of the process: opening a new
    database costs about 28 ms here, a cursor about 0.1 ms, and a dashboard page or read-API call opens several.
    Cursors share nothing a query creates (views and macros are ``TEMP``, registered tables are per cursor), may
    run in parallel threads, and share the instance's memory limit."""
    with _instances_lock:
        instance = _instances.get(memory_limit)
        if instance is None:
            SPILL_DIR.mkdir(mode=0o700, exist_ok=True)
            config: dict[str, str | bool | int | float | list[str]] = {"threads": 2, "temp_directory": str(SPILL_DIR)}
            if memory_limit is not None:
                config["memory_limit"] = memory_limit
            instance = _instances[memory_limit] = duckdb.connect(config=config)
    connection = instance.cursor()
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def sql_paths(paths: Iterable[Path]) -> str:
    """Paths as a SQL list body for ``read_parquet([...])``. They come from the operator's --data-dir, never from
    a request; quotes are doubled anyway."""
    return ", ".join("'" + str(path).replace("'", "''") + "'" for path in paths)


class LakeReader:
    def __init__(self, data_dir: Path, *, files: list[Path] | None = None, rows: pa.Table | None = None) -> None:
        self.data_dir = data_dir
        self.events_dir = DataDir(data_dir).events
        self._pinned = files
        self.rows = rows  # the selected rows this reader is limited to, if any

    def files(self) -> list[Path]:
        """The live Parquet files (a compaction in progress never shows an event twice), or the pinned ones."""
        if self._pinned is not None:
            return self._pinned
        refresh(self.data_dir)  # a lake on object storage: this data dir's copy brought up to date first
        return live_files(self.events_dir.glob("tenant=*/date=*/*.parquet"))

    def pinned(self, files: list[Path] | None = None, *, rows: pa.Table | None = None) -> LakeReader:
        """A reader over a fixed file list: ``files``, or today's live files (so that several queries see one
        snapshot of the log). With ``rows`` (those files' rows as the lake reads them, partition columns
        included), queries see only those rows: what the task-tree index hands a delegation path."""
        return LakeReader(self.data_dir, files=self.files() if files is None else files, rows=rows)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        connection = open_duckdb()
        try:
            files = self.files()
            if self.rows is not None:
                connection.register("selected_rows", self.rows)
                connection.execute("CREATE TEMP VIEW all_events AS SELECT * FROM selected_rows")
            elif files:
                connection.execute(
                    f"CREATE TEMP VIEW all_events AS SELECT * FROM read_parquet([{sql_paths(files)}], {HIVE_OPTIONS})"
                )
            else:
                empty = pa.table(
                    {name: pa.array([], type=EVENT_SCHEMA.field(name).type) for name in EVENT_SCHEMA.names}
                    | {"tenant": pa.array([], pa.string()), "date": pa.array([], pa.date32())}
                )
                connection.register("empty_lake", empty)
                connection.execute("CREATE TEMP VIEW all_events AS SELECT * FROM empty_lake")
            connection.execute(f"CREATE TEMP VIEW events AS SELECT * FROM all_events WHERE tenant <> '{SYSTEM_TENANT}'")
            yield connection
        finally:
            connection.close()
