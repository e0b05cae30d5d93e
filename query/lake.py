"""Read-only DuckDB access to the lake, from any process, while the ingest server writes.

Each query opens a fresh in-memory DuckDB connection over ``<data-dir>/lake/events/**/*.parquet``: new Parquet
files (flushed about every second) are visible to the next query, nothing is cached across queries, and nothing
is ever written. The ``events`` view hides the server's own stream (tenant ``_system``); ``all_events`` has it.
User input only ever reaches DuckDB as bound parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from store.engine import SYSTEM_TENANT
from store.lake import live_files
from store.schema import EVENT_SCHEMA

__all__ = ["LakeReader"]


class LakeReader:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.events_dir = data_dir / "lake" / "events"

    def files(self) -> list[Path]:
        """The live Parquet files (a compaction in progress never shows an event twice)."""
        return live_files(self.events_dir.glob("tenant=*/date=*/*.parquet"))

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        connection = duckdb.connect(config={"threads": 2, "memory_limit": "1GB"})
        try:
            connection.execute("SET TimeZone = 'UTC'")
            files = self.files()
            if files:
                # Paths come from the operator's --data-dir, never from a request; quotes are doubled anyway.
                listed = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
                connection.execute(
                    f"CREATE VIEW all_events AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true)"
                )
            else:
                empty = pa.table(
                    {name: pa.array([], type=EVENT_SCHEMA.field(name).type) for name in EVENT_SCHEMA.names}
                    | {"tenant": pa.array([], pa.string()), "date": pa.array([], pa.date32())}
                )
                connection.register("empty_lake", empty)
                connection.execute("CREATE VIEW all_events AS SELECT * FROM empty_lake")
            connection.execute(f"CREATE VIEW events AS SELECT * FROM all_events WHERE tenant <> '{SYSTEM_TENANT}'")
            yield connection
        finally:
            connection.close()
