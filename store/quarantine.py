"""Acknowledged events the lake could not store, kept whole until an operator re-ingests them.

Ingest checks the row every event becomes before it acknowledges it (``store.rows.row_problem``), so nothing
should ever land here. If something does (a lake written by an older version, a bug), one record must not stop
the lake for every tenant, and an acknowledged event must never be dropped to get going again: the lake writer
writes every other record of the segment, and this one goes to ``<data-dir>/quarantine/seg-<n>.jsonl`` with the
reason, before the WAL segment is deleted. ``custody quarantine list|reingest`` inspects and re-ingests them
(docs/operations.md).

A segment's quarantine file is written whole by an atomic rename, like a lake file, so writing one segment twice
(a crash before the WAL segment was deleted) leaves one copy of each record.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from store.ground.errors import CorruptState
from store.ground.jws import decode_payload
from store.wal import WalRecord, fsync_directory

__all__ = ["Quarantine", "QuarantinedEvent"]


@dataclass(frozen=True, slots=True)
class QuarantinedEvent:
    """One acknowledged event the lake refused: the WAL record as it was, the segment it came from, and why."""

    segment: int
    reason: str
    record: WalRecord

    @property
    def tenant(self) -> str | None:
        """The tenant the event's payload names, or None where it names none a string can hold (the JWS was
        verified at ingest, but a quarantined payload is exactly the kind the lake could not take)."""
        try:
            tenant = decode_payload(self.record.jws).get("tenant")
        except (ValueError, IndexError, AttributeError):
            return None
        return tenant if isinstance(tenant, str) else None

    def as_json(self) -> dict[str, object]:
        record = self.record
        return {
            "segment": self.segment,
            "reason": self.reason,
            "tenant": self.tenant,
            "event_id": record.event_id,
            "emitter": record.emitter,
            "seq": record.seq,
            "event_hash": record.event_hash,
            "received_at_us": record.received_at_us,
            "kid": record.kid,
            "jws": record.jws,
        }


class Quarantine:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, segment: int, events: list[tuple[WalRecord, str]]) -> None:
        """Keep ``events`` (record, reason) of ``segment``, durably, replacing what an earlier write of the same
        segment kept."""
        self._write_atomic(self._path(segment), events, segment)

    def _write_atomic(self, final: Path, events: list[tuple[WalRecord, str]], segment: int) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        lines = b"".join(
            orjson.dumps(QuarantinedEvent(segment, reason, record).as_json()) + b"\n" for record, reason in events
        )
        try:
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as sink:
                sink.write(lines)
                sink.flush()
                os.fsync(sink.fileno())
            os.rename(temporary, final)
            fsync_directory(self.directory)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def events(self) -> list[QuarantinedEvent]:
        """Every quarantined event, by segment."""
        return [event for path in self.files() for event in _read(path)]

    def count(self) -> int:
        return sum(len(path.read_bytes().splitlines()) for path in self.files())

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("seg-*.jsonl")) if self.directory.is_dir() else []

    def highest_segment(self) -> int:
        """The highest segment number a quarantined event or a re-ingest in progress holds (0 if none): the WAL's
        numbers start above it, so a re-ingest never writes under a number the WAL also uses."""
        names = self.directory.glob("*.jsonl") if self.directory.is_dir() else []
        return max((int(match.group(1)) for path in names if (match := _NUMBERED.match(path.name))), default=0)

    def begin_reingest(self, segment: int) -> tuple[int, list[WalRecord]]:
        """Gather every quarantined event into one durable re-ingest manifest under ``segment`` (or resume the
        one an interrupted re-ingest left, with its own number) and return its number and records. Writing the
        lake under that one number is idempotent, so a re-ingest interrupted at any point is finished by the next
        without writing an event twice."""
        manifests = sorted(self.directory.glob("reingest-*.jsonl")) if self.directory.is_dir() else []
        if manifests:
            number = int(_NUMBERED.match(manifests[0].name).group(1))  # type: ignore[union-attr]
            return number, [event.record for event in _read(manifests[0])]
        events = self.events()
        if not events:
            return segment, []
        self._write_atomic(self._manifest(segment), [(event.record, event.reason) for event in events], segment)
        self.remove({event.segment for event in events})
        return segment, [event.record for event in events]

    def end_reingest(self, segment: int) -> None:
        self._manifest(segment).unlink(missing_ok=True)
        fsync_directory(self.directory)

    def remove(self, segments: set[int]) -> None:
        for segment in segments:
            self._path(segment).unlink(missing_ok=True)
        if segments:
            fsync_directory(self.directory)

    def _path(self, segment: int) -> Path:
        return self.directory / f"seg-{segment:012d}.jsonl"

    def _manifest(self, segment: int) -> Path:
        return self.directory / f"reingest-{segment:012d}.jsonl"


_NUMBERED = re.compile(r"^(?:seg|reingest)-(\d{12})\.jsonl$")


def _read(path: Path) -> list[QuarantinedEvent]:
    found = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            item = orjson.loads(line)
            record = WalRecord(
                item["event_id"],
                item["emitter"],
                item["seq"],
                item["event_hash"],
                item["received_at_us"],
                item["kid"],
                item["jws"],
            )
            found.append(QuarantinedEvent(item["segment"], item["reason"], record))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptState(f"{path}, line {number}: not a quarantined event: {exc}") from exc
    return found
