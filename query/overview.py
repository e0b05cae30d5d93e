"""The figures an analyst reads first: how much happened, who was active, what was denied, and how fresh the log is.

``overview`` answers over a time window (and a tenant, when the reader is bound to one) with four column
projections: the headline counts, the volume chart and the two top lists. ``emitter_status`` lists every
emitter's stream as the lake holds it: events, first and last seq, whether the seqs are contiguous (a cheap
continuity check: a full verification is ``query.verify.integrity``), and its newest event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from query.index.aggregates import LakeAggregates, Window
from query.lake import LakeReader
from query.search import EventFilter, event_dicts

__all__ = ["EmitterStatus", "Overview", "emitter_status", "overview"]

TOP = 10


@dataclass
class Overview:
    events: int
    emitters: int
    agents: int
    users: int
    denied: int
    newest: datetime | None
    volume: list[dict[str, Any]] = field(default_factory=list)  # bucket, decision, events
    bucket: str = "hour"
    top_agents: list[dict[str, Any]] = field(default_factory=list)
    top_tools: list[dict[str, Any]] = field(default_factory=list)

    def newest_age(self, now: datetime) -> timedelta | None:
        return None if self.newest is None else now - self.newest


@dataclass(frozen=True)
class EmitterStatus:
    emitter: str
    tenant: str
    events: int
    first_seq: int
    last_seq: int
    newest: str | None

    @property
    def contiguous(self) -> bool:
        return self.first_seq == 1 and self.last_seq - self.first_seq + 1 == self.events


def overview(
    reader: LakeReader,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    aggregates: LakeAggregates | None = None,
) -> Overview:
    """With ``aggregates`` (query.index.aggregates), the whole hours of the window are read from the per-file
    hourly aggregates, the rest from the lake: the same answer, in a fraction of the time on a large lake."""
    span = (until - since) if since and until else None
    bucket = "hour" if span is not None and span <= timedelta(days=3) else "day"
    if aggregates is not None:
        return _from_aggregates(reader, aggregates, since, until, tenant, bucket)
    where, params = EventFilter(tenant=tenant, since=since, until=until).where()  # with date pruning
    with reader.connect() as connection:
        # Four projections of the window (Parquet reads only the columns each needs); nothing is materialised,
        # so a window of the whole lake stays within the reader's memory limit.
        row = connection.execute(
            'SELECT count(*), count(DISTINCT emitter), count(DISTINCT agent), count(DISTINCT "user"),'
            f" count(*) FILTER (WHERE decision_result = 'deny'), max(occurred_at) FROM events WHERE {where}",
            params,
        ).fetchone()
        assert row is not None
        volume = event_dicts(
            connection.execute(
                f"SELECT date_trunc('{bucket}', occurred_at) AS bucket,"
                " CASE WHEN decision_result IN ('allow', 'deny') THEN decision_result ELSE 'other' END AS decision,"
                f" count(*) AS events FROM events WHERE {where} GROUP BY ALL ORDER BY bucket, decision",
                params,
            )
        )
        top_agents = event_dicts(
            connection.execute(
                "SELECT agent, count(*) AS events, count(*) FILTER (WHERE decision_result = 'deny') AS denied"
                f" FROM events WHERE {where} AND agent IS NOT NULL GROUP BY agent ORDER BY events DESC, agent"
                " LIMIT ?",
                [*params, TOP],
            )
        )
        top_tools = event_dicts(
            connection.execute(
                "SELECT tool_server || '/' || tool_name AS tool, count(*) AS events,"
                " count(*) FILTER (WHERE decision_result = 'deny') AS denied FROM events"
                f" WHERE {where} AND tool_name IS NOT NULL GROUP BY 1 ORDER BY events DESC, tool LIMIT ?",
                [*params, TOP],
            )
        )
    events, emitters, agents, users, denied, newest = row
    return Overview(events, emitters, agents, users, denied, newest, volume, bucket, top_agents, top_tools)


def _from_aggregates(
    reader: LakeReader,
    aggregates: LakeAggregates,
    since: datetime | None,
    until: datetime | None,
    tenant: str | None,
    bucket: str,
) -> Overview:
    pinned = reader.pinned()  # one file list for the aggregates, the lake's edges and the files without one
    with pinned.connect() as connection:
        facts, params, missing = aggregates.facts(Window.of(since, until), tenant, pinned.files())
        connection.execute(f"CREATE TEMP TABLE facts AS SELECT * FROM {facts}", params)
        row = connection.execute(
            "SELECT coalesce(sum(events) FILTER (WHERE kind = 'decision'), 0)::BIGINT,"
            " count(DISTINCT emitter) FILTER (WHERE kind = 'emitter'),"
            " count(DISTINCT agent) FILTER (WHERE kind = 'agent'),"
            " count(DISTINCT \"user\") FILTER (WHERE kind = 'user'),"
            " coalesce(sum(events) FILTER (WHERE kind = 'decision' AND decision = 'deny'), 0)::BIGINT,"
            " max(newest) FILTER (WHERE kind = 'decision') FROM facts"
        ).fetchone()
        assert row is not None
        volume = event_dicts(
            connection.execute(
                f"SELECT date_trunc('{bucket}', hour) AS bucket, decision, sum(events)::BIGINT AS events FROM facts"
                " WHERE kind = 'decision' GROUP BY ALL ORDER BY bucket, decision"
            )
        )
        tops = []
        for column in ("agent", "tool"):
            tops.append(
                event_dicts(
                    connection.execute(
                        f"SELECT {column}, sum(events)::BIGINT AS events,"
                        " coalesce(sum(events) FILTER (WHERE decision = 'deny'), 0)::BIGINT AS denied FROM facts"
                        f" WHERE kind = '{column}' AND {column} IS NOT NULL GROUP BY {column}"
                        f" ORDER BY events DESC, {column} LIMIT ?",
                        [TOP],
                    )
                )
            )
        connection.execute("DROP TABLE facts")
    if missing:
        aggregates.warm()  # files written since the last refresh: their aggregates, for the next view
    events, emitters, agents, users, denied, newest = row
    return Overview(events, emitters, agents, users, denied, newest, volume, bucket, tops[0], tops[1])


def emitter_status(reader: LakeReader, *, tenant: str | None = None) -> list[EmitterStatus]:
    """Every emitter's stream in the lake (the server's own stream only for an unbound reader)."""
    with reader.connect() as connection:
        rows = connection.execute(
            "SELECT emitter, any_value(tenant), count(*), min(seq), max(seq), max(occurred_at)"
            " FROM all_events WHERE ($tenant IS NULL OR tenant = $tenant) GROUP BY emitter ORDER BY emitter",
            {"tenant": tenant},
        ).fetchall()
    return [
        EmitterStatus(emitter, owner, count, first, last, newest.strftime("%Y-%m-%dT%H:%M:%SZ") if newest else None)
        for emitter, owner, count, first, last, newest in rows
    ]
