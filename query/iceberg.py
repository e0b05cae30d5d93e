"""The lake as an Apache Iceberg table (pyiceberg), so that any Iceberg engine (Trino, Athena, Spark, Snowflake,
DuckDB) reads it without Custody code: ``custody.events``, the lake's columns plus ``tenant`` and ``date``,
partitioned by both (identity).

The table follows the lake by log index: each sync appends the lake's events after the highest log index the table
holds, up to the first gap (a WAL segment not yet written), in one Iceberg snapshot whose summary carries
``custody.log-index-max``. The append and that number commit together, so a crash at any point neither loses nor
duplicates an event, and a sync run twice appends nothing. ``custody serve --iceberg`` syncs after every flush (one
snapshot per flush batch); ``custody iceberg sync`` catches up by hand; ``expire`` drops snapshots past a retention;
``compact`` rewrites partitions of many small files (one per flush) as one file each.

The catalog is SQL (pyiceberg's SqlCatalog): SQLite beside the lake by default (``<data-dir>/iceberg``), or any
SQLAlchemy URI (PostgreSQL) with ``catalog_uri``; the warehouse is a local directory or an object-store URI.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.expressions import And, EqualTo
from pyiceberg.table import Table

from query.lake import LakeReader
from store.ground.layout import DataDir

__all__ = ["Compacted", "IcebergMirror", "Synced"]

log = logging.getLogger("custody.iceberg")
NAMESPACE, TABLE = "custody", "events"
LOG_INDEX_MAX = "custody.log-index-max"
_BATCH = 500_000  # events per snapshot at most (a long catch-up is several snapshots)


_RETRIES = "commit.retry.num-retries"
_NO_RETRIES = {_RETRIES: "0"}


def _log_index_max(table: Table | None) -> int:
    """The highest log index a snapshot's rows hold, from its summary (-1: none)."""
    snapshot = None if table is None else table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return -1
    return int(snapshot.summary.additional_properties.get(LOG_INDEX_MAX, -1))


@dataclass(frozen=True)
class Synced:
    appended: int
    log_index_max: int
    snapshots: int


# pyiceberg's expressions take (term, literal) at run time; the signature its pydantic models show type checkers
# differs between type-checker setups, so it is called untyped here.
_equal: Any = EqualTo


@dataclass(frozen=True)
class Compacted:
    partitions: int  # rewritten, one data file each
    files: int  # the data files they held before


class IcebergMirror:
    def __init__(self, data_dir: Path, *, catalog_uri: str | None = None, warehouse: str | None = None) -> None:
        self.data_dir = data_dir
        self.lake = LakeReader(data_dir)
        home = DataDir(data_dir).root / "iceberg"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.catalog = SqlCatalog(
            "custody",
            uri=catalog_uri or f"sqlite:///{home / 'catalog.db'}",
            warehouse=warehouse or (home / "warehouse").as_uri(),
        )
        self._lock = threading.Lock()  # one sync at a time in this process

    def table(self) -> Table | None:
        try:
            table = self.catalog.load_table(f"{NAMESPACE}.{TABLE}")
        except NoSuchTableError:
            return None
        if table.properties.get(_RETRIES) != "0":  # a table created before: no rebased appends from now on
            with table.transaction() as transaction:
                transaction.set_properties(_NO_RETRIES)
            table = self.catalog.load_table(f"{NAMESPACE}.{TABLE}")
        return table

    def log_index_max(self) -> int:
        return _log_index_max(self.table())

    def sync(self) -> Synced:
        """Append the lake's events after the table's log index, up to the first gap, a snapshot per batch.

        Exactly once with other writers too (another node's sync, ``custody iceberg sync`` beside ``serve
        --iceberg``): the log index is read from the very snapshot the append is based on, and a commit made
        meanwhile by anyone makes this one fail (pyiceberg's own retries, which would rebase the append onto the
        newer snapshot and so add its rows twice, are turned off for this table), after which it starts over from
        the table as it then is."""
        with self._lock:
            appended, snapshots, newest = 0, 0, -1
            while True:
                table = self.table()
                newest = _log_index_max(table)
                rows = self._after(newest)
                if rows.num_rows == 0:
                    break
                try:
                    table = table or self._create(rows.schema)
                    table.append(rows, snapshot_properties={LOG_INDEX_MAX: str(int(rows["log_index"][-1].as_py()))})
                except (CommitFailedException, TableAlreadyExistsError):
                    continue  # another writer committed first: its rows are in, read the table again
                newest = int(rows["log_index"][-1].as_py())
                appended, snapshots = appended + rows.num_rows, snapshots + 1
                if rows.num_rows < _BATCH:
                    break
            return Synced(appended, newest, snapshots)

    def expire(self, older_than: datetime) -> int:
        """Drop the snapshots taken before ``older_than`` (never the current one); returns how many went."""
        table = self.table()
        if table is None:
            return 0
        before = len(table.snapshots())
        table.maintenance.expire_snapshots().older_than(older_than).commit()
        return before - len(self.table().snapshots())  # type: ignore[union-attr]

    def compact(self, *, min_files: int = 8) -> Compacted:
        """Rewrite each partition (tenant, date) of the current snapshot that holds at least ``min_files`` data
        files as one file, in one overwrite snapshot each (readers see the old files or the new one, never both).
        Each snapshot keeps ``custody.log-index-max``; a sync committed meanwhile makes the overwrite fail
        (Iceberg's optimistic concurrency), and it is tried again at the next compaction."""
        with self._lock:
            table = self.table()
            if table is None or table.current_snapshot() is None:
                return Compacted(0, 0)
            files = table.inspect.files().select(["partition"]).to_pylist()
            counts = Counter((row["partition"]["tenant"], row["partition"]["date"]) for row in files)
            partitions = files_before = 0
            for (tenant, day), count in sorted(counts.items()):
                if count < min_files:
                    continue
                where = And(_equal("tenant", tenant), _equal("date", str(day)))
                rows = table.scan(row_filter=where).to_arrow()
                newest = str(_log_index_max(table))
                try:
                    table.overwrite(rows, overwrite_filter=where, snapshot_properties={LOG_INDEX_MAX: newest})
                except CommitFailedException:  # a sync committed meanwhile: this partition waits for next time
                    table = self.table() or table
                    continue
                table = self.table() or table
                partitions, files_before = partitions + 1, files_before + count
            return Compacted(partitions, files_before)

    def _after(self, newest: int) -> pa.Table:
        """The lake's events after log index ``newest`` in log order, up to the first gap."""
        with self.lake.connect() as connection:
            rows: pa.Table = connection.sql(
                f"SELECT * FROM all_events WHERE log_index > {int(newest)} ORDER BY log_index LIMIT {_BATCH}"
            ).to_arrow_table()
        indexes = rows["log_index"].to_pylist()
        run = 0
        while run < len(indexes) and indexes[run] == newest + 1 + run:
            run += 1
        return rows.slice(0, run)

    def _create(self, schema: pa.Schema) -> Table:
        try:
            self.catalog.create_namespace(NAMESPACE)
        except NamespaceAlreadyExistsError:
            pass
        except Exception:  # the SQL catalog checks, then inserts: another writer's insert in between fails this one
            if not self.catalog.namespace_exists(NAMESPACE):
                raise
        table = self.catalog.create_table(f"{NAMESPACE}.{TABLE}", schema=schema, properties=_NO_RETRIES)
        with table.update_spec() as spec:
            spec.add_identity("tenant")
            spec.add_identity("date")
        log.info("created the Iceberg table %s.%s at %s", NAMESPACE, TABLE, table.location())
        return table
