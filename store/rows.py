"""The lake row an event becomes, in plain Python: which columns there are, their values, and whether the lake can
hold them.

This module is the one map from a signed payload to lake columns. ``store.schema`` turns its rows into Arrow
columns for the lake writer; the verifiers call ``row_problem`` before an event is acknowledged, so that what ingest
acknowledges the lake can always store (a value the lake cannot hold is ``invalid_payload`` at the door, never a
lake writer stuck on one record). It imports no Arrow, so that the verifier processes stay small.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Literal, NamedTuple

import orjson

__all__ = [
    "COLUMN_SOURCES",
    "LAKE_COLUMNS",
    "MAX_TIMESTAMP_US",
    "MIN_TIMESTAMP_US",
    "Signed",
    "delegation_chain",
    "row_problem",
    "row_values",
    "typed_problem",
]

ColumnKind = Literal["string", "strings", "int32", "int64", "timestamp"]

# (column, kind) in lake order. Timestamps are microseconds since the epoch, UTC.
LAKE_COLUMNS: Final[tuple[tuple[str, ColumnKind], ...]] = (
    ("event_id", "string"),
    ("type", "string"),
    ("occurred_at", "timestamp"),
    ("received_at", "timestamp"),
    ("log_index", "int64"),
    ("emitter", "string"),
    ("seq", "int64"),
    ("prev_hash", "string"),
    ("event_hash", "string"),
    ("kid", "string"),
    ("user", "string"),
    ("agent", "string"),
    ("delegation_chain", "strings"),
    ("delegation_depth", "int32"),
    ("credential_id", "string"),
    ("credential_kind", "string"),
    ("credential_client_id", "string"),
    ("credential_scopes", "strings"),
    ("credential_expires_at", "timestamp"),
    ("tool_name", "string"),
    ("tool_server", "string"),
    ("resource_type", "string"),
    ("resource_id", "string"),
    ("resource_tenant", "string"),
    ("decision_result", "string"),
    ("decision_required_scope", "string"),
    ("decision_policy", "string"),
    ("decision_reason", "string"),
    ("outcome", "string"),
    ("parent_event_id", "string"),
    ("trace_id", "string"),
    ("approval_id", "string"),
    ("delegate_agent", "string"),
    ("delegate_credential_id", "string"),
    ("delegate_scopes", "strings"),
    ("approval_approved_by", "string"),
    ("approval_scopes", "strings"),
    ("approval_task", "string"),
    ("revoked_at", "timestamp"),
    ("reason", "string"),
    ("attrs", "string"),
    ("admin", "string"),
    ("jws", "string"),
)

# Where each column comes from: "signed" (a payload field, covered by the emitter's signature), "derived" (computed
# from signed fields; the verifier recomputes it) or "server" (assigned by the server, not signed). Written into
# each lake file's Parquet field metadata and documented in docs/lake.md.
COLUMN_SOURCES: Final[dict[str, tuple[str, str]]] = {
    "event_id": ("signed", "event_id"),
    "type": ("signed", "type"),
    "occurred_at": ("signed", "occurred_at"),
    "received_at": ("server", "the server's clock when it acknowledged the event"),
    "log_index": ("server", "the event's leaf index in the transparency log (docs/transparency.md)"),
    "emitter": ("signed", "emitter"),
    "seq": ("signed", "seq"),
    "prev_hash": ("signed", "prev_hash"),
    "event_hash": ("derived", "SHA-256 of the payload's RFC 8785 canonical bytes"),
    "kid": ("signed", "kid of the JWS protected header"),
    "user": ("derived", "delegation.sub"),
    "agent": ("derived", "the outermost delegation.act.sub (the acting agent)"),
    "delegation_chain": ("derived", "[delegation.sub, first agent, ..., acting agent]"),
    "delegation_depth": ("derived", "number of agents in delegation_chain"),
    "credential_id": ("signed", "credential.id"),
    "credential_kind": ("signed", "credential.kind"),
    "credential_client_id": ("signed", "credential.client_id"),
    "credential_scopes": ("signed", "credential.scopes"),
    "credential_expires_at": ("signed", "credential.expires_at (timestamp or epoch seconds)"),
    "tool_name": ("signed", "tool.name"),
    "tool_server": ("signed", "tool.server"),
    "resource_type": ("signed", "resource.type"),
    "resource_id": ("signed", "resource.id"),
    "resource_tenant": ("signed", "resource.tenant"),
    "decision_result": ("signed", "decision.result"),
    "decision_required_scope": ("signed", "decision.required_scope"),
    "decision_policy": ("signed", "decision.policy"),
    "decision_reason": ("signed", "decision.reason"),
    "outcome": ("signed", "outcome"),
    "parent_event_id": ("signed", "parent_event_id"),
    "trace_id": ("signed", "trace_id"),
    "approval_id": ("derived", "approval_id, else approval.id"),
    "delegate_agent": ("signed", "delegate.agent"),
    "delegate_credential_id": ("signed", "delegate.credential_id"),
    "delegate_scopes": ("signed", "delegate.scopes"),
    "approval_approved_by": ("signed", "approval.approved_by"),
    "approval_scopes": ("signed", "approval.scopes"),
    "approval_task": ("signed", "approval.task"),
    "revoked_at": ("signed", "revoked_at"),
    "reason": ("signed", "reason"),
    "attrs": ("derived", "attrs as JSON with sorted keys"),
    "admin": ("derived", "admin (server stream only) as JSON with sorted keys"),
    "jws": ("signed", "the JWS compact serialization as received; every signed column can be checked against it"),
}

# The instants every reader can hold: Python's datetime (the read API, the CLI, the dashboard) ends at year 9999,
# Arrow's and DuckDB's microsecond timestamps reach further.
MIN_TIMESTAMP_US: Final = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_US: Final = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_INT_RANGES: Final = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_CHECKED: Final = tuple(
    (index, name, kind) for index, (name, kind) in enumerate(LAKE_COLUMNS) if kind in ("timestamp", "int32", "int64")
)


class Signed(NamedTuple):
    """What the lake stores beside the payload: the JWS itself and what the server derived or assigned."""

    payload: dict[str, Any]
    jws: str
    kid: str
    event_hash: str
    received_at_us: int
    log_index: int | None = None  # None: written before the transparency log existed


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


def row_values(event: Signed) -> tuple[Any, ...]:
    """One row's values in ``LAKE_COLUMNS`` order. Timestamps stay RFC 3339 strings or become integer
    microseconds (``credential.expires_at`` in epoch seconds), for Arrow to parse a column at a time."""
    payload = event.payload
    chain = delegation_chain(payload.get("delegation"))
    credential = payload.get("credential") or {}
    tool = payload.get("tool") or {}
    resource = payload.get("resource") or {}
    decision = payload.get("decision") or {}
    delegate = payload.get("delegate") or {}
    approval = payload.get("approval") or {}
    attrs = payload.get("attrs")
    admin = payload.get("admin")
    return (
        payload["event_id"],
        payload["type"],
        payload["occurred_at"],
        event.received_at_us,
        event.log_index,
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
        _expires_at(credential),
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


def typed_problem(payload: dict[str, Any]) -> str | None:
    """``row_problem`` for the columns whose type can refuse a value (timestamps and integers) of the row
    ``payload`` becomes, derived by the same rules as ``row_values`` without building the strings: the verifiers'
    check before every acknowledgement (1 us an event instead of 3)."""
    credential = payload.get("credential")
    delegation = payload.get("delegation")
    depth = None
    if delegation:
        depth, act = 0, delegation.get("act")
        while act:
            depth, act = depth + 1, act.get("act")
    return _problem(
        (
            ("occurred_at", "timestamp", payload.get("occurred_at")),
            ("seq", "int64", payload.get("seq")),
            ("delegation_depth", "int32", depth),
            ("credential_expires_at", "timestamp", _expires_at(credential) if credential else None),
            ("revoked_at", "timestamp", payload.get("revoked_at")),
        )
    )


def row_problem(values: tuple[Any, ...]) -> str | None:
    """Why the lake cannot hold this row (a number outside its column's range, a timestamp outside years
    1-9999), or None. Strings and lists need no check: the payload schema admits only valid Unicode."""
    return _problem((name, kind, values[index]) for index, name, kind in _CHECKED)


def _problem(typed: Iterable[tuple[str, str, Any]]) -> str | None:
    for name, kind, value in typed:
        if value is None:
            continue
        if kind == "timestamp":
            problem = _timestamp_problem(value)
            if problem is not None:
                return f"{name}: {problem}"
            continue
        low, high = _INT_RANGES[kind]
        if not isinstance(value, int) or not low <= value <= high:
            return f"{name}: {value!r} does not fit the lake's {kind} column"
    return None


def _expires_at(credential: dict[str, Any]) -> Any:
    """``credential.expires_at`` as the column holds it: epoch seconds become microseconds, strings stay."""
    expires_at = credential.get("expires_at")
    return expires_at * 1_000_000 if isinstance(expires_at, int) and not isinstance(expires_at, bool) else expires_at


def _timestamp_problem(value: object) -> str | None:
    if isinstance(value, str):
        # A string the payload schema admitted (RFC 3339 UTC, years 1-9999, a real date: ingest.event) parses
        # into the column: tests/test_lake_roundtrip.py proves it at every boundary, and the lake writer still
        # quarantines a row Arrow refuses. Parsing it again here would cost every event ~1 us for nothing.
        return None if value.endswith("Z") else f"{value!r} is not a UTC timestamp ending in Z"
    if not isinstance(value, int) or not MIN_TIMESTAMP_US <= value <= MAX_TIMESTAMP_US:
        return f"{value!r} microseconds is outside 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
    return None
