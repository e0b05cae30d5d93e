"""The lake's row layout: one typed row per accepted event, derived from its signed payload.

``event_row`` is the only place that maps a payload to columns. The server uses it when it writes Parquet and the
verifier uses it to recompute every column from the stored ``jws``, so a column edited on disk cannot pass.
``tenant`` and ``date`` are Hive partition keys: they live in the directory names, not inside the files.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import orjson
import pyarrow as pa

__all__ = [
    "EVENT_SCHEMA",
    "PARTITION_COLUMNS",
    "delegation_chain",
    "event_row",
    "parse_timestamp",
    "partition_of",
]

PARTITION_COLUMNS = ("tenant", "date")

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


def parse_timestamp(value: str | int) -> datetime:
    """An RFC 3339 UTC timestamp ending in ``Z`` (or integer epoch seconds) as an aware datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC)
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)


def partition_of(payload: dict[str, Any]) -> tuple[str, date]:
    """The (tenant, UTC date) partition an event belongs to."""
    return payload["tenant"], parse_timestamp(payload["occurred_at"]).date()


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


def event_row(payload: dict[str, Any], *, jws: str, kid: str, event_hash: str, received_at: datetime) -> dict[str, Any]:
    """Every column of the lake for one validated payload (partition columns excluded)."""
    chain = delegation_chain(payload.get("delegation"))
    credential = payload.get("credential") or {}
    tool = payload.get("tool") or {}
    resource = payload.get("resource") or {}
    decision = payload.get("decision") or {}
    delegate = payload.get("delegate") or {}
    approval = payload.get("approval") or {}
    expires_at = credential.get("expires_at")
    revoked_at = payload.get("revoked_at")
    attrs = payload.get("attrs")
    admin = payload.get("admin")
    return {
        "event_id": payload["event_id"],
        "type": payload["type"],
        "occurred_at": parse_timestamp(payload["occurred_at"]),
        "received_at": received_at,
        "emitter": payload["emitter"],
        "seq": payload["seq"],
        "prev_hash": payload["prev_hash"],
        "event_hash": event_hash,
        "kid": kid,
        "user": chain[0] if chain else None,
        "agent": chain[-1] if len(chain) > 1 else None,
        "delegation_chain": chain or None,
        "delegation_depth": max(len(chain) - 1, 0) if chain else None,
        "credential_id": credential.get("id"),
        "credential_kind": credential.get("kind"),
        "credential_client_id": credential.get("client_id"),
        "credential_scopes": credential.get("scopes"),
        "credential_expires_at": None if expires_at is None else parse_timestamp(expires_at),
        "tool_name": tool.get("name"),
        "tool_server": tool.get("server"),
        "resource_type": resource.get("type"),
        "resource_id": resource.get("id"),
        "resource_tenant": resource.get("tenant"),
        "decision_result": decision.get("result"),
        "decision_required_scope": decision.get("required_scope"),
        "decision_policy": decision.get("policy"),
        "decision_reason": decision.get("reason"),
        "outcome": payload.get("outcome"),
        "parent_event_id": payload.get("parent_event_id"),
        "trace_id": payload.get("trace_id"),
        "approval_id": payload.get("approval_id") or approval.get("id"),
        "delegate_agent": delegate.get("agent"),
        "delegate_credential_id": delegate.get("credential_id"),
        "delegate_scopes": delegate.get("scopes"),
        "approval_approved_by": approval.get("approved_by"),
        "approval_scopes": approval.get("scopes"),
        "approval_task": approval.get("task"),
        "revoked_at": None if revoked_at is None else parse_timestamp(revoked_at),
        "reason": payload.get("reason"),
        "attrs": None if attrs is None else orjson.dumps(attrs, option=orjson.OPT_SORT_KEYS).decode(),
        "admin": None if admin is None else orjson.dumps(admin, option=orjson.OPT_SORT_KEYS).decode(),
        "jws": jws,
    }
