"""Several ingest nodes on one PostgreSQL: ``custody serve --state postgresql://... --data-dir SHARED``.

What must be shared lives in PostgreSQL, and every decision about it is a PostgreSQL transaction (never a lock of
one node): event-id uniqueness (``custody_events``), emitter heads (``custody_heads``, rows locked ``FOR UPDATE``
in emitter order), the registry (``custody_emitters``, ``custody_keys``), and the transparency log's order (the
``custody_log`` row: a request takes its log indexes by updating it, and holds that row until it commits, so
indexes are handed out in commit order without a gap).

**The durable copy before the ack is the PostgreSQL commit** (``custody_pending``: the event's JWS and what the
lake stores beside it, in the same transaction as its chain decision). A node keeps nothing of its own on disk, so
losing a node, disk included, loses nothing acknowledged; losing the database's primary is covered by
PostgreSQL's own replication (``synchronous_standby_names`` for zero loss). A node-local WAL would have been
faster to sync, but then an ack would depend on the disk of the node that gave it.

One node at a time, the one holding the advisory lock ``LEADER_LOCK`` on its own connection, is the **leader**:
it moves committed events from ``custody_pending`` to the lake of the shared data dir in log order, a segment at a
time (the segment's number and index range are committed before its files are written, so a leader that dies
half-way is followed by one that writes the same segment again: the lake makes that idempotent), compacts the
lake (a single writer), and grows the Merkle log's tiles and checkpoints. When its connection goes, PostgreSQL
releases the lock and another node takes over, from the lake and what is still pending. ``docs/scale.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from store.engine import Store
from store.ground.canonical import ZERO_HASH
from store.ground.errors import CorruptState, CustodyError, StorageUnavailable
from store.ground.jws import decode_payload
from store.ground.layout import SERVER_EMITTER
from store.sequencing import ChainView, Decision, Sequencer
from store.state import EmitterRecord, Head, IndexEntry, KeyRecord
from store.wal import WalRecord

__all__ = ["ClusterStore", "PgSequencer", "PgState", "is_postgres_uri"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LEADER_LOCK = 0x637573746F6479  # "custody": the advisory lock of the node that writes the lake and the log
REGISTRY_LOCK = LEADER_LOCK + 1  # held while the registry checks a change and records it
SCHEMA_LOCK = LEADER_LOCK + 2
SEGMENT_EVENTS = 50_000  # at most this many events per lake segment
_NUMBERED = (  # the committed events from log index %(start)s to before %(end)s, with their indexes
    "SELECT b.first_index + p.ordinal AS log_index, {columns} FROM custody_batches b"
    " JOIN custody_pending p ON p.batch = b.batch"
    " WHERE b.first_index < %(end)s AND b.first_index + b.count > %(start)s"
    " AND b.first_index + p.ordinal >= %(start)s AND b.first_index + p.ordinal < %(end)s ORDER BY 1"
)
_LAST = 2**62  # an end past any log index
_RETRIES = 20  # a request that lost a race (the same event id from two emitters at once) is decided again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS custody_log (
    id int PRIMARY KEY CHECK (id = 1),
    size bigint NOT NULL,             -- the next log index
    lake_next bigint NOT NULL,        -- every index below it is in the lake
    segment bigint NOT NULL,          -- the last lake segment number handed out
    registry_version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS custody_events (
    event_id uuid PRIMARY KEY, emitter text NOT NULL, seq bigint NOT NULL, event_hash text NOT NULL,
    UNIQUE (emitter, seq)
);
CREATE TABLE IF NOT EXISTS custody_heads (emitter text PRIMARY KEY, seq bigint NOT NULL, event_hash text NOT NULL);
-- The durable copy of each acknowledged event until the lake has it. Its log index is its batch's first index
-- plus its ordinal: rows are written before the request takes its place in the log, so that the custody_log row
-- is held only for one small insert and the commit.
CREATE TABLE IF NOT EXISTS custody_pending (
    batch uuid NOT NULL, ordinal int NOT NULL, event_id text NOT NULL, emitter text NOT NULL, seq bigint NOT NULL,
    event_hash text NOT NULL, received_at_us bigint NOT NULL, kid text NOT NULL, jws text NOT NULL,
    PRIMARY KEY (batch, ordinal)
);
CREATE TABLE IF NOT EXISTS custody_batches (first_index bigint PRIMARY KEY, count int NOT NULL, batch uuid NOT NULL);
CREATE TABLE IF NOT EXISTS custody_segments (
    segment bigint PRIMARY KEY, first_index bigint NOT NULL, end_index bigint NOT NULL, done boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS custody_emitters (
    emitter text PRIMARY KEY, tenant text NOT NULL, kind text NOT NULL, created_at text NOT NULL
);
CREATE TABLE IF NOT EXISTS custody_keys (
    kid text PRIMARY KEY, emitter text NOT NULL, jwk text NOT NULL, added_at text NOT NULL,
    revoked_at text, revoke_reason text
);
"""


