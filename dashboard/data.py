"""The dashboard's queries: one cached call into ``query/`` each. Every function takes the tenant scope as an
argument (None only for unbound principals), so the cache can never hand one tenant's result to another."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard.context import REPORT_SECONDS, SLOW_SECONDS, cached, cached_for
from query.blast import IdentityBlastRadius, Subject, Taint, forward_taint, identity_blast_radius
from query.detect.loop import findings_store_path
from query.detect.records import recorded_findings
from query.findings import Finding, findings
from query.index.aggregates import LakeAggregates
from query.index.reach_copies import ReachCopies
from query.index.tree_index import TreeIndex
from query.lake import LakeReader
from query.overview import EmitterStatus, Overview, emitter_status, overview
from query.paths import DelegationPath, delegation_path
from query.recert.reports import SignedReport, render, signed_review
from query.recert.review import DAILY_FACTS, Review, parse_window
from query.search import EventFilter, Page, search
from query.verify.checkpoint import last_run
from query.verify.integrity import verify_event
from query.verify.report import IntegrityProblem

__all__ = [
    "Found",
    "blast_radius",
    "choices",
    "emitters",
    "event_check",
    "evidence_events",
    "find_events",
    "findings_in",
    "last_verification",
    "path_of",
    "recert_content",
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


@dataclass(frozen=True)
class Found:
    """The findings a page shows, and where they come from."""

    at: datetime  # when they were computed or read
    findings: list[Finding]
    examined: int | None = None  # recorded by detection: the last log index it had examined (else None: computed)
    newest: int | None = None  # recorded: the lake's newest log index when they were read

    @property
    def recorded(self) -> bool:
        return self.examined is not None


def findings_in(
    data_dir: str, tenant: str | None, since: datetime | None, until: datetime | None, from_lake: bool = False
) -> Found:
    """The findings of the window. Over the whole log (window ``all``: no start) they are read from what continuous
    detection recorded, when it has run on this data dir (it has seen every event once: the whole-lake query's
    answer up to the log index it has examined, in milliseconds where the query takes seconds per million
    events), unless ``from_lake``; otherwise computed from the lake now."""
    if since is None and not from_lake:
        recorded = _recorded(data_dir, tenant)
        if recorded is not None:
            return recorded
    return _computed(data_dir, tenant, since, until)


@cached
def _recorded(data_dir: str, tenant: str | None) -> Found | None:
    recorded = recorded_findings(findings_store_path(Path(data_dir)), tenant)
    if recorded is None or recorded[0] < 0:
        return None
    examined, found = recorded
    with LakeReader(Path(data_dir)).connect() as connection:
        [(newest,)] = connection.execute("SELECT max(log_index) FROM all_events").fetchall()
    listed = [item.finding for item in found]
    return Found(datetime.now(UTC), listed, examined, -1 if newest is None else int(newest))


@cached_for(SLOW_SECONDS)
def _computed(data_dir: str, tenant: str | None, since: datetime | None, until: datetime | None) -> Found:
    return Found(datetime.now(UTC), findings(LakeReader(Path(data_dir)), tenant=tenant, since=since, until=until))


def refresh_findings() -> None:
    """Drop the cached findings (the Findings page's Recompute button)."""
    _computed.clear()  # type: ignore[attr-defined]  # st.cache_data's wrapper has clear()


@cached
def find_events(data_dir: str, where: EventFilter, limit: int, cursor: str | None) -> Page:
    return search(LakeReader(Path(data_dir)), where, limit=limit, cursor=cursor)


@cached
def evidence_events(data_dir: str, where: EventFilter, limit: int) -> Page:
    """A finding's evidence events (``where.event_ids``): read through the task-tree index, row by row, when it
    knows them all (a burst's evidence is spread over a month of files), else found by scanning the lake."""
    reader = tree_index(data_dir).reader_of(where.event_ids or ()) or LakeReader(Path(data_dir))
    return search(reader, where, limit=limit)


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


@st.cache_resource(show_spinner=False)
def review_facts(data_dir: str) -> LakeAggregates:
    """One set of daily review facts per data dir (``query.recert.review.DAILY_FACTS``), kept like the hourly
    aggregates: written in the background from the first sign-in on and after each review."""
    facts = LakeAggregates(LakeReader(Path(data_dir)), DAILY_FACTS)
    facts.warm()
    return facts


@cached_for(REPORT_SECONDS)
def recert_review(data_dir: str, tenant: str, window: str) -> tuple[Review, dict[str, Any], str]:
    facts = review_facts(data_dir)
    review = signed_review(Path(data_dir), tenant, window_days=parse_window(window), facts=facts)
    facts.warm()
    return review


@cached_for(REPORT_SECONDS)
def recert_file(data_dir: str, tenant: str, window: str, form: str) -> SignedReport:
    review, body, jws = recert_review(data_dir, tenant, window)
    return SignedReport(review, form, render(body, jws, form))


def recert_content(data_dir: str, tenant: str, window: str, form: str) -> bytes:
    """The signed report's file, for a download button to render when it is clicked."""
    return recert_file(data_dir, tenant, window, form).content


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
