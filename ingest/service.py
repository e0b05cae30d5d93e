"""The ingest service: a batch of JWS events in, one result per event out, accepted events durable first.

``IngestService.ingest`` runs the stateless checks (``checks.check_event``; the server runs them in its verifier
processes, ``ingest.verifiers``, and calls ``commit``), then hands the sequencer (``store.sequencing``) a decision:
each event checked against its emitter's chain, the accepted ones made durable (the write-ahead log's fsync, or a
PostgreSQL commit on a cluster) and numbered in the log, and only then the heads advanced. If that fails, the
request fails with StorageUnavailable and nothing in it is acknowledged or remembered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ingest.checks import Rejected, Verified, check_event
from ingest.codes import ErrorCode, Status
from store.engine import Store
from store.ground.jws import sign_compact
from store.ground.keys import KeyRing
from store.sequencing import ChainView, Decision, Sequencer
from store.state import Head, IndexEntry
from store.wal import WalRecord

__all__ = ["BatchOutcome", "EventResult", "IngestService", "Limits", "Receipts"]


@dataclass(frozen=True)
class Limits:
    max_events: int = 1000
    max_body_bytes: int = 8 * 1024 * 1024
    max_event_bytes: int = 64 * 1024
    max_clock_skew: timedelta = timedelta(minutes=5)
    # Refuse events whose occurred_at is older than this (None: any age, so backfills and replays load).
    max_event_age: timedelta | None = None


@dataclass(frozen=True, slots=True)
class EventResult:
    event_id: str | None
    status: Status
    error: ErrorCode | None = None
    detail: str | None = None
    log_index: int | None = None  # an accepted event's leaf in the transparency log

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "status": self.status.value,
            "error": None if self.error is None else self.error.value,
            "detail": self.detail,
            "log_index": self.log_index,
        }


@dataclass
class BatchOutcome:
    results: list[EventResult]
    heads: dict[str, Head] = field(default_factory=dict)
    receipt: str | None = None  # JWS by the server over what this request made durable (docs/transparency.md)

    @property
    def errors(self) -> bool:
        return any(result.status is Status.REJECTED for result in self.results)

    def as_json(self) -> dict[str, Any]:
        return {
            "errors": self.errors,
            "results": [result.as_json() for result in self.results],
            "heads": {emitter: head.as_json() for emitter, head in sorted(self.heads.items())},
            "receipt": self.receipt,
        }


class IngestService:
    def __init__(self, store: Store, keys: KeyRing, limits: Limits) -> None:
        self.store = store
        self.keys = keys
        self.limits = limits
        self.sequencer: Sequencer = store.sequencer()
        self.receipts: Receipts | None = None  # set once the server key is loaded

    def head(self, emitter: str) -> Head:
        return self.sequencer.head(emitter)

    def ingest(self, tokens: Sequence[object], *, now: datetime | None = None) -> BatchOutcome:
        """Check ``tokens`` in this thread, then commit them."""
        return self.commit(self.check(tokens, now=now or datetime.now(UTC)))

    def check(self, tokens: Sequence[object], *, now: datetime) -> list[Verified | Rejected]:
        """The stateless checks, in this thread (``VerifierPool.check`` runs the same checks in other processes)."""
        size, skew, age = self.limits.max_event_bytes, self.limits.max_clock_skew, self.limits.max_event_age
        return [
            check_event(token, self.keys, now=now, max_event_bytes=size, max_skew=skew, max_age=age) for token in tokens
        ]

    def commit(self, checked: list[Verified | Rejected]) -> BatchOutcome:
        """Decide each checked event against its emitter's chain and make the accepted ones durable."""
        emitters = sorted({item.emitter for item in checked if item.emitter is not None})
        event_ids = {item.event_id for item in checked if isinstance(item, Verified)}
        received_at_us = time.time_ns() // 1000

        def decide(view: ChainView) -> Decision[tuple[list[EventResult], list[Verified], dict[str, Head]]]:
            results, accepted, heads = _chain(checked, view)
            records = [
                WalRecord(item.event_id, item.emitter, item.seq, item.event_hash, received_at_us, item.kid, item.jws)
                for item in accepted
            ]
            after = {emitter: heads.get(emitter) or view.head(emitter) for emitter in emitters}
            return Decision(records, heads, (results, accepted, after))

        first, decision = self.sequencer.sequence(emitters, event_ids, decide)
        results, accepted, after = decision.outcome
        numbered = _numbered(results, first)
        receipt = None
        if accepted and self.receipts is not None:
            receipt = self.receipts.sign(accepted, first, received_at_us)
        return BatchOutcome(numbered, after, receipt)