def is_postgres_uri(value: str | None) -> bool:
    return value is not None and value.startswith(("postgresql://", "postgres://"))


def _unavailable(exc: Exception) -> StorageUnavailable:
    return StorageUnavailable(f"PostgreSQL: {type(exc).__name__}: {str(exc).strip() or 'connection lost'}")


class PgState:
    """The registry and the heads, read from PostgreSQL (``store.state.StateDB``'s readers, shared by nodes)."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool

    def _rows(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection() as conn:
                rows: list[tuple[Any, ...]] = conn.execute(query, params).fetchall()
                return rows
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def heads(self) -> dict[str, Head]:
        return {emitter: Head(seq, digest) for emitter, seq, digest in self._rows("SELECT * FROM custody_heads")}

    def head(self, emitter: str) -> Head:
        rows = self._rows("SELECT seq, event_hash FROM custody_heads WHERE emitter = %s", (emitter,))
        return Head(rows[0][0], rows[0][1]) if rows else Head()

    def emitters(self) -> dict[str, EmitterRecord]:
        kids: dict[str, list[str]] = {}
        for emitter, kid in self._rows("SELECT emitter, kid FROM custody_keys ORDER BY added_at, kid"):
            kids.setdefault(emitter, []).append(kid)
        return {
            emitter: EmitterRecord(emitter, tenant, kind, created_at, tuple(kids.get(emitter, ())))
            for emitter, tenant, kind, created_at in self._rows("SELECT * FROM custody_emitters")
        }

    def keys(self) -> dict[str, KeyRecord]:
        rows = self._rows("SELECT kid, emitter, jwk, added_at, revoked_at, revoke_reason FROM custody_keys")
        return {
            kid: KeyRecord(kid, emitter, orjson.loads(jwk), added_at, revoked_at, reason)
            for kid, emitter, jwk, added_at, revoked_at, reason in rows
        }

    def registry_version(self) -> int:
        return int(self._rows("SELECT registry_version FROM custody_log")[0][0])


class _PgView:
    def __init__(self, cursor: psycopg.Cursor[Any], heads: dict[str, Head], event_ids: set[str]) -> None:
        self._cursor, self._heads, self._event_ids = cursor, heads, event_ids
        self._stored: dict[str, IndexEntry] | None = None

    def head(self, emitter: str) -> Head:
        return self._heads.get(emitter, Head())

    def stored(self) -> Mapping[str, IndexEntry]:
        if self._stored is None:
            rows = self._cursor.execute(
                "SELECT event_id::text, emitter, seq, event_hash FROM custody_events WHERE event_id = ANY(%s::uuid[])",
                (sorted(self._event_ids),),
            ).fetchall()
            self._stored = {row[0]: IndexEntry(*row) for row in rows}
        return self._stored

    def hash_at(self, emitter: str, seq: int) -> str | None:
        row = self._cursor.execute(
            "SELECT event_hash FROM custody_events WHERE emitter = %s AND seq = %s", (emitter, seq)
        ).fetchone()
        return None if row is None else str(row[0])


class PgSequencer:
    """Chains and the log's order decided by one PostgreSQL transaction per request (``store.sequencing``)."""

    def __init__(self, pool: ConnectionPool[Any], state: PgState) -> None:
        self._pool = pool
        self._state = state
        self.transactions = 0  # committed, for /metrics and bench/cluster.py
        self.retries = 0
        self.log_lock_seconds = 0.0  # time the custody_log row was held, commit included (the serial section)

    def head(self, emitter: str) -> Head:
        return self._state.head(emitter)

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (REGISTRY_LOCK,))
                try:
                    yield
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (REGISTRY_LOCK,))
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def registry_lock(self) -> AbstractContextManager[object]:
        return self._registry_lock()

    def sequence(
        self, emitters: Sequence[str], event_ids: set[str], decide: Callable[[ChainView], Decision[T]]
    ) -> tuple[int, Decision[T]]:
        for _ in range(_RETRIES):
            try:
                with self._pool.connection() as conn:
                    first, decision = self._transaction(conn, sorted(emitters), event_ids, decide)
                self.transactions += 1
                return first, decision
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                self.retries += 1  # another node stored one of these event ids first: decide again, seeing it
            except psycopg.Error as exc:
                raise _unavailable(exc) from exc
        raise StorageUnavailable(f"PostgreSQL: the request lost {_RETRIES} races in a row; retry it")

    def _transaction(
        self,
        conn: psycopg.Connection[Any],
        emitters: list[str],
        event_ids: set[str],
        decide: Callable[[ChainView], Decision[T]],
    ) -> tuple[int, Decision[T]]:
        """One request: lock its emitters' heads, decide, write the events, then take the next log indexes and
        commit in one round trip (pipelined), so that the log's row is held for as short a time as PostgreSQL
        allows: the commit's WAL flush."""
        conn.execute("BEGIN")
        try:
            with conn.cursor() as cursor:
                decision, batch = self._write(cursor, emitters, event_ids, decide)
                count = len(decision.records)
                if not count:
                    row = cursor.execute("SELECT size FROM custody_log").fetchone()
                    conn.execute("COMMIT")
                    return int(row[0]) if row else 0, decision
                admin = sum(1 for record in decision.records if record.emitter == SERVER_EMITTER)
                with conn.pipeline():
                    # The log's order: this row stays locked until the commit, so the next request numbers after
                    # this one and indexes follow commits without a gap.
                    cursor.execute(
                        "WITH place AS (UPDATE custody_log SET size = size + %(count)s,"
                        " registry_version = registry_version + %(admin)s"
                        " RETURNING size - %(count)s AS first, extract(epoch FROM clock_timestamp()) AS locked_at)"
                        " INSERT INTO custody_batches SELECT first, %(count)s, %(batch)s FROM place"
                        " RETURNING first_index, (SELECT locked_at FROM place)",
                        {"count": count, "admin": min(admin, 1), "batch": batch},
                    )
                    conn.execute("COMMIT")
                row = cursor.fetchone()
                if row is not None:  # from the moment the row was ours (the server's clock) to the commit's answer
                    self.log_lock_seconds += max(0.0, time.time() - float(row[1]))
        except BaseException:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise
        assert row is not None
        return int(row[0]), decision

    def _write(
        self,
        cursor: psycopg.Cursor[Any],
        emitters: list[str],
        event_ids: set[str],
        decide: Callable[[ChainView], Decision[T]],
    ) -> tuple[Decision[T], str]:
        """Everything of the transaction but its place in the log; returns the decision and the batch's id."""
        heads: dict[str, Head] = {}
        if emitters:
            cursor.execute(
                "INSERT INTO custody_heads SELECT e, 0, %s FROM unnest(%s::text[]) AS e ORDER BY e"
                " ON CONFLICT DO NOTHING",
                (ZERO_HASH, emitters),
            )
            rows = cursor.execute(
                "SELECT emitter, seq, event_hash FROM custody_heads WHERE emitter = ANY(%s) ORDER BY emitter"
                " FOR UPDATE",
                (emitters,),
            ).fetchall()
            heads = {emitter: Head(seq, digest) for emitter, seq, digest in rows}
        decision = decide(_PgView(cursor, heads, event_ids))
        records = decision.records
        batch = str(uuid.uuid4())
        if not records:
            return decision, batch
        with cursor.copy("COPY custody_events (event_id, emitter, seq, event_hash) FROM STDIN") as copy:
            for record in records:
                copy.write_row((record.event_id, record.emitter, record.seq, record.event_hash))
        columns = "batch, ordinal, event_id, emitter, seq, event_hash, received_at_us, kid, jws"
        with cursor.copy(f"COPY custody_pending ({columns}) FROM STDIN") as copy:
            for ordinal, record in enumerate(records):
                copy.write_row(
                    (
                        batch,
                        ordinal,
                        record.event_id,
                        record.emitter,
                        record.seq,
                        record.event_hash,
                        record.received_at_us,
                        record.kid,
                        record.jws,
                    )
                )
        cursor.executemany(
            "UPDATE custody_heads SET seq = %s, event_hash = %s WHERE emitter = %s",
            [(head.seq, head.event_hash, emitter) for emitter, head in sorted(decision.heads.items())],
        )
        for payload in (decode_payload(record.jws) for record in records if record.emitter == SERVER_EMITTER):
            _apply_admin(cursor, payload["admin"], payload["occurred_at"])
        return decision, batch


