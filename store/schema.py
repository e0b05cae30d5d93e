"""The lake's row layout: one typed row per accepted event, derived from its signed payload.

``event_table`` is the only place that maps payloads to columns. The lake writer uses it to build Parquet files
and the verifier uses it to recompute every column from the stored ``jws``, so a column edited on disk cannot
pass. It works a batch at a time: Python picks the values out of each payload (``_values``), Arrow parses the
timestamps and builds the columns, which costs a fraction of building typed rows one by one.
``tenant`` and ``date`` are Hive partition keys: they live in the directory names, not inside the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "EVENT_SCHEMA",
    "Signed",
    "delegation_chain",
    "event_table",
    "parse_timestamp",
    "partition_of",
]

_TS = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())

EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("occurred_at", _TS),
        ("received_at", _TS),
        ("emitter", pa.string()),
        ("seq", pa.int64()),
        ("prev_hash", pa.string()),
        ("event_hash", pa.string()),
        ("kid", pa.string()),
        ("user", pa.string()),
        ("agent", pa.string()),
        ("delegation_chain", _STRINGS),
        ("delegation_depth", pa.int32()),
        ("credential_id", pa.string()),
        ("credential_kind", pa.string()),
        ("credential_client_id", pa.string()),
        ("credential_scopes", _STRINGS),
        ("credential_expires_at", _TS),
        ("tool_name", pa.string()),
        ("tool_server", pa.string()),
        ("resource_type", pa.string()),
        ("resource_id", pa.string()),
        ("resource_tenant", pa.string()),
        ("decision_result", pa.string()),
        ("decision_required_scope", pa.string()),
        ("decision_policy", pa.string()),
        ("decision_reason", pa.string()),
        ("outcome", pa.string()),
        ("parent_event_id", pa.string()),
        ("trace_id", pa.string()),
        ("approval_id", pa.string()),
        ("delegate_agent", pa.string()),
        ("delegate_credential_id", pa.string()),
        ("delegate_scopes", _STRINGS),
        ("approval_approved_by", pa.string()),
        ("approval_scopes", _STRINGS),
        ("approval_task", pa.string()),
        ("revoked_at", _TS),
        ("reason", pa.string()),
        ("attrs", pa.string()),
        ("admin", pa.string()),
        ("jws", pa.string()),
    ]
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP_COLUMNS = frozenset(field.name for field in EVENT_SCHEMA if field.type == _TS)


class Signed(NamedTuple):
    """What the lake stores beside the payload: the JWS itself and what the server derived or assigned."""

    payload: dict[str, Any]
    jws: str
    kid: str
    event_hash: str
    received_at_us: int


def parse_timestamp(value: str | int) -> datetime:
    """An RFC 3339 UTC timestamp ending in ``Z`` (or integer epoch seconds) as an aware datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC)
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)


def partition_of(payload: dict[str, Any]) -> tuple[str, date]:
    """The (tenant, UTC date) partition an event belongs to."""
    return payload["tenant"], date.fromisoformat(payload["occurred_at"][:10])


def delegation_chain(delegation: dict[str, Any] | None) -> list[str]:
    """``[user, first agent, ..., current agent]`` from an RFC 8693 ``{"sub", "act": {"sub", "act": ...}}``."""
    if not delegation:
        return []
    actors = []
    act = delegation.get("act")
    while act:
        actors.append(act["sub"])
        act = act.get("act")
    return [delegation["sub"], *reversed(actors)]


def event_table(events: Iterable[Signed]) -> pa.Table:
    """The lake rows of ``events`` (partition columns excluded), in the order given."""
    rows = [_values(event) for event in events]
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


def _values(event: Signed) -> tuple[Any, ...]:
    """One row's values in schema order. Timestamps stay as strings or integer microseconds for Arrow to parse."""
    payload = event.payload
    chain = delegation_chain(payload.get("delegation"))
    credential = payload.get("credential") or {}
    tool = payload.get("tool") or {}
    resource = payload.get("resource") or {}
    decision = payload.get("decision") or {}
    delegate = payload.get("delegate") or {}
    approval = payload.get("approval") or {}
    expires_at = credential.get("expires_at")
    attrs = payload.get("attrs")
    admin = payload.get("admin")
    return (
        payload["event_id"],
        payload["type"],
        payload["occurred_at"],
        event.received_at_us,
        payload["emitter"],
        payload["seq"],
        payload["prev_hash"],
        event.event_hash,
        event.kid,
        chain[0] if chain else None,
        chain[-1] if len(chain) > 1 else None,
        chain or None,
        len(chain) - 1 if chain else None,
        credential.get("id"),
        credential.get("kind"),
        credential.get("client_id"),
        credential.get("scopes"),
        expires_at * 1_000_000 if isinstance(expires_at, int) else expires_at,
        tool.get("name"),
        tool.get("server"),
        resource.get("type"),
        resource.get("id"),
        resource.get("tenant"),
        decision.get("result"),
        decision.get("required_scope"),
        decision.get("policy"),
        decision.get("reason"),
        payload.get("outcome"),
        payload.get("parent_event_id"),
        payload.get("trace_id"),
        payload.get("approval_id") or approval.get("id"),
        delegate.get("agent"),
        delegate.get("credential_id"),
        delegate.get("scopes"),
        approval.get("approved_by"),
        approval.get("scopes"),
        approval.get("task"),
        payload.get("revoked_at"),
        payload.get("reason"),
        None if attrs is None else orjson.dumps(attrs, option=orjson.OPT_SORT_KEYS).decode(),
        None if admin is None else orjson.dumps(admin, option=orjson.OPT_SORT_KEYS).decode(),
        event.jws,
    )
