"""Findings as records with a lifecycle, beside the lake: ``<data-dir>/state/findings.sqlite``.

A finding is one (tenant, kind, subject): a new use of the same revoked credential adds evidence to the finding
that is open for it, not a new finding. Its status is ``open``, ``acknowledged``, ``resolved`` or ``suppressed``
(with a reason and an expiry); every change says who made it and when, and stays in its history. Evidence that
arrives for a resolved finding opens a new one (the old keeps its history); for a suppressed finding it is added
quietly until the suppression expires. The table ``outbox`` holds the alerts not yet delivered (query.detect.alerts)
and ``transitions`` the changes not yet recorded in the server's signed stream.

The lake stays the truth: a record names its evidence by event id, and every reader shows those events from the
lake. SQLite in WAL mode lets the dashboard and the read API read while the detector writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from query.findings import MAX_EVIDENCE, Finding, ordered

__all__ = [
    "ACTIONS",
    "STATUSES",
    "FindingRecord",
    "FindingStore",
    "Merged",
    "Recorded",
    "TransitionError",
    "recorded_findings",
    "triage_statuses",
]

STATUSES = ("open", "acknowledged", "resolved", "suppressed")
ACTIONS = ("acknowledge", "resolve", "reopen", "suppress", "assign", "comment")
Severity = Literal["critical", "high", "medium", "low"]
_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL, severity TEXT NOT NULL, title TEXT NOT NULL,
    owasp TEXT NOT NULL, status TEXT NOT NULL, assignee TEXT, suppressed_until TEXT, suppress_reason TEXT,
    first_seen TEXT, last_seen TEXT, opened_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    evidence_count INTEGER NOT NULL DEFAULT 0, details TEXT NOT NULL DEFAULT '{}', agents TEXT);
CREATE INDEX IF NOT EXISTS findings_key ON findings (tenant, kind, subject, status);
CREATE INDEX IF NOT EXISTS findings_queue ON findings (tenant, status, severity, updated_at);
CREATE TABLE IF NOT EXISTS evidence (
    finding_id INTEGER NOT NULL, event_id TEXT NOT NULL, added_at TEXT NOT NULL,
    PRIMARY KEY (finding_id, event_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, finding_id INTEGER NOT NULL, at TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, status TEXT NOT NULL, comment TEXT, recorded_log_index INTEGER);
CREATE INDEX IF NOT EXISTS history_finding ON history (finding_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, channel TEXT NOT NULL, finding_id INTEGER NOT NULL, body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, created_at REAL NOT NULL, last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (channel, next_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class TransitionError(ValueError):
    """A change the finding's state does not allow, or a finding the caller may not see."""


@dataclass(frozen=True)
class FindingRecord:
    id: int
    tenant: str
    kind: str
    subject: str
    severity: str
    title: str
    owasp: list[str]
    status: str
    assignee: str | None
    suppressed_until: str | None
    suppress_reason: str | None
    first_seen: str | None
    last_seen: str | None
    opened_at: str
    updated_at: str
    evidence_count: int
    details: dict[str, Any]
    agents: list[str] | None  # the agents its evidence names; None: recorded before they were kept

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Merged:
    """What merging one detected finding changed: the record, the evidence it gained, and whether it is new."""

    record: FindingRecord
    added: list[str]
    opened: bool
    quiet: bool  # suppressed: evidence kept, nobody alerted


class FindingStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(findings)")}
        if "agents" not in columns:  # a store from before the agents were kept: filled in by ``fill_agents``
            self._db.execute("ALTER TABLE findings ADD COLUMN agents TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- detection writes ---------------------------------------------------------------------------------------

    def merge(
        self,
        found: Sequence[Finding],
        *,
        cursor: int | None = None,
        alerts: Callable[[Merged], list[tuple[str, dict[str, Any]]]] | None = None,
        now: datetime | None = None,
        agents: Mapping[tuple[str, str, str], Sequence[str]] | None = None,
    ) -> list[Merged]:
        """Merge detected findings (each with some of its evidence) in one transaction with the detector's cursor
        (the last log index it has seen) and the alerts they raise (``alerts``: channel and body per change), so
        that a crash neither records evidence twice, nor loses the cursor, nor an alert. ``agents``: the agents
        each finding's evidence names (``query.detect.engine.named_agents``), kept with the record."""
        stamp = _stamp(now)
        changed: list[Merged] = []
        with self._transaction() as db:
            for finding in found:
                named = None if agents is None else agents.get((finding.tenant, finding.kind, finding.subject))
                item = self._merge_one(db, finding, stamp, named)
                if item.added or item.opened:
                    changed.append(item)
                    for channel, body in alerts(item) if alerts is not None else []:
                        db.execute(
                            "INSERT INTO outbox (channel, finding_id, body, next_at, created_at)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (channel, item.record.id, json.dumps(body, sort_keys=True), time.time(), time.time()),
                        )
            if cursor is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (str(cursor),))
        return changed

    def _merge_one(self, db: sqlite3.Connection, finding: Finding, stamp: str, named: Sequence[str] | None) -> Merged:
        row = db.execute(
            "SELECT id, status, suppressed_until FROM findings WHERE tenant = ? AND kind = ? AND subject = ?"
            " AND status <> 'resolved' ORDER BY id DESC LIMIT 1",
            (finding.tenant, finding.kind, finding.subject),
        ).fetchone()
        opened = row is None
        if row is not None and row[1] == "suppressed" and row[2] is not None and row[2] <= stamp:
            db.execute("UPDATE findings SET status = 'open', updated_at = ? WHERE id = ?", (stamp, row[0]))
            self._log(db, row[0], stamp, "custody.detector", "reopen", "open", "the suppression expired")
            row = (row[0], "open", None)
        if row is None:
            cursor = db.execute(
                "INSERT INTO findings (tenant, kind, subject, severity, title, owasp, status, first_seen, last_seen,"
                " opened_at, updated_at, details, agents) VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                (
                    finding.tenant,
                    finding.kind,
                    finding.subject,
                    finding.severity,
                    finding.title,
                    json.dumps(finding.owasp),
                    finding.first_seen,
                    finding.last_seen,
                    stamp,
                    stamp,
                    json.dumps(finding.details, default=str),
                    None if named is None else json.dumps(sorted(set(named))),
                ),
            )
            finding_id = int(cursor.lastrowid or 0)
            self._log(db, finding_id, stamp, "custody.detector", "open", "open", None)
            status = "open"
        else:
            finding_id, status = int(row[0]), str(row[1])
        added = []
        for event_id in finding.evidence:
            inserted = db.execute(
                "INSERT OR IGNORE INTO evidence VALUES (?, ?, ?)", (finding_id, event_id, stamp)
            ).rowcount
            if inserted:
                added.append(event_id)
        if added and not opened:
            db.execute(
                "UPDATE findings SET evidence_count = evidence_count + ?, updated_at = ?,"
                " first_seen = min(coalesce(first_seen, ?), ?), last_seen = max(coalesce(last_seen, ?), ?),"
                " details = ? WHERE id = ?",
                (
                    len(added),
                    stamp,
                    finding.first_seen,
                    finding.first_seen,
                    finding.last_seen,
                    finding.last_seen,
                    json.dumps(finding.details, default=str),
                    finding_id,
                ),
            )
        elif opened:
            db.execute("UPDATE findings SET evidence_count = ? WHERE id = ?", (len(added), finding_id))
        if added and not opened and named:  # a record without agents stays without until fill_agents
            db.execute(
                "UPDATE findings SET agents = (SELECT json_group_array(value) FROM (SELECT value FROM"
                " json_each(agents) UNION SELECT value FROM json_each(?) ORDER BY value)) WHERE id = ?"
                " AND agents IS NOT NULL",
                (json.dumps(list(named)), finding_id),
            )
        record = self._record(db, finding_id)
        return Merged(record, added, opened, quiet=status == "suppressed")

    def fill_agents(self, agents_of: Callable[[list[Finding]], Mapping[tuple[str, str, str], Sequence[str]]]) -> int:
        """Give the records kept before agents were (``agents`` NULL) the agents of their evidence, as
        ``agents_of`` reads them from the lake. Returns how many records it filled."""
        ids = [int(row[0]) for row in self._db.execute("SELECT id FROM findings WHERE agents IS NULL")]
        for finding_id in ids:
            record = self._record(self._db, finding_id)
            evidence = self.evidence(finding_id, limit=None)
            probe = Finding(record.kind, record.severity, record.tenant, record.subject, record.title, record.owasp,
                            evidence, len(evidence))  # fmt: skip
            named = agents_of([probe]).get((record.tenant, record.kind, record.subject), [])
            with self._transaction() as db:
                db.execute("UPDATE findings SET agents = ? WHERE id = ?", (json.dumps(sorted(named)), finding_id))
        return len(ids)

    def cursor(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'cursor'").fetchone()
        return int(row[0]) if row else -1

    # -- analysts' changes --------------------------------------------------------------------------------------

    def transition(
        self,
        finding_id: int,
        action: str,
        actor: str,
        *,
        tenant: str | None,
        comment: str | None = None,
        assignee: str | None = None,
        until: datetime | None = None,
        now: datetime | None = None,
    ) -> FindingRecord:
        """Apply an analyst's ``action`` to a finding of ``tenant`` (any tenant when None: an all-tenant token)."""
        if action not in ACTIONS:
            raise TransitionError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
        stamp = _stamp(now)
        with self._transaction() as db:
            row = db.execute("SELECT tenant, status FROM findings WHERE id = ?", (finding_id,)).fetchone()
            if row is None or (tenant is not None and row[0] != tenant):
                raise TransitionError(f"no finding {finding_id}")  # another tenant's finding does not exist here
            status = str(row[1])
            target = {
                "acknowledge": "acknowledged",
                "resolve": "resolved",
                "reopen": "open",
                "suppress": "suppressed",
            }.get(action, status)
            if action == "acknowledge" and status != "open":
                raise TransitionError(f"only an open finding can be acknowledged; finding {finding_id} is {status}")
            if action == "reopen" and status == "open":
                raise TransitionError(f"finding {finding_id} is open already")
            if action == "resolve" and status == "resolved":
                raise TransitionError(f"finding {finding_id} is resolved already")
            if action == "suppress":
                if not comment or until is None:
                    raise TransitionError("a suppression needs a reason (comment) and an expiry (until)")
                db.execute(
                    "UPDATE findings SET suppressed_until = ?, suppress_reason = ? WHERE id = ?",
                    (_stamp(until), comment, finding_id),
                )
            if action == "comment" and not comment:
                raise TransitionError("a comment needs its text")
            if action == "assign":
                db.execute("UPDATE findings SET assignee = ? WHERE id = ?", (assignee, finding_id))
            if action == "reopen":
                db.execute(
                    "UPDATE findings SET suppressed_until = NULL, suppress_reason = NULL WHERE id = ?", (finding_id,)
                )
            db.execute("UPDATE findings SET status = ?, updated_at = ? WHERE id = ?", (target, stamp, finding_id))
            detail = (
                comment
                if action != "assign"
                else f"assigned to {assignee or 'nobody'}" + (f": {comment}" if comment else "")
            )
            self._log(db, finding_id, stamp, actor, action, target, detail)
            return self._record(db, finding_id)

    # -- reading ------------------------------------------------------------------------------------------------

    def queue(
        self,
        *,
        tenant: str | None,
        statuses: Sequence[str] = ("open", "acknowledged"),
        kinds: Sequence[str] = (),
        min_severity: str = "low",
        assignee: str | None = None,
        limit: int = 500,
    ) -> list[FindingRecord]:
        """The triage queue: most severe first, then most recently changed."""
        where, params = ["status IN (SELECT value FROM json_each(?))"], [json.dumps(list(statuses))]
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if kinds:
            where.append("kind IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(kinds)))
        if assignee is not None:
            where.append("assignee = ?")
            params.append(assignee)
        severities = [name for name, rank in _RANK.items() if rank <= _RANK[min_severity]]
        where.append("severity IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(severities))
        rows = self._db.execute(
            f"SELECT id FROM findings WHERE {' AND '.join(where)} ORDER BY"  # fixed fragments; values bound
            " CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'medium' THEN 2 ELSE 3 END, updated_at DESC"
            " LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [self._record(self._db, int(row[0])) for row in rows]

    def get(self, finding_id: int, *, tenant: str | None) -> FindingRecord:
        record = self._record(self._db, finding_id)
        if tenant is not None and record.tenant != tenant:
            raise TransitionError(f"no finding {finding_id}")  # another tenant's finding does not exist here
        return record

    def evidence(self, finding_id: int, *, limit: int | None = 1000) -> list[str]:
        rows = self._db.execute(
            "SELECT event_id FROM evidence WHERE finding_id = ? ORDER BY added_at, event_id LIMIT ?",
            (finding_id, -1 if limit is None else limit),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def history(self, finding_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT at, actor, action, status, comment, recorded_log_index FROM history WHERE finding_id = ?"
            " ORDER BY id",
            (finding_id,),
        ).fetchall()
        names = ("at", "actor", "action", "status", "comment", "recorded_log_index")
        return [dict(zip(names, row, strict=True)) for row in rows]

    # -- the outbox of alerts and of transitions to record ------------------------------------------------------

    def due(self, channel: str, limit: int = 50) -> list[tuple[int, str, int, float]]:
        """(id, body, attempts, created_at) of the alerts of ``channel`` due now, oldest first."""
        rows = self._db.execute(
            "SELECT id, body, attempts, created_at FROM outbox WHERE channel = ? AND next_at <= ? ORDER BY id LIMIT ?",
            (channel, time.time(), limit),
        ).fetchall()
        return [(int(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    def delivered(self, alert_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (alert_id,))

    def retry_later(self, alert_id: int, delay: float, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
                (time.time() + delay, error[:1000], alert_id),
            )

    def pending_alerts(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def unrecorded(self, limit: int = 100) -> list[dict[str, Any]]:
        """Changes not yet written to the server's signed stream, oldest first."""
        rows = self._db.execute(
            "SELECT h.id, h.finding_id, h.at, h.actor, h.action, h.status, h.comment, f.tenant, f.kind, f.subject,"
            " f.severity FROM history h JOIN findings f ON f.id = h.finding_id WHERE h.recorded_log_index IS NULL"
            " ORDER BY h.id LIMIT ?",
            (limit,),
        ).fetchall()
        names = (
            "id",
            "finding_id",
            "at",
            "actor",
            "action",
            "status",
            "comment",
            "tenant",
            "kind",
            "subject",
            "severity",
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def recorded(self, history_ids: Sequence[int], log_index: int) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE history SET recorded_log_index = ? WHERE id = ?", [(log_index, hid) for hid in history_ids]
            )

    # -- parts --------------------------------------------------------------------------------------------------

    def _log(
        self,
        db: sqlite3.Connection,
        finding_id: int,
        stamp: str,
        actor: str,
        action: str,
        status: str,
        comment: str | None,
    ) -> None:
        db.execute(
            "INSERT INTO history (finding_id, at, actor, action, status, comment) VALUES (?, ?, ?, ?, ?, ?)",
            (finding_id, stamp, actor, action, status, comment),
        )

    def _record(self, db: sqlite3.Connection, finding_id: int) -> FindingRecord:
        row = db.execute(
            "SELECT id, tenant, kind, subject, severity, title, owasp, status, assignee, suppressed_until,"
            " suppress_reason, first_seen, last_seen, opened_at, updated_at, evidence_count, details, agents"
            " FROM findings WHERE id = ?",
            (finding_id,),
        ).fetchone()
        if row is None:
            raise TransitionError(f"no finding {finding_id}")
        values = list(row)
        values[6] = json.loads(values[6])
        values[16] = json.loads(values[16])
        values[17] = None if values[17] is None else json.loads(values[17])
        return FindingRecord(*values)


@dataclass(frozen=True)
class Recorded:
    """One finding over the whole log as detection recorded it: its records (one per time it was opened) merged."""

    finding: Finding  # evidence: the first MAX_EVIDENCE ids; evidence_total: every distinct id
    status: str  # of its newest record; an expired suppression reads as open
    agents: list[str] | None  # the agents its evidence names; None: a record from before they were kept


def recorded_findings(path: Path, tenant: str | None) -> tuple[int, list[Recorded]] | None:
    """The findings continuous detection recorded at ``path`` (of ``tenant``; every tenant's if None), read only,
    and the last log index detection had examined; None when there is no store. Detection sees every event once
    and keeps every evidence id, so over the events up to that index these are the whole-lake query's findings
    (with the rules file of the server that ran it)."""
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            return _recorded(db, tenant)
    except sqlite3.Error:
        return None


def _recorded(db: sqlite3.Connection, tenant: str | None) -> tuple[int, list[Recorded]]:
    [cursor] = db.execute("SELECT coalesce(max(CAST(value AS INTEGER)), -1) FROM meta WHERE name = 'cursor'").fetchone()
    groups = db.execute(
        "SELECT json_group_array(id), min(first_seen), max(last_seen), sum(evidence_count) FROM"
        " (SELECT * FROM findings WHERE ? IS NULL OR tenant = ? ORDER BY id) GROUP BY tenant, kind, subject",
        (tenant, tenant),
    ).fetchall()
    now = _stamp(None)
    every = []
    for ids_text, first, last, counted in groups:
        ids = json.loads(ids_text)
        newest = db.execute(
            "SELECT tenant, kind, subject, severity, title, owasp, status, suppressed_until, details, agents"
            " FROM findings WHERE id = ?",
            (ids[-1],),
        ).fetchone()
        kind_of, status, until = newest[1], str(newest[6]), newest[7]
        if status == "suppressed" and until is not None and str(until) <= now:
            status = "open"
        which = f"finding_id IN ({', '.join('?' * len(ids))})"  # placeholders only; the ids are bound
        total = counted
        if len(ids) > 1:  # evidence may repeat across the records of one finding
            [total] = db.execute(f"SELECT count(DISTINCT event_id) FROM evidence WHERE {which}", ids).fetchone()
        listing = (  # the first recorded first; an id in two records once (grouping costs 4x: only then)
            f"SELECT event_id FROM evidence WHERE {which} GROUP BY event_id ORDER BY min(added_at), event_id LIMIT ?"
            if len(ids) > 1
            else f"SELECT event_id FROM evidence WHERE {which} ORDER BY added_at, event_id LIMIT ?"
        )
        evidence = [str(row[0]) for row in db.execute(listing, [*ids, MAX_EVIDENCE])]
        agents = db.execute(
            f"SELECT count(*) FILTER (WHERE f.agents IS NULL), json_group_array(DISTINCT names.value) FROM findings f"
            f" LEFT JOIN json_each(coalesce(f.agents, '[]')) names WHERE f.id IN ({', '.join('?' * len(ids))})",
            ids,
        ).fetchone()
        finding = Finding(
            kind=str(kind_of),
            severity=str(newest[3]),
            tenant=str(newest[0]),
            subject=str(newest[2]),
            title=str(newest[4]),
            owasp=json.loads(newest[5]),
            evidence=evidence,
            evidence_total=int(total),
            first_seen=first,
            last_seen=last,
            details=json.loads(newest[8]),
        )
        named = None if agents[0] else sorted(name for name in json.loads(agents[1]) if name is not None)
        every.append(Recorded(finding, status, named))
    rank = {id(item.finding): position for position, item in enumerate(every)}
    return int(cursor), [every[rank[id(finding)]] for finding in ordered([item.finding for item in every])]


def triage_statuses(path: Path, tenant: str) -> dict[tuple[str, str], str]:
    """(kind, subject) -> the status of each of the tenant's findings in the queue at ``path``, read only (no queue:
    empty); an expired suppression reads as open, as the next merge makes it."""
    if not path.exists():
        return {}
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT kind, subject, status, suppressed_until FROM findings WHERE tenant = ? ORDER BY id",
                (tenant,),  # the newest record of a (kind, subject) last: a finding that came back after resolution
            ).fetchall()
    except sqlite3.Error:
        return {}
    now = _stamp(None)
    statuses = {}
    for kind, subject, status, until in rows:
        if status == "suppressed" and until is not None and str(until) <= now:
            status = "open"
        statuses[(str(kind), str(subject))] = str(status)
    return statuses


def _stamp(moment: datetime | None) -> str:
    return (moment or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
