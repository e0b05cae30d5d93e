"""The event index written behind the ack path.

An accepted batch is acknowledged once the write-ahead log has it on disk. Its index entries (event_id -> emitter,
seq, hash; the chain heads) must be visible to the next request at once, for duplicate and conflict detection, but
they need not be in SQLite yet: the WAL is the record, and SQLite is derived state. So ``IndexWriter.add`` puts the
entries in memory, where ``find_event_ids`` and ``hashes_at`` see them, and a thread writes them to SQLite in one
transaction per 10 ms at most (it gathers the batches that arrive meanwhile). The request does not wait for SQLite,
whose commit would otherwise be part of every ack's latency.

Two rules keep the index complete:

- **A WAL segment leaves the disk only after its entries are in SQLite.** The flusher calls ``drain`` after it
  rotated the log and before it removes segments, and ``drain`` first waits for every append that began before it
  to hand over its entries (``begin``/``end`` tickets), then writes what is pending in the caller's thread. If
  SQLite fails, ``drain`` raises, the segments stay, and on a restart the WAL replay indexes them again.
- **Entries stay in memory until SQLite has them.** A failed write is retried every ``retry_after`` seconds; the
  acks go on meanwhile, because the WAL has the events.

Admin changes (the server's own stream) are written in the caller's thread (``write_now``), because the admin API
reads the registry back right after it appends.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from store.state import IndexEntry, StateDB

__all__ = ["IndexWriter"]

log = logging.getLogger(__name__)

AdminChange = tuple[dict[str, Any], str]


class IndexWriter:
    def __init__(self, state: StateDB, *, retry_after: float = 1.0, gather: float = 0.01) -> None:
        self._state = state
        self._retry_after = retry_after
        self._gather = gather  # after new entries wake the thread, it waits this long for more: fewer transactions
        self._lock = threading.Lock()  # guards the fields below
        # Three conditions on the one lock, so that each wait wakes only for what it waits for: the thread for new
        # entries (``_added``) or the stop (``_stopped``), ``drain`` for appends ending (``_ended``).
        self._added = threading.Condition(self._lock)
        self._ended = threading.Condition(self._lock)
        self._stopped = threading.Condition(self._lock)
        self._pending: dict[str, IndexEntry] = {}  # by event_id, in the order acknowledged
        self._admin: list[AdminChange] = []  # admin changes not yet in SQLite (their write failed)
        self._tickets = itertools.count()
        self._appending: set[int] = set()  # appends between WAL write and handing over their entries
        self._stopping = False
        self._write_lock = threading.Lock()  # one SQLite write at a time, so none removes another's entries
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- the ack path -----------------------------------------------------------------------------------------

    def begin(self) -> int:
        """Call before appending to the WAL; pass the ticket to ``end`` once the entries are added (or failed)."""
        with self._lock:
            ticket = next(self._tickets)
            self._appending.add(ticket)
            return ticket

    def end(self, ticket: int) -> None:
        with self._lock:
            self._appending.discard(ticket)
            self._ended.notify_all()

    def add(self, entries: Sequence[IndexEntry], admin: Sequence[AdminChange] = ()) -> None:
        """Make durable entries visible to lookups now and write them (and admin changes) to SQLite soon."""
        with self._lock:
            for entry in entries:
                self._pending[entry.event_id] = entry
            self._admin.extend(admin)
            self._added.notify()

    def write_now(self, entries: Sequence[IndexEntry], admin: Sequence[AdminChange]) -> None:
        """Write entries and admin changes in this thread. If SQLite fails they stay pending and are retried."""
        with self._write_lock:
            try:
                self._state.record_events(entries, admin)
                return
            except sqlite3.Error as exc:
                self._failed(exc, len(entries))
        self.add(entries, admin)

    # -- lookups: pending entries first, then SQLite (an entry leaves pending only after SQLite has it) ----------

    def find_event_ids(self, event_ids: Sequence[str]) -> dict[str, IndexEntry]:
        with self._lock:
            pending = {event_id: self._pending[event_id] for event_id in event_ids if event_id in self._pending}
        found = self._state.find_event_ids([event_id for event_id in event_ids if event_id not in pending])
        found.update(pending)
        return found

    def hashes_at(self, emitter: str, seqs: Sequence[int]) -> dict[int, str]:
        wanted = set(seqs)
        with self._lock:
            pending = {e.seq: e.event_hash for e in self._pending.values() if e.emitter == emitter and e.seq in wanted}
        found = self._state.hashes_at(emitter, [seq for seq in seqs if seq not in pending])
        found.update(pending)
        return found

    @property
    def pending(self) -> int:
        """Entries not yet in SQLite."""
        with self._lock:
            return len(self._pending)

    # -- writing ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="custody-indexer", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Wait for appends in flight, then write everything pending to SQLite. Raises sqlite3.Error."""
        with self._lock:
            started_before = set(self._appending)
            while started_before & self._appending:
                self._ended.wait()
        self._write_pending()

    def stop(self) -> None:
        """Stop the thread and write what is pending (on failure it is logged; the WAL replay restores it)."""
        with self._lock:
            self._stopping = True
            self._added.notify_all()
            self._stopped.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.drain()
        except sqlite3.Error as exc:
            log.error(
                "event index: %d entries not written at shutdown, the WAL replay restores them: %s", self.pending, exc
            )

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._pending or self._admin or self._stopping):
                    self._added.wait()
                if self._stopped.wait_for(lambda: self._stopping, timeout=self._gather):
                    return
            try:
                self._write_pending()
            except sqlite3.Error:
                with self._lock:
                    self._stopped.wait_for(lambda: self._stopping, timeout=self._retry_after)

    def _write_pending(self) -> None:
        with self._write_lock:
            with self._lock:
                entries = list(self._pending.values())
                admin = list(self._admin)
            if not entries and not admin:
                return
            try:
                self._state.record_events(entries, admin)
            except sqlite3.Error as exc:
                self._failed(exc, len(entries))
                raise
            self.last_error = None
            with self._lock:
                for entry in entries:
                    if self._pending.get(entry.event_id) is entry:
                        del self._pending[entry.event_id]
                del self._admin[: len(admin)]

    def _failed(self, exc: sqlite3.Error, count: int) -> None:
        self.last_error = str(exc)
        log.error("event index write failed, %d entries kept in memory until it works: %s", count, exc)
