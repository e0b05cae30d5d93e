"""The lake's row layout: one typed row per accepted event, derived from its signed payload.

``event_table`` turns the rows of ``store.rows`` (the one map from payloads to columns) into Arrow. The lake writer
uses it to build Parquet files and the verifier uses it to recompute every column from the stored ``jws``, so a
column edited on disk cannot pass. It works a batch at a time: Python picks the values out of each payload
(``row_values``), Arrow parses the timestamps and builds the columns, which costs a fraction of building typed rows
one by one.
``tenant`` and ``date`` are Hive partition keys: they live in the directory names, not inside the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from store.rows import COLUMN_SOURCES, LAKE_COLUMNS, Signed, delegation_chain, row_values

__all__ = [
    "EVENT_SCHEMA",
    "Signed",
    "delegation_chain",
    "event_table",
    "parse_timestamp",
    "partition_of",
    "rows_table",
]

_TS = pa.timestamp("us", tz="UTC")
_ARROW_TYPES = {
    "string": pa.string(),
    "strings": pa.list_(pa.string()),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "timestamp": _TS,
}

EVENT_SCHEMA = pa.schema(
    [
        pa.field(
            name,
            _ARROW_TYPES[kind],
            metadata={"custody.origin": COLUMN_SOURCES[name][0], "custody.source": COLUMN_SOURCES[name][1]},
        )
        for name, kind in LAKE_COLUMNS
    ]
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP_COLUMNS = frozenset(field.name for field in EVENT_SCHEMA if field.type == _TS)


def parse_timestamp(value: str | int) -> datetime:
    """An RFC 3339 UTC timestamp ending in ``Z`` (or integer epoch seconds) as an aware datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC)
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)


def partition_of(payload: dict[str, Any]) -> tuple[str, date]:
    """The (tenant, UTC date) partition an event belongs to."""
    return payload["tenant"], date.fromisoformat(payload["occurred_at"][:10])


def event_table(events: Iterable[Signed]) -> pa.Table:
    """The lake rows of ``events`` (partition columns excluded), in the order given."""
    return rows_table([row_values(event) for event in events])


def rows_table(rows: Sequence[tuple[Any, ...]]) -> pa.Table:
    """Rows of ``store.rows.row_values`` as a lake table."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in EVENT_SCHEMA]
    arrays = []
    for field, values in zip(EVENT_SCHEMA, columns, strict=True):
        if field.name in _TIMESTAMP_COLUMNS:
            arrays.append(_timestamps(values))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def _timestamps(values: Sequence[str | int | None]) -> pa.Array:
    """RFC 3339 strings (parsed by Arrow), epoch seconds or microseconds (ints), or None."""
    if all(value is None or isinstance(value, str) for value in values):
        return pa.array(values, type=pa.string()).cast(_TS)
    micros = [
        None
        if value is None
        else value
        if isinstance(value, int)
        else (parse_timestamp(value) - _EPOCH) // _MICROSECOND
        for value in values
    ]
    return pc.cast(pa.array(micros, type=pa.int64()), _TS)