def _apply_admin(cursor: psycopg.Cursor[Any], change: dict[str, Any], occurred_at: str) -> None:
    """``StateDB._apply_admin`` in PostgreSQL: one admin change folded into the registry, idempotently."""
    action = change["action"]
    if action in ("emitter_registered", "server_key"):
        cursor.execute(
            "INSERT INTO custody_emitters VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (change["emitter"], change["tenant"], change["kind"], occurred_at),
        )
    if action in ("key_added", "server_key"):
        cursor.execute(
            "INSERT INTO custody_keys (kid, emitter, jwk, added_at) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (change["kid"], change["emitter"], orjson.dumps(change["jwk"]).decode(), occurred_at),
        )
    elif action == "key_revoked":
        cursor.execute(
            "UPDATE custody_keys SET revoked_at = %s, revoke_reason = %s WHERE kid = %s AND revoked_at IS NULL",
            (occurred_at, change.get("reason"), change["kid"]),
        )


class ClusterStore(Store):
    """One node's store: ``Store``'s lake, log and flush statistics, with PostgreSQL as the sequencer and the
    durable copy; the lake and the log are written by the leader only (see the module's docstring)."""

    def __init__(
        self,
        data_dir: Path,
        dsn: str,
        *,
        flush_interval: float = 1.0,
        publish_interval: float = 0.5,
        pool_size: int = 16,
    ) -> None:
        super().__init__(
            data_dir, flush_interval=flush_interval, writer_process=False, publish_interval=publish_interval
        )
        self.dsn = dsn
        self.pool_size = pool_size
        self.pool: ConnectionPool[Any] | None = None
        self.pg: PgState
        self._sequencer: PgSequencer | None = None
        self.leading = False
        self.registry_listeners: list[Callable[[], None]] = []  # called when another node changed the registry
        # Called in the cluster thread when this node starts and stops leading (detection runs on the leader).
        self.lead_listeners: list[Callable[[bool], None]] = []
        self._leader_conn: psycopg.Connection[Any] | None = None
        self._candidate: psycopg.Connection[Any] | None = None  # a follower's connection for its attempts to lead
        self._registry_version = -1  # the registry version this node's key ring was last loaded at
        self._thread: threading.Thread | None = None
        self._merkle_next = 0
        self._lake_heads: dict[str, dict[str, object]] = {}
        self._leader_guard = threading.RLock()  # the leader connection: the cluster thread's, or a caller's flush

    # -- lifecycle --------------------------------------------------------------------------------------------

    def open(self, progress: Callable[[str], None] = log.info) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.layout.state.mkdir(mode=0o700, exist_ok=True)
        self.layout.log.mkdir(mode=0o700, exist_ok=True)
        self._take_lock()
        wal = self.layout.wal
        if wal.is_dir() and any(wal.glob("*.wal")):
            raise CustodyError(
                f"{wal} holds events of an embedded server not yet in the lake: start `custody serve` once without"
                " --state to flush them, then start the cluster"
            )
        try:
            self.pool = ConnectionPool(
                self.dsn,
                min_size=2,
                max_size=self.pool_size,
                open=True,
                timeout=30.0,
                name="custody",
                kwargs={"autocommit": True},
            )
            self.pool.wait(timeout=30.0)
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(_SCHEMA)
                if conn.execute("SELECT 1 FROM custody_log").fetchone() is None:
                    self.lake.refresh()  # a lake on object storage: what it holds there
                    if self.lake.files():
                        raise CustodyError(
                            f"the lake of {self.data_dir} already holds events and PostgreSQL holds none: moving an"
                            " embedded data dir onto a cluster is not supported; start the cluster on a new data dir"
                        )
                    conn.execute("INSERT INTO custody_log VALUES (1, 0, 0, 0, 0)")
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self.pg = PgState(self.pool)
        self.state = self.pg  # type: ignore[assignment]  # the registry's readers, from PostgreSQL
        self._sequencer = PgSequencer(self.pool, self.pg)
        self.flush_stats.quarantined_events = self.lake.quarantine.count()
        progress(f"cluster node on {self.data_dir}: state in PostgreSQL")

    def sequencer(self) -> Sequencer:
        assert self._sequencer is not None, "open the store first"
        return self._sequencer

    @property
    def transactions(self) -> int:
        return 0 if self._sequencer is None else self._sequencer.transactions

    @property
    def log_lock_seconds(self) -> float:
        return 0.0 if self._sequencer is None else self._sequencer.log_lock_seconds

    @property
    def index_pending(self) -> int:
        return 0

    def _take_lock(self) -> None:
        """A shared lock on the data dir: any number of nodes, but no embedded server beside them."""
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise CustodyError(f"{self.data_dir} is in use by an embedded custody server") from exc
        self._lock_fd = fd

    def start_flusher(self) -> None:
        with self._leader_guard:  # lead at once if no node does (the first node of a cluster, a lone node)
            try:
                self._try_to_lead()
            except (psycopg.Error, CustodyError) as exc:  # the cluster thread tries again every half second
                log.error("cluster: cannot take the lead yet: %s", exc)
                self._resign()
        self._thread = threading.Thread(target=self._run, name="custody-cluster", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.leading:
            try:
                self._flush_leading()
                self.merkle.publish()
                self.merkle.sync()
            except (OSError, CustodyError, psycopg.Error) as exc:
                log.error("final flush failed; the next leader writes the events from PostgreSQL: %s", exc)
        self._resign()
        if self.pool is not None:
            self.pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- leading ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Try to lead; while leading, flush and publish; otherwise follow the leader's checkpoints and the
        registry."""
        next_publish = 0.0
        while not self._stop.wait(self.publish_interval if self.leading else min(self.flush_interval, 0.5)):
            try:
                with self._leader_guard:
                    if not self.leading:
                        self._try_to_lead()
                    if self.leading:
                        if self._flush_leading():
                            for listener in self.flush_listeners:
                                listener()
                        if time.monotonic() >= next_publish:
                            self.merkle.publish()
                            self.merkle.sync_if_due()
                            next_publish = time.monotonic() + self.publish_interval
                    else:
                        self.merkle.follow()
                self.registry_changed(tell=True)
            except (psycopg.Error, StorageUnavailable) as exc:
                self.flush_stats.last_error = str(exc)
                log.error("cluster: %s; trying again", exc)
                self._resign()
            except Exception as exc:  # the node must outlive any one bad round
                self.flush_stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("cluster round failed, will retry")
                self._resign()

    def registry_changed(self, *, tell: bool = False) -> bool:
        """Whether the registry changed since this node last looked (another node registered or revoked a key);
        with ``tell``, the registry listeners reload it."""
        current = self.pg.registry_version()
        with self._leader_guard:
            changed, self._registry_version = current != self._registry_version, current
        if changed and tell:
            for listener in self.registry_listeners:
                listener()
        return changed

    def _try_to_lead(self) -> None:
        # one connection kept for the attempts (a follower tries every half second), which becomes the leader's
        conn = self._candidate or psycopg.connect(self.dsn, autocommit=True)
        self._candidate = None
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        if not row or not row[0]:
            self._candidate = conn
            return
        self._leader_conn = conn
        log.info("this node leads: it writes the lake and the transparency log")
        self.lake.remove_temporary_files()  # a dead leader's unfinished files; no other node writes the lake
        self.lake.refresh()  # a lake on object storage: what the last leader wrote there
        self.merkle.forget_pending()
        self.merkle.reload_checkpoint()
        self.merkle.recover(self._leaves_from, log.info)
        self._merkle_next = self.merkle.size
        self.merkle.feed = self._feed_merkle
        self._lake_heads = self._heads_in_lake(conn)
        self.leading = True
        self._tell_leading(True)

    def _tell_leading(self, leading: bool) -> None:
        for listener in self.lead_listeners:
            try:
                listener(leading)
            except Exception:
                log.exception("a listener of this node's leadership failed")

    def _heads_in_lake(self, conn: psycopg.Connection[Any]) -> dict[str, dict[str, object]]:
        """Each emitter's last seq the lake holds (or may: a pending event's predecessor), with its tenant."""
        rows = conn.execute(
            "SELECT h.emitter, coalesce(min(p.seq) - 1, h.seq), e.tenant FROM custody_heads h"
            " JOIN custody_emitters e ON e.emitter = h.emitter"
            " LEFT JOIN custody_pending p ON p.emitter = h.emitter GROUP BY h.emitter, h.seq, e.tenant"
        ).fetchall()
        return {emitter: {"seq": seq, "tenant": tenant} for emitter, seq, tenant in rows if seq > 0}

    def _record_lake_heads(self, conn: psycopg.Connection[Any], records: list[WalRecord]) -> None:
        """After a segment reached the lake: ``state/lake-heads.json`` (what ``verify`` checks truncation with)."""
        tenants: dict[str, str] = {}
        for record in records:
            known = self._lake_heads.get(record.emitter)
            if known is None:
                if not tenants:
                    tenants = dict(conn.execute("SELECT emitter, tenant FROM custody_emitters").fetchall())
                known = self._lake_heads[record.emitter] = {"seq": 0, "tenant": tenants.get(record.emitter, "")}
            if record.seq > int(str(known["seq"])):
                known["seq"] = record.seq
        path = self.layout.lake_heads
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(orjson.dumps(self._lake_heads, option=orjson.OPT_SORT_KEYS))
        os.replace(temporary, path)

    def _resign(self) -> None:
        if self.leading:
            self._tell_leading(False)
        self.leading = False
        self.merkle.feed = None
        for conn in (self._leader_conn, self._candidate):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()  # releases the advisory lock
        self._leader_conn = self._candidate = None

    def _leaves_from(self, start: int) -> list[tuple[int, str]]:
        """(log index, event hash) at ``start`` or later: the lake's, then what PostgreSQL still holds."""
        found = dict(Store._leaves_from(self, start))
        assert self._leader_conn is not None
        rows = self._leader_conn.execute(
            _NUMBERED.format(columns="p.event_hash"), {"start": start, "end": _LAST}
        ).fetchall()
        for index, digest in rows:
            if found.setdefault(index, digest) != digest:
                raise CorruptState(f"log index {index} is held by two events ({found[index]} and {digest})")
        return sorted(found.items())

    # -- flushing ---------------------------------------------------------------------------------------------

    def flush(self) -> int:
        """Lead if no node does, and write every committed event to the lake; 0 on a node that does not lead."""
        with self._leader_guard:
            if not self.leading:
                self._try_to_lead()
            return self._flush_leading()

    def _flush_leading(self) -> int:
        """As the leader: write every committed event to the lake, a segment at a time; return the events
        written. The segment (its number and range) is committed before its files are written and marked done
        after, all on the connection that holds the leader lock: the lock lives as long as that session, so a node
        whose session PostgreSQL ended (and whose lock another node may now hold) cannot mark anything."""
        conn = self._leader_conn
        if conn is None:
            return 0
        written = 0
        while True:
            row = conn.execute(
                "SELECT segment, first_index, end_index FROM custody_segments WHERE NOT done ORDER BY segment LIMIT 1"
            ).fetchone()
            if row is None:
                log_row = conn.execute("SELECT size, lake_next, segment FROM custody_log").fetchone()
                assert log_row is not None
                size, lake_next, last = log_row
                self._update_lag(size - lake_next)
                if size <= lake_next:
                    break
                segment = max(last, self.lake.highest_segment(), self.lake.quarantine.highest_segment()) + 1
                end = min(size, lake_next + SEGMENT_EVENTS)
                with conn.transaction():
                    conn.execute("INSERT INTO custody_segments VALUES (%s, %s, %s, false)", (segment, lake_next, end))
                    conn.execute("UPDATE custody_log SET segment = %s", (segment,))
                row = (segment, lake_next, end)
            segment, first, end = row
            written += self._write(conn, segment, first, end)
        self.flush_stats.last_error = None
        return written

    def _write(self, conn: psycopg.Connection[Any], segment: int, first: int, end: int) -> int:
        rows = conn.execute(
            _NUMBERED.format(columns="p.event_id, p.emitter, p.seq, p.event_hash, p.received_at_us, p.kid, p.jws"),
            {"start": first, "end": end},
        ).fetchall()
        if [row[0] for row in rows] != list(range(first, end)):
            raise CorruptState(f"segment {segment}: PostgreSQL does not hold every event of log indexes {first}-{end}")
        records = [
            WalRecord(event_id, emitter, seq, digest, received, kid, jws, index)
            for index, event_id, emitter, seq, digest, received, kid, jws in rows
        ]
        self._feed_merkle(end)  # every leaf joins the tree before PostgreSQL forgets it
        result = self.lake.write_segment(segment, records)
        self.lake.compact_tiers(self.lake.touched)
        self._report_quarantined(segment, result)
        with conn.transaction():
            conn.execute("UPDATE custody_segments SET done = true WHERE segment = %s", (segment,))
            conn.execute("UPDATE custody_log SET lake_next = %s WHERE lake_next < %s", (end, end))
            conn.execute(
                "DELETE FROM custody_pending p USING custody_batches b WHERE p.batch = b.batch"
                " AND b.first_index < %(end)s AND b.first_index + p.ordinal < %(end)s",
                {"end": end},
            )
            conn.execute("DELETE FROM custody_batches WHERE first_index + count <= %s", (end,))
        self._record_lake_heads(conn, records)
        return result.written

    def _feed_merkle(self, end: int | None = None) -> None:
        """As the leader: the committed events the tree does not have yet, from PostgreSQL, as leaves (up to
        ``end``, or all)."""
        with self._leader_guard:
            conn = self._leader_conn
            if conn is None:
                return
            rows = conn.execute(
                _NUMBERED.format(columns="p.event_hash"),
                {"start": self._merkle_next, "end": end if end is not None else _LAST},
            ).fetchall()
            indexes = [index for index, _ in rows]
            if indexes != list(range(self._merkle_next, self._merkle_next + len(rows))):
                raise CorruptState(f"PostgreSQL holds no event at log index {self._merkle_next} and after it some")
            if rows:
                self.merkle.add(self._merkle_next, [digest for _, digest in rows])
                self._merkle_next += len(rows)

    def _update_lag(self, unflushed: int) -> None:
        self.flush_stats.unflushed_events = unflushed
        if unflushed == 0:
            self.flush_stats.oldest_unflushed_at = None
        elif self.flush_stats.oldest_unflushed_at is None:
            self.flush_stats.oldest_unflushed_at = time.monotonic()

    # -- lookups ----------------------------------------------------------------------------------------------

    def find_event_ids(self, event_ids: Sequence[str]) -> dict[str, IndexEntry]:
        assert self.pool is not None
        valid = [event_id for event_id in event_ids if _is_uuid(event_id)]
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(
                    "SELECT event_id::text, emitter, seq, event_hash FROM custody_events"
                    " WHERE event_id = ANY(%s::uuid[])",
                    (valid,),
                ).fetchall()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        return {row[0]: IndexEntry(*row) for row in rows}

    def hashes_at(self, emitter: str, seqs: Sequence[int]) -> dict[int, str]:
        assert self.pool is not None
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(
                    "SELECT seq, event_hash FROM custody_events WHERE emitter = %s AND seq = ANY(%s)",
                    (emitter, list(seqs)),
                ).fetchall()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        return {seq: digest for seq, digest in rows}

    def append(self, records: Sequence[WalRecord]) -> int:
        raise CustodyError("a cluster node appends through its sequencer (PostgreSQL), not a local write-ahead log")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
