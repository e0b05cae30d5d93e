"""Search and timeline: filter events, newest first, with cursor pagination and a total count.

A filter on ``agent`` matches the agent at any position of the delegation chain (the acting agent or any agent
it acted for). Cursors are opaque: base64 of the last row's (occurred_at, emitter, seq), the sort key, so paging
is stable while new events arrive.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from query.lake import LakeReader
from store.ground.errors import InvalidInput

__all__ = ["EventFilter", "Page", "event_dicts", "rfc3339_us", "search"]

MAX_LIMIT = 1000


@dataclass(frozen=True)
class EventFilter:
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    agent: str | None = None
    credential: str | None = None
    tool: str | None = None
    resource: str | None = None
    decision: str | None = None
    outcome: str | None = None
    emitter: str | None = None
    type: str | None = None
    trace: str | None = None
    event_ids: tuple[str, ...] | None = None

    def where(self) -> tuple[str, list[Any]]:
        """SQL conditions and their parameters (values are always bound, never spliced)."""
        clauses = {
            "tenant": "tenant = ?",
            # The date partition lets DuckDB skip whole days of files.
            "since": "occurred_at >= ? AND date >= CAST(? AS DATE)",
            "until": "occurred_at < ? AND date <= CAST(? AS DATE)",
            "user": '"user" = ?',
            "agent": "list_contains(delegation_chain, ?)",
            "credential": "credential_id = ?",
            "tool": "tool_name = ?",
            "resource": "resource_id = ?",
            "decision": "decision_result = ?",
            "outcome": "outcome = ?",
            "emitter": "emitter = ?",
            "type": "type = ?",
            "trace": "trace_id = ?",
        }
        conditions, params = ["TRUE"], []
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name == "event_ids":
                conditions.append("list_contains(?, event_id)")
                params.append(list(value))
            else:
                conditions.append(clauses[field.name])
                params += [value] * clauses[field.name].count("?")
        return " AND ".join(conditions), params


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    total: int
    next_cursor: str | None

    def as_json(self) -> dict[str, Any]:
        return {"total": self.total, "next_cursor": self.next_cursor, "events": self.events}


def search(reader: LakeReader, where: EventFilter, *, limit: int = 100, cursor: str | None = None) -> Page:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    condition, params = where.where()
    with reader.connect() as connection:
        total = connection.execute(f"SELECT count(*) FROM events WHERE {condition}", params).fetchone()
        page_condition, page_params = condition, list(params)
        if cursor is not None:
            occurred_at, emitter, seq = _decode_cursor(cursor)
            page_condition += " AND (occurred_at, emitter, seq) < (?, ?, ?)"
            page_params += [occurred_at, emitter, seq]
        result = connection.execute(
            f"SELECT * EXCLUDE (jws) FROM events WHERE {page_condition}"
            " ORDER BY occurred_at DESC, emitter DESC, seq DESC LIMIT ?",
            [*page_params, limit + 1],
        )
        rows = event_dicts(result)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1]) if more and rows else None
    return Page(rows, int(total[0]) if total else 0, next_cursor)


def event_dicts(result: Any) -> list[dict[str, Any]]:
    """Rows of a DuckDB result as JSON-ready dicts (timestamps as RFC 3339, dates as ISO)."""
    names = [column[0] for column in result.description]
    return [{name: _jsonable(value) for name, value in zip(names, row, strict=True)} for row in result.fetchall()]


def rfc3339_us(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``, four-digit years included (strftime's %Y writes year 1 as "1"), so that
    string order is time order."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339_us(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _encode_cursor(row: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([row["occurred_at"], row["emitter"], row["seq"]])).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str, int]:
    try:
        occurred_at, emitter, seq = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(occurred_at.removesuffix("Z") + "+00:00"), str(emitter), int(seq)
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise InvalidInput(f"cursor {cursor[:40]!r} is not one this API returned") from exc
