"""Hourly aggregates per lake file, for the whole-lake views (the overview with ``window=all`` over 10M events).

An *aggregate* of a lake file holds its rows counted by hour, by decision, agent, tool, emitter and user (five
groupings, ``GROUPED``). Summed over the live files they answer the overview's figures (events, emitters, agents,
users, denied, newest), its volume chart and its top lists from a few hundred rows an hour instead of every
event.

They are derived data in ``<data-dir>/index/aggregates/`` (``query.index.copies``): named after their file's path,
size and modification time, so a file that changes (a compaction) gets a new aggregate and the old one is never
read; one whose total differs from its file's row count is not used; files without a usable aggregate are read
from the lake in the same query, so an answer never depends on how far the aggregates have got, only its time.
A window that does not start or end on the hour takes its partial hours from the lake (a day's partition at most
at each end). Long-running readers ``warm`` them in the background, at start and whenever a query met a file
without one. Delete ``index/`` to have everything rebuilt from the lake; ``custody verify`` checks the lake.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from query.index.copies import BackgroundRefresh, CopyDir
from query.lake import LakeReader, sql_paths
from store.ground.layout import SYSTEM_TENANT, DataDir
from store.lake_files import HIVE_OPTIONS, partition_of_file

__all__ = ["GROUPED", "HOURLY", "LakeAggregates", "Layout", "Window"]

log = logging.getLogger(__name__)

# The rows of one file counted by hour, five ways (``kind`` tells which): by decision (the counts, the newest event,
# the volume chart), by agent and decision, by tool and decision (the top lists), by emitter and by user (the
# distinct counts). A few hundred rows an hour, whatever the events' other columns.
GROUPED = """
    SELECT tenant, date_trunc('hour', occurred_at) AS hour,
        CASE WHEN decision_result IN ('allow', 'deny') THEN decision_result ELSE 'other' END AS decision,
        agent, CASE WHEN tool_name IS NULL THEN NULL ELSE tool_server || '/' || tool_name END AS tool, emitter,
        "user", count(*) AS events, max(occurred_at) AS newest,
        CASE WHEN GROUPING(agent) = 0 THEN 'agent' WHEN GROUPING(tool) = 0 THEN 'tool'
             WHEN GROUPING(emitter) = 0 THEN 'emitter' WHEN GROUPING("user") = 0 THEN 'user'
             ELSE 'decision' END AS kind
    FROM {source}
    GROUP BY GROUPING SETS ((tenant, hour, decision), (tenant, hour, agent, decision), (tenant, hour, tool, decision),
        (tenant, hour, emitter), (tenant, hour, "user"))"""


@dataclass(frozen=True)
class Layout:
    """One kind of aggregate: its SQL over ``{source}`` (a file's rows, or the lake's rows of a window's edges),
    the column holding each row's time bucket (the start of its hour or its UTC day), where they are kept under
    ``index/``, and the metadata key holding the file's row count (naming the layout's version, so an aggregate
    of another version is refused and written again)."""

    sql: str
    bucket: str
    unit: str  # "hour" or "day"
    directory: str
    metadata: bytes


HOURLY = Layout(GROUPED, "hour", "hour", "aggregates", b"custody.aggregate.v2.rows")


@dataclass(frozen=True)
class Window:
    """What to read for a time window: whole buckets (hours or days) from the aggregates, the partial ones at each
    end from the lake (``edges``: [start, end) ranges)."""

    start: datetime | None  # first whole bucket (None: from the beginning)
    end: datetime | None  # end of the last whole bucket (None: to the end)
    edges: tuple[tuple[datetime, datetime], ...]

    @classmethod
    def of(cls, since: datetime | None, until: datetime | None, unit: str = "hour") -> Window:
        if since is not None and until is not None and _floor(until, unit) <= _ceil(since, unit):
            return cls(since, since, ((since, until),))  # no whole bucket: all of it from the lake
        start = None if since is None else _ceil(since, unit)
        end = None if until is None else _floor(until, unit)
        edges = []
        if since is not None and start is not None and since < start:
            edges.append((since, start))
        if until is not None and end is not None and end < until:
            edges.append((end, until))
        return cls(start, end, tuple(edges))


def _floor(moment: datetime, unit: str) -> datetime:
    floor = moment.replace(minute=0, second=0, microsecond=0)
    return floor.replace(hour=0) if unit == "day" else floor  # a UTC moment: the lake's times are UTC


def _ceil(moment: datetime, unit: str) -> datetime:
    floor = _floor(moment, unit)
    return floor if floor == moment else floor + (timedelta(days=1) if unit == "day" else timedelta(hours=1))


class LakeAggregates:
    def __init__(self, reader: LakeReader, layout: Layout = HOURLY) -> None:
        self.reader = reader
        self.layout = layout
        self.copies = CopyDir(DataDir(reader.data_dir).root / "index" / layout.directory, reader.events_dir)
        self._lock = threading.Lock()  # one refresh at a time
        self._checked: set[str] = set()  # aggregates whose total matched their file's rows
        # ``refresh`` in a background thread, unless one is running
        self.warm = BackgroundRefresh(self.refresh, f"lake-{layout.directory}", f"writing {layout.directory}")

    # -- writing ----------------------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Write the aggregates of live files that have none; remove those of files gone or changed. Returns how
        many were written."""
        written = 0
        with self._lock:
            live = self.copies.live(self.reader.files())
            for path, aggregate in live:
                if not aggregate.exists():
                    try:
                        self._write(path, aggregate)
                        written += 1
                    except FileNotFoundError:
                        pass  # compacted away since the listing
            names = {aggregate.name for _, aggregate in self.copies.live(self.reader.files())}
            self.copies.remove_except(names)
            self._checked &= names
        return written

    def _write(self, path: Path, aggregate: Path) -> None:
        rows = pq.read_metadata(path).num_rows
        source = f"read_parquet([{sql_paths([path])}], {HIVE_OPTIONS})"
        with self.reader.connect() as connection:
            table = connection.sql(self.layout.sql.format(source=source)).to_arrow_table()
        writer = self.copies.writer(aggregate, table.schema, row_group_size=64 * 1024)
        writer.add(table)
        writer.metadata({self.layout.metadata: str(rows).encode()})
        writer.finish()

    # -- reading ----------------------------------------------------------------------------------------------

    def split(self, files: list[Path]) -> tuple[list[Path], list[Path]]:
        """Of ``files`` (the system stream's left out): the usable aggregates, and the files to read instead."""
        usable: list[Path] = []
        rest: list[Path] = []
        for path in files:
            if partition_of_file(path)[0] == SYSTEM_TENANT:
                continue
            aggregate = self.copies.current(path)
            if aggregate is not None and self._usable(path, aggregate):
                usable.append(aggregate)
            else:
                rest.append(path)
        return usable, rest

    def _usable(self, path: Path, aggregate: Path) -> bool:
        if aggregate.name in self._checked:
            return True
        try:
            metadata = pq.read_metadata(aggregate)
            rows = pq.read_metadata(path).num_rows
        except (OSError, ValueError):
            return False
        recorded = (metadata.metadata or {}).get(self.layout.metadata)
        if recorded is None or int(recorded) != rows:
            log.warning("aggregate %s does not match %s; removed, the lake file is read instead", aggregate, path)
            aggregate.unlink(missing_ok=True)
            return False
        self._checked.add(aggregate.name)
        return True

    def facts(self, window: Window, tenant: str | None, files: list[Path]) -> tuple[str, list[Any], bool]:
        """A SQL relation of the grouped rows of ``window`` (the aggregates' whole hours, the lake's partial
        hours and files without an aggregate), its parameters, and whether any file lacked an aggregate."""
        usable, rest = self.split(files)
        sql = self.layout.sql
        parts: list[str] = []
        params: list[Any] = []
        hours, hour_params = _between(self.layout.bucket, window.start, window.end)
        scope = " AND tenant = ?" if tenant is not None else ""
        if usable:
            parts.append(f"SELECT * FROM read_parquet([{sql_paths(usable)}]) WHERE {hours}{scope}")
            params += [*hour_params, *([tenant] if tenant is not None else [])]
        if rest:
            raw = f"read_parquet([{sql_paths(rest)}], {HIVE_OPTIONS})"
            moments, moment_params = _between("occurred_at", window.start, window.end)
            parts.append(f"SELECT * FROM ({sql.format(source=f'(SELECT * FROM {raw} WHERE {moments}{scope})')})")
            params += [*moment_params, *([tenant] if tenant is not None else [])]
        for start, end in window.edges:
            source = (
                f"(SELECT * FROM events WHERE occurred_at >= ? AND occurred_at < ?"
                f" AND date BETWEEN ?::DATE AND ?::DATE{scope})"
            )
            parts.append(f"SELECT * FROM ({sql.format(source=source)})")
            params += [start, end, start.date(), end.date(), *([tenant] if tenant is not None else [])]
        if not parts:
            return "(SELECT * FROM (" + sql.format(source="events") + ") WHERE false)", [], False
        return "(" + " UNION ALL ".join(parts) + ")", params, bool(rest)


def _between(column: str, start: datetime | None, end: datetime | None) -> tuple[str, list[Any]]:
    clauses, params = ["true"], []
    if start is not None:
        clauses.append(f"{column} >= ?")
        params.append(start)
    if end is not None:
        clauses.append(f"{column} < ?")
        params.append(end)
    return " AND ".join(clauses), params
