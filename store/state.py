"""Derived state beside the lake, in SQLite: the event-id index, chain heads and the emitter registry.

Nothing here is the source of truth. The write-ahead log and the lake are; every row in this database can be
rebuilt from them (``rebuild``), which is what happens when the file is missing or was left half-built. It exists
because ingest needs point lookups the lake cannot serve fast: "is this event_id stored, and with which hash?",
"what hash does emitter E have at seq N?", "which keys does emitter E have?". SQLite runs with
``synchronous=OFF``: a process crash loses nothing (the OS has the pages), and an OS crash at worst loses rows that
the WAL replay puts back.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from store.ground.canonical import ZERO_HASH

__all__ = ["EmitterRecord", "Head", "IndexEntry", "KeyRecord", "StateDB"]

_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id BLOB PRIMARY KEY, emitter TEXT NOT NULL, seq INTEGER NOT NULL, event_hash BLOB NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_emitter_seq ON events (emitter, seq);
CREATE TABLE IF NOT EXISTS heads (emitter TEXT PRIMARY KEY, seq INTEGER NOT NULL, event_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS emitters (
    emitter TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    kid TEXT PRIMARY KEY, emitter TEXT NOT NULL, jwk TEXT NOT NULL, added_at TEXT NOT NULL,
    revoked_at TEXT, revoke_reason TEXT
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Head:
    seq: int = 0
    event_hash: str = ZERO_HASH

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.event_hash}


@dataclass(frozen=True, slots=True)
class IndexEntry:
    event_id: str
    emitter: str
    seq: int
    event_hash: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    kid: str
    emitter: str
    jwk: dict[str, Any]
    added_at: str
    revoked_at: str | None = None
    revoke_reason: str | None = None


@dataclass(frozen=True, slots=True)
class EmitterRecord:
    emitter: str
    tenant: str
    kind: str
    created_at: str
    kids: tuple[str, ...] = field(default=())


def _id_bytes(event_id: str) -> bytes:
    """The 16 bytes of a lowercase, hyphenated UUID (the protocol's only form), without building a UUID object."""
    return bytes.fromhex(event_id.replace("-", ""))


class StateDB:
    """Thread-safe access to the derived state. Every write is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.executescript(_SCHEMA)

    @property
    def complete(self) -> bool:
        """False until a rebuild finished (or on a new data dir, until ``mark_complete``)."""
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        return row is not None and row[0] == _SCHEMA_VERSION

    def mark_complete(self) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))

    def reset(self) -> None:
        with self._lock:
            self._conn.executescript(
                "DELETE FROM meta; DELETE FROM events; DELETE FROM heads; DELETE FROM emitters; DELETE FROM keys;"
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- events and heads -------------------------------------------------------------------------------------

    def find_event_ids(self, event_ids: Sequence[str]) -> dict[str, IndexEntry]:
        found: dict[str, IndexEntry] = {}
        with self._lock:
            for start in range(0, len(event_ids), 500):
                chunk = [_id_bytes(event_id) for event_id in event_ids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT event_id, emitter, seq, event_hash FROM events WHERE event_id IN ({marks})"  # noqa: S608
                for raw_id, emitter, seq, digest in self._conn.execute(query, chunk):
                    event_id = str(uuid.UUID(bytes=raw_id))
                    found[event_id] = IndexEntry(event_id, emitter, seq, digest.hex())
        return found

    def hashes_at(self, emitter: str, seqs: Iterable[int]) -> dict[int, str]:
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, event_hash FROM events WHERE emitter = ? AND seq BETWEEN ? AND ?",
                (emitter, wanted[0], wanted[-1]),
            ).fetchall()
        wanted_set = set(wanted)
        return {seq: digest.hex() for seq, digest in rows if seq in wanted_set}

    def record_events(self, entries: Sequence[IndexEntry], admin: Sequence[tuple[dict[str, Any], str]] = ()) -> None:
        """Index events (idempotent), advance heads, and apply admin changes, in one transaction."""
        heads: dict[str, tuple[int, str]] = {}
        for entry in entries:
            if entry.seq > heads.get(entry.emitter, (0, ""))[0]:
                heads[entry.emitter] = (entry.seq, entry.event_hash)
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?)",
                    [
                        (_id_bytes(entry.event_id), entry.emitter, entry.seq, bytes.fromhex(entry.event_hash))
                        for entry in entries
                    ],
                )
                self._conn.executemany(
                    "INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT (emitter) DO UPDATE"
                    " SET seq = excluded.seq, event_hash = excluded.event_hash WHERE excluded.seq > heads.seq",
                    [(emitter, seq, digest) for emitter, (seq, digest) in heads.items()],
                )
                for change, occurred_at in admin:
                    self._apply_admin(change, occurred_at)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def heads(self) -> dict[str, Head]:
        with self._lock:
            rows = self._conn.execute("SELECT emitter, seq, event_hash FROM heads").fetchall()
        return {emitter: Head(seq, digest) for emitter, seq, digest in rows}

    # -- registry ---------------------------------------------------------------------------------------------

    def _apply_admin(self, change: dict[str, Any], occurred_at: str) -> None:
        """Fold one admin change of the server stream into the registry; applying it twice changes nothing."""
        action = change["action"]
        if action in ("emitter_registered", "server_key"):
            self._conn.execute(
                "INSERT OR IGNORE INTO emitters VALUES (?, ?, ?, ?)",
                (change["emitter"], change["tenant"], change["kind"], occurred_at),
            )
        if action in ("key_added", "server_key"):
            self._conn.execute(
                "INSERT OR IGNORE INTO keys (kid, emitter, jwk, added_at) VALUES (?, ?, ?, ?)",
                (change["kid"], change["emitter"], orjson.dumps(change["jwk"]).decode(), occurred_at),
            )
        elif action == "key_revoked":
            self._conn.execute(
                "UPDATE keys SET revoked_at = ?, revoke_reason = ? WHERE kid = ? AND revoked_at IS NULL",
                (occurred_at, change.get("reason"), change["kid"]),
            )

    def emitters(self) -> dict[str, EmitterRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT emitter, tenant, kind, created_at FROM emitters").fetchall()
            kid_rows = self._conn.execute("SELECT emitter, kid FROM keys ORDER BY added_at, kid").fetchall()
        kids: dict[str, list[str]] = {}
        for emitter, kid in kid_rows:
            kids.setdefault(emitter, []).append(kid)
        return {
            emitter: EmitterRecord(emitter, tenant, kind, created_at, tuple(kids.get(emitter, ())))
            for emitter, tenant, kind, created_at in rows
        }

    def keys(self) -> dict[str, KeyRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kid, emitter, jwk, added_at, revoked_at, revoke_reason FROM keys"
            ).fetchall()
        return {
            kid: KeyRecord(kid, emitter, orjson.loads(jwk), added_at, revoked_at, reason)
            for kid, emitter, jwk, added_at, revoked_at, reason in rows
        }
