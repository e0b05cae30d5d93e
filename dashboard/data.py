"""The dashboard's queries: one cached call into ``query/`` each. Every function takes the tenant scope as an
argument (None only for unbound principals), so the cache can never hand one tenant's result to another."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard.context import REPORT_SECONDS, SLOW_SECONDS, cached, cached_for
from query.blast import IdentityBlastRadius, Subject, Taint, forward_taint, identity_blast_radius
from query.findings import Finding, findings
from query.index.aggregates import LakeAggregates
from query.index.reach_copies import ReachCopies
from query.index.tree_index import TreeIndex
from query.lake import LakeReader
from query.overview import EmitterStatus, Overview, emitter_status, overview
from query.paths import DelegationPath, delegation_path
from query.recert.reports import SignedReport, render, signed_review
from query.recert.review import Review, parse_window
from query.search import EventFilter, Page, search
from query.verify.checkpoint import last_run
from query.verify.integrity import verify_event
from query.verify.report import IntegrityProblem

__all__ = [
    "blast_radius",
    "choices",
    "emitters",
    "event_check",
    "find_events",
    "findings_in",
    "last_verification",
    "path_of",
    "recert_file",
    "recert_review",
    "refresh_findings",
    "summary",
    "taint_of",
]

# Columns an analyst picks from; names are fixed here, never taken from a request.
_CHOICE_COLUMNS = {
    "tenant": "tenant",
    "user": '"user"',
    "agent": "agent",
    "credential": "credential_id",
    "tool": "tool_name",
    "decision": "decision_result",
    "outcome": "outcome",
    "trace": "trace_id",
    "type": "type",
}


@cached
def summary(data_dir: str, tenant: str | None, since: datetime | None, until: datetime | None) -> Overview:
    reader = LakeReader(Path(data_dir))
    return overview(reader, since=since, until=until, tenant=tenant, aggregates=lake_aggregates(data_dir))


@st.cache_resource(show_spinner=False)
def lake_aggregates(data_dir: str) -> LakeAggregates:
    """One set of hourly aggregates per data dir (query.index.aggregates), written in the background from the first
    sign-in on and whenever an overview met a file without one (read from the lake meanwhile: same answer)."""
    aggregates = LakeAggregates(LakeReader(Path(data_dir)))
    aggregates.warm()
    return aggregates


@cached_for(SLOW_SECONDS)
def findings_in(
    data_dir: str, tenant: str | None, since: datetime | None, until: datetime | None
) -> tuple[datetime, list[Finding]]:
    """The findings of the window, and when they were computed."""
    return datetime.now(UTC), findings(LakeReader(Path(data_dir)), tenant=tenant, since=since, until=until)


def refresh_findings() -> None:
    """Drop the cached findings (the Findings page's Recompute button)."""
    findings_in.clear()  # type: ignore[attr-defined]  # st.cache_data's wrapper has clear()


@cached
def find_events(data_dir: str, where: EventFilter, limit: int, cursor: str | None) -> Page:
    return search(LakeReader(Path(data_dir)), where, limit=limit, cursor=cursor)


@cached
def choices(data_dir: str, tenant: str | None, column: str, since: datetime | None) -> list[str]:
    """Distinct values of one column (for pickers), most frequent first, at most 500."""
    expression = _CHOICE_COLUMNS[column]
    with LakeReader(Path(data_dir)).connect() as connection:
        rows = connection.execute(
            f"SELECT {expression} FROM events WHERE {expression} IS NOT NULL AND ($tenant IS NULL OR tenant = $tenant)"
            " AND ($since IS NULL OR occurred_at >= $since) GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 500",
            {"tenant": tenant, "since": since},
        ).fetchall()
    return [str(row[0]) for row in rows]


@st.cache_resource(show_spinner=False)
def tree_index(data_dir: str) -> TreeIndex:
    """One task-tree index per data dir for the life of the dashboard process (kept current on every use). It is
    built in the background from the first sign-in on; the path page shows its progress until it is ready."""
    index = TreeIndex(LakeReader(Path(data_dir)))
    threading.Thread(target=index.warm, name="tree-index", daemon=True).start()
    return index


@st.cache_resource(show_spinner=False)
def reach_copies(data_dir: str) -> ReachCopies:
    """One set of reach copies per data dir, written in the background from the first sign-in on and after each
    blast radius; until a file has its copy, the blast radius reads the lake file (same answer, slower)."""
    copies = ReachCopies(LakeReader(Path(data_dir)))
    copies.warm()
    return copies


@cached
def path_of(data_dir: str, tenant: str | None, event_id: str) -> DelegationPath:
    reader = tree_index(data_dir).reader_for(event_id)  # the rows of its task tree only
    return delegation_path(reader, event_id, tenant=tenant)


@cached
def event_check(data_dir: str, tenant: str | None, event_id: str, day: str | None) -> list[IntegrityProblem] | None:
    return verify_event(Path(data_dir), event_id, tenant=tenant, day=date.fromisoformat(day) if day else None)


@cached
def taint_of(data_dir: str, tenant: str | None, kind: Subject, subject: str, since: datetime) -> Taint:
    return forward_taint(LakeReader(Path(data_dir)), kind, subject, since, tenant=tenant)


@cached
def blast_radius(
    data_dir: str, tenant: str | None, kind: str, subject: str, since: datetime | None
) -> IdentityBlastRadius:
    assert kind in ("agent", "credential")
    copies = reach_copies(data_dir)
    reach = identity_blast_radius(
        LakeReader(Path(data_dir)),
        kind,  # type: ignore[arg-type]
        subject,
        since=since,
        tenant=tenant,
        copies=copies,
    )
    copies.warm()
    return reach


@cached_for(REPORT_SECONDS)
def recert_review(data_dir: str, tenant: str, window: str) -> tuple[Review, dict[str, Any], str]:
    return signed_review(Path(data_dir), tenant, window_days=parse_window(window))


@cached_for(REPORT_SECONDS)
def recert_file(data_dir: str, tenant: str, window: str, form: str) -> SignedReport:
    review, body, jws = recert_review(data_dir, tenant, window)
    return SignedReport(review, form, render(body, jws, form))


@cached
def emitters(data_dir: str, tenant: str | None) -> list[EmitterStatus]:
    return emitter_status(LakeReader(Path(data_dir)), tenant=tenant)


def last_verification(data_dir: str, tenant: str | None) -> dict[str, Any] | None:
    """The latest verification, its problems narrowed to the tenant's own for a bound principal (not cached)."""
    run = last_run(Path(data_dir))
    if run is not None and tenant is not None:
        mine = [p for p in run["problems"] if p.get("tenant") == tenant]
        # Other tenants' emitter names, event counts and problems are not the bound principal's to see.
        run = {**run, "problems": mine, "emitters": {}, "events": None, "others": len(run["problems"]) - len(mine)}
    return run
