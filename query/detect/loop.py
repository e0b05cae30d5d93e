"""The detection loop of ``custody serve``: every ``interval`` it reads the lake's new events (by log index, after the
cursor kept in the findings store), runs the detector on them, merges what it finds into the findings store with
the alerts it raises, and records every change of a finding as an event of the server's signed stream.

It runs beside ingest in the same process, reading what the lake writer wrote: nothing on the path of an
acknowledgement waits for it. On start it rebuilds the detector's state from the lake (a few queries, not a
replay); on a data dir whose findings store is missing, it first runs the whole-lake query once (the findings of
events from before detection are recorded, without alerts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from query.detect.alerts import AlertChannels, Dispatcher
from query.detect.engine import INCREMENTAL_KINDS, PERIODIC_KINDS, Detector, lake_agents
from query.detect.records import FindingStore, Merged
from query.findings import FindingSettings, RuleBook, findings
from query.lake import LakeReader
from store.ground.layout import DataDir

__all__ = ["DetectionLoop", "DetectionStats", "findings_store_path"]

log = logging.getLogger("custody.detect")
BATCH = 20_000  # events per detector batch
_GAP_WAIT = 30.0


def findings_store_path(data_dir: Path) -> Path:
    return DataDir(data_dir).state / "findings.sqlite"


@dataclass
class DetectionStats:
    cursor: int = -1
    batches: int = 0
    events: int = 0
    opened: int = 0
    last_error: str | None = None


class DetectionLoop:
    def __init__(
        self,
        data_dir: Path,
        *,
        channels: AlertChannels | None = None,
        settings: FindingSettings | RuleBook | None = None,
        record: Callable[[list[dict[str, Any]]], int] | None = None,
        interval: float = 1.0,
        periodic_every: float = 3600.0,
    ) -> None:
        self.data_dir = data_dir
        self.lake = LakeReader(data_dir)
        self.store = FindingStore(findings_store_path(data_dir))
        self.channels = channels or AlertChannels("http://127.0.0.1:8501", ())
        self.detector = Detector(self.lake, settings)
        self.record = record
        self.interval = interval
        self.periodic_every = periodic_every
        self._periodic_at = 0.0  # monotonic time of the last periodic run (0: not yet)
        self.stats = DetectionStats()
        self.dispatcher = Dispatcher(self.store, self.channels, DataDir(data_dir).state / "alerts-dead-letter.jsonl")
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by wake(): the lake has new events
        self._thread: threading.Thread | None = None
        self._gap: tuple[int, float] | None = None

    def start(self) -> None:
        self.dispatcher.start()
        self._thread = threading.Thread(target=self._run, name="custody-detect", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """The lake has new events: run a round now rather than at the next interval (the store's flusher calls it;
        it never blocks)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.dispatcher.stop()
        self.store.close()

    def _run(self) -> None:
        try:
            self.catch_up()
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("detection could not start; it retries")
        while not self._stop.is_set():
            try:
                self.run_once()
                self.run_periodic()
                self.record_transitions()
                self.stats.last_error = None
            except Exception as exc:  # a lake file mid-compaction, a full disk: the next round retries
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("detection round failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def catch_up(self) -> None:
        """Before the first round: a store behind the lake gets the whole-lake findings once; the detector's state
        is rebuilt from the lake up to the cursor."""
        cursor = self.store.cursor()
        with self.lake.connect() as connection:
            [(newest,)] = connection.execute("SELECT max(log_index) FROM all_events").fetchall()
        if newest is not None and cursor < 0:  # events from before detection: findings, but not news
            log.info("findings store is new on a lake of %d events: running the whole-lake query once", newest + 1)
            found = findings(self.lake, kinds=INCREMENTAL_KINDS, settings=self.detector.settings, evidence_limit=None)
            # history, not news: no alerts
            self.store.merge(found, cursor=newest, agents=lake_agents(self.lake, found))
            cursor = newest
        filled = self.store.fill_agents(lambda found: lake_agents(self.lake, found))
        if filled:
            log.info("the agents of %d findings recorded before they were kept: read from the lake", filled)
        self.detector.warm(cursor)
        self.stats.cursor = cursor

    def run_once(self) -> int:
        """One round: the lake's events after the cursor, in batches; returns how many were read."""
        total = 0
        while not self._stop.is_set():
            cursor = self.store.cursor()
            with self.lake.connect() as connection:
                batch: pa.Table = connection.sql(
                    f"SELECT * FROM all_events WHERE log_index > {int(cursor)} ORDER BY log_index LIMIT {BATCH}"
                ).to_arrow_table()
            if batch.num_rows == 0:
                break
            batch = self._in_order(batch, cursor)
            if batch.num_rows == 0:
                break
            found = self.detector.observe(batch)
            newest = int(batch["log_index"][-1].as_py())
            merged = self.store.merge(found, cursor=newest, alerts=self.channels.route, agents=self.detector.agents)
            self._note(batch, merged, newest)
            total += batch.num_rows
            if batch.num_rows < BATCH:
                break
        return total

    def run_periodic(self, *, force: bool = False) -> int:
        """The kinds about time passing rather than an arriving event (``over_privileged``: a scope unused for N
        days), run on the whole lake every ``periodic_every`` seconds; returns the findings changed."""
        now = time.monotonic()
        if not force and self._periodic_at and now - self._periodic_at < self.periodic_every:
            return 0
        self._periodic_at = now
        found = findings(self.lake, kinds=PERIODIC_KINDS, settings=self.detector.settings, evidence_limit=None)
        return len(self.store.merge(found, alerts=self.channels.route, agents=lake_agents(self.lake, found)))

    def _in_order(self, batch: pa.Table, cursor: int) -> pa.Table:
        """The batch up to its first gap in log order. Events reach the lake a WAL segment at a time, in log order,
        so a gap is a segment still being written: the rest waits for the next round. A gap right after the
        cursor that lasts ``_GAP_WAIT`` seconds is an event that will never be in the lake (quarantined: named by
        ``custody quarantine list``), and is passed over."""
        indexes = batch["log_index"].to_pylist()
        run = 0
        while run < len(indexes) and indexes[run] == cursor + 1 + run:
            run += 1
        if run:
            self._gap = None
            return batch.slice(0, run)
        now = time.monotonic()
        if self._gap is None or self._gap[0] != cursor:
            self._gap = (cursor, now)
        if now - self._gap[1] < _GAP_WAIT:
            return batch.slice(0, 0)
        log.warning("log indexes %d to %d are not in the lake after %.0f s; detection goes on past them",
                    cursor + 1, indexes[0] - 1, _GAP_WAIT)  # fmt: skip
        self._gap = None
        return batch

    def _note(self, batch: pa.Table, merged: list[Merged], newest: int) -> None:
        stats = self.stats
        stats.cursor, stats.batches, stats.events = newest, stats.batches + 1, stats.events + batch.num_rows
        stats.opened += sum(1 for item in merged if item.opened)
        for item in merged:
            if item.opened:
                record = item.record
                log.warning("finding %d opened: %s %s (%s)", record.id, record.severity, record.title, record.tenant)

    def record_transitions(self) -> None:
        """Each change of a finding (opened, acknowledged, resolved, suppressed, assigned, commented) becomes an
        event of the server's signed stream (``admin.finding``), once."""
        if self.record is None:
            return
        pending = self.store.unrecorded()
        if not pending:
            return
        changes = [
            {
                "action": "finding",
                "finding_id": item["finding_id"],
                "change": item["action"],
                "status": item["status"],
                "actor": item["actor"],
                "at": item["at"],
                "comment": item["comment"],
                "tenant": item["tenant"],
                "kind": item["kind"],
                "subject": item["subject"],
                "severity": item["severity"],
            }
            for item in pending
        ]
        first = self.record(changes)
        for offset, item in enumerate(pending):
            self.store.recorded([item["id"]], first + offset)