def _chain(
    checked: list[Verified | Rejected], view: ChainView
) -> tuple[list[EventResult], list[Verified], dict[str, Head]]:
    """Decide each verified event against its emitter's head; no state changes here."""
    stored = view.stored()
    heads: dict[str, Head] = {}
    in_batch: dict[str, Verified] = {}
    poisoned: set[str] = set()
    accepted: list[Verified] = []
    results: list[EventResult] = []
    for item in checked:
        if isinstance(item, Rejected):
            if item.emitter is not None:
                poisoned.add(item.emitter)
            results.append(EventResult(item.event_id, Status.REJECTED, item.code, item.detail))
            continue
        if item.emitter in poisoned:
            results.append(
                EventResult(
                    item.event_id,
                    Status.REJECTED,
                    ErrorCode.AFTER_REJECTED,
                    f"an earlier event of {item.emitter} in this request was rejected; resend from seq {item.seq}",
                )
            )
            continue
        head = heads.get(item.emitter) or view.head(item.emitter)
        result = _decide(item, head, view, stored, in_batch)
        results.append(result)
        if result.status is Status.REJECTED:
            poisoned.add(item.emitter)
        elif result.status is Status.ACCEPTED:
            accepted.append(item)
            in_batch[item.event_id] = item
            heads[item.emitter] = Head(item.seq, item.event_hash)
    return results, accepted, heads


def _decide(
    item: Verified, head: Head, view: ChainView, stored: Mapping[str, IndexEntry], in_batch: dict[str, Verified]
) -> EventResult:
    known: Verified | IndexEntry | None = in_batch.get(item.event_id) or stored.get(item.event_id)
    if known is not None:
        if known.event_hash == item.event_hash:
            return EventResult(item.event_id, Status.DUPLICATE)
        return _reject(
            item,
            ErrorCode.EVENT_ID_CONFLICT,
            f"event_id {item.event_id} is already stored as {known.emitter} seq {known.seq} with hash"
            f" {known.event_hash}; this event hashes to {item.event_hash}",
        )
    if item.seq <= head.seq:
        stored_hash = view.hash_at(item.emitter, item.seq) or "?"
        return _reject(
            item,
            ErrorCode.CHAIN_CONFLICT,
            f"seq {item.seq} of {item.emitter} is already stored with hash {stored_hash};"
            f" this event hashes to {item.event_hash} (head is seq {head.seq})",
        )
    if item.seq > head.seq + 1:
        return _reject(
            item,
            ErrorCode.CHAIN_GAP,
            f"seq {item.seq} of {item.emitter} leaves a gap: head is seq {head.seq}, expected seq {head.seq + 1}",
        )
    if item.prev_hash != head.event_hash:
        return _reject(
            item,
            ErrorCode.CHAIN_CONFLICT,
            f"prev_hash of {item.emitter} seq {item.seq} does not link to the head: expected {head.event_hash},"
            f" got {item.prev_hash}",
        )
    return EventResult(item.event_id, Status.ACCEPTED)


def _numbered(results: list[EventResult], first: int) -> list[EventResult]:
    """The accepted results with their log indexes, in the order they were appended."""
    numbered = []
    for result in results:
        if result.status is Status.ACCEPTED:
            result = EventResult(result.event_id, Status.ACCEPTED, log_index=first)
            first += 1
        numbered.append(result)
    return numbered


class Receipts:
    """Signs, per request, what it made durable: a compact JWS (EdDSA, the server's key) whose payload is
    ``{"log": origin, "received_at": RFC 3339, "events": [{"event_id", "event_hash", "log_index"}, ...]}``."""

    def __init__(self, private: Ed25519PrivateKey, kid: str, origin: str) -> None:
        self._private, self._kid, self._origin = private, kid, origin

    def sign(self, accepted: list[Verified], first: int, received_at_us: int) -> str:
        received = datetime.fromtimestamp(received_at_us / 1e6, UTC).isoformat(timespec="microseconds")
        payload = {
            "log": self._origin,
            "received_at": received.replace("+00:00", "Z"),
            "events": [
                {"event_id": item.event_id, "event_hash": item.event_hash, "log_index": first + number}
                for number, item in enumerate(accepted)
            ],
        }
        return sign_compact(orjson.dumps(payload), self._private, self._kid)


def _reject(item: Verified, code: ErrorCode, detail: str) -> EventResult:
    return EventResult(item.event_id, Status.REJECTED, code, detail)
