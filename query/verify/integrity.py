"""Integrity verification of the lake: is this log what the emitters signed, whole and in order?

For every row it recomputes the event hash from the signed payload, re-verifies the signature with the key the
log itself registered (the server's own stream, whose signatures are checked against the server key), recomputes
every typed column and the partition from the payload (an edited column with an intact ``jws`` must not pass),
and walks each emitter's chain (seq continuity, ``prev_hash`` links, no repeats). Each problem names the emitter,
seq, event_id, file, the check, and what was expected versus found.

Each problem belongs to the tenant its emitter is registered to (never the partition a row was found in).

Limits (docs/forensics.md): deleting the newest events of a stream is caught only against the heads in
``state/state.sqlite``, which whoever can write the data dir can edit too; the transparency log is the planned
fix. ``received_at`` is assigned by the server and not signed.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from query.lake import LakeReader, open_duckdb
from query.verify.report import IntegrityProblem, IntegrityReport, attributed, compare_heads
from store.ground.canonical import ZERO_HASH, canonicalize_parsed, event_hash
from store.ground.errors import CanonicalizationError
from store.ground.jws import JwsError, parse_compact, verify_signature
from store.ground.keys import KeyRing
from store.ground.layout import SERVER_EMITTER, SYSTEM_TENANT, DataDir
from store.lake_files import HIVE_OPTIONS, partition_of_file
from store.schema import EVENT_SCHEMA, Signed, event_table, partition_of

__all__ = ["IntegrityProblem", "IntegrityReport", "compare_heads", "verify_event", "verify_lake"]

log = logging.getLogger(__name__)

# Assigned by the server, not signed: received_at, and log_index (checked against the Merkle log by query.verify.log)
_COLUMNS = [name for name in EVENT_SCHEMA.names if name not in ("jws", "received_at", "log_index")]
# What _check_row and the problem reports read of each row, as Python values; every other column is compared whole
_ROW_FIELDS = ["event_id", "emitter", "seq", "event_hash", "jws", "received_at", "tenant", "date", "filename"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def verify_lake(
    data_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
    only_files: set[Path] | None = None,
    server_key: Ed25519PublicKey | None = None,
    workers: int = 1,
) -> IntegrityReport:
    """Verify every event in ``<data_dir>/lake``; ``progress`` is called with the number of rows done so far.
    ``server_key``: the public key that signs the server's stream (by default the data dir's own).

    With ``only_files``, signatures and columns are checked for those files (and the server stream, which holds
    the keys) only, and hashes and chains for the whole lake by ``verify_chains``: the incremental mode. With
    ``workers`` > 1, signatures and columns are checked that way for every file, in that many processes."""
    if workers > 1 and only_files is None:
        only_files = set(LakeReader(data_dir).files())
    if only_files is not None:
        from query.verify.chains import verify_chains

        chains = verify_chains(data_dir)
        if workers > 1:
            report = _verify_in_processes(data_dir, progress, only_files, server_key, workers)
        else:
            report = _verify_rows(data_dir, progress, only_files, check_chains=False, server_key=server_key)
        report.problems = sorted(
            {(p.emitter, p.seq, p.check): p for p in [*chains.problems, *report.problems]}.values(),
            key=lambda problem: (problem.emitter or "", problem.seq or 0, problem.check),
        )
        report.events, report.emitters = chains.events, chains.emitters
        report.tenants = {**chains.tenants, **report.tenants}
        report.problems = attributed(report.problems, report.tenants)
        return report
    return _verify_rows(data_dir, progress, None, check_chains=True, server_key=server_key)


def _verify_in_processes(
    data_dir: Path,
    progress: Callable[[int], None] | None,
    files: set[Path],
    server_key: Ed25519PublicKey | None,
    workers: int,
) -> IntegrityReport:
    """Signatures and columns of ``files``, in parts of about equal bytes, in ``workers`` processes (each also reads
    the server's stream, for the keys). The parts' problems merged, each once."""
    ordered = sorted(files, key=lambda path: path.stat().st_size, reverse=True)
    parts: list[list[Path]] = [[] for _ in range(min(len(ordered), workers * 4) or 1)]
    sizes = [0] * len(parts)
    for path in ordered:  # largest first, each to the lightest part
        lightest = sizes.index(min(sizes))
        parts[lightest].append(path)
        sizes[lightest] += path.stat().st_size
    raw_key = None if server_key is None else server_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    report = IntegrityReport()
    done = 0
    context = multiprocessing.get_context("spawn")  # the parent may hold threads and DuckDB: never fork it
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_verify_part, data_dir, part, raw_key) for part in parts if part]
        for future in as_completed(futures):
            part = future.result()
            report.problems.extend(part.problems)
            report.tenants.update(part.tenants)
            done += part.events
            if progress is not None:
                progress(done)
    return report


def _verify_part(data_dir: Path, files: list[Path], raw_key: bytes | None) -> IntegrityReport:
    server_key = None if raw_key is None else Ed25519PublicKey.from_public_bytes(raw_key)
    return _verify_rows(data_dir, None, set(files), check_chains=False, server_key=server_key)


def _verify_rows(
    data_dir: Path,
    progress: Callable[[int], None] | None,
    only_files: set[Path] | None,
    *,
    check_chains: bool,
    server_key: Ed25519PublicKey | None,
) -> IntegrityReport:
    report = IntegrityReport()
    server_key = server_key or _server_public_key(data_dir)
    keys = KeyRing()
    registry: dict[str, tuple[str, dict[str, Any], str, str | None]] = {}  # kid -> emitter, jwk, added, revoked
    tenants: dict[str, str] = {}
    previous: tuple[str, int, str] | None = None  # emitter, seq, computed hash of the last row
    for batch in _batches(data_dir, only_files):
        names = batch.schema.names  # ``filename`` is there twice (read_parquet's and the SELECT's): take the first
        rows = batch.select([names.index(name) for name in _ROW_FIELDS]).to_pylist()  # the rest: by column
        recomputed: list[tuple[int, Signed]] = []
        for index, row in enumerate(rows):
            emitter, seq = row["emitter"], row["seq"]
            report.tenants.setdefault(emitter, row["tenant"])
            if previous is None or previous[0] != emitter:
                if previous is not None:
                    report.emitters[previous[0]] = previous[1]
                previous = (emitter, 0, ZERO_HASH)
            problems, signed = _check_row(row, keys, server_key, previous if check_chains else None)
            report.problems.extend(problems)
            if signed is not None:
                recomputed.append((index, signed))
                if emitter == SERVER_EMITTER and not problems:
                    _fold_admin(signed.payload, registry, tenants)
                    specs = [
                        (kid, owner, tenants.get(owner, ""), jwk, revoked)
                        for kid, (owner, jwk, _, revoked) in registry.items()
                    ]
                    keys.load_specs(specs, keys.version + 1)
            previous = (emitter, seq, row["event_hash"] if signed is None else signed.event_hash)
        report.problems.extend(_check_columns(rows, recomputed, batch))
        report.events += len(rows)
        if progress is not None:
            progress(report.events)
    if previous is not None:
        report.emitters[previous[0]] = previous[1]
    report.tenants.update(tenants)  # as registered, where the server's stream says
    if check_chains:
        report.problems.extend(compare_heads(data_dir, report.emitters, report.tenants))
    report.problems = attributed(report.problems, report.tenants)
    report.problems.sort(key=lambda problem: (problem.emitter or "", problem.seq or 0, problem.check))
    return report


def verify_event(
    data_dir: Path, event_id: str, *, tenant: str | None = None, day: date | None = None
) -> list[IntegrityProblem] | None:
    """Every check of ``verify_lake`` for one event: hash, key, signature, columns, and its link to the event
    before it in its emitter's chain. An empty list means it passed; None means there is no such event.

    ``day`` (the event's partition date, when the caller knows it) makes this a read of that day's files: the
    event and its predecessor are looked for there first, and in the whole lake only if they are not found."""
    server_key = _server_public_key(data_dir)
    keys = KeyRing()
    registry: dict[str, tuple[str, dict[str, Any], str, str | None]] = {}
    tenants: dict[str, str] = {}
    for batch in _batches(data_dir, only_files=set()):  # the server stream: it registers the keys
        for row in batch.to_pylist():
            problems, signed = _check_row(row, keys, server_key, None)
            if signed is not None and not problems:
                _fold_admin(signed.payload, registry, tenants)
    specs = [(kid, owner, tenants.get(owner, ""), jwk, revoked) for kid, (owner, jwk, _, revoked) in registry.items()]
    keys.load_specs(specs, keys.version + 1)
    everywhere = [str(path) for path in LakeReader(data_dir).files()]
    if not everywhere:
        return None
    that_day = [path for path in everywhere if day is not None and partition_of_file(path)[1] == day]
    connection = open_duckdb(memory_limit=None)  # as before: the verifier's sort may use the machine's memory
    try:
        source = f"read_parquet($files, {HIVE_OPTIONS}, filename = true)"

        def first_found(sql: str, params: dict[str, Any]) -> Any:
            for files in (that_day, everywhere) if that_day else (everywhere,):
                result = connection.execute(sql, {**params, "files": files})
                found = result.fetchall()
                if found:
                    return result.description, found
            return None, []

        description, found = first_found(
            f"SELECT *, filename FROM {source} WHERE event_id = $id AND ($tenant IS NULL OR tenant = $tenant)",
            {"id": event_id, "tenant": tenant},
        )
        if not found:
            return None
        rows = [dict(zip([c[0] for c in description], values, strict=True)) for values in found]
        row = rows[0]
        _, before = first_found(
            f"SELECT event_hash FROM {source} WHERE emitter = $emitter AND seq = $seq",
            {"emitter": row["emitter"], "seq": row["seq"] - 1},
        )
    finally:
        connection.close()
    previous_hash = ZERO_HASH if row["seq"] == 1 else (before[0][0] if before else "(no event)")
    problems, signed = _check_row(row, keys, server_key, (row["emitter"], row["seq"] - 1, previous_hash))
    if signed is not None:
        problems += _check_columns([row], [(0, signed)])
    if len(rows) > 1:
        problems.append(IntegrityProblem("unique", "one row", f"{len(rows)} rows with this event_id", **_where(row)))
    return problems


def _batches(data_dir: Path, only_files: set[Path] | None = None) -> Iterator[pa.RecordBatch]:
    files = [
        str(path)
        for path in LakeReader(data_dir).files()
        if only_files is None or path in only_files or f"tenant={SYSTEM_TENANT}" in str(path)
    ]
    if not files:
        return
    connection = open_duckdb(memory_limit=None)  # as before: the verifier's sort may use the machine's memory
    reader = connection.sql(
        f"SELECT *, filename FROM read_parquet($files, {HIVE_OPTIONS}, filename = true)"
        " ORDER BY emitter = $server DESC, emitter, seq",  # the server stream first: it registers the keys
        params={"files": files, "server": SERVER_EMITTER},
    ).to_arrow_reader(50_000)
    yield from reader


def _check_row(
    row: dict[str, Any], keys: KeyRing, server_key: Any, previous: tuple[str, int, str] | None
) -> tuple[list[IntegrityProblem], Signed | None]:
    """Hash, key, signature and chain of one row; the Signed event recomputed from its JWS, if it parses."""
    emitter = row["emitter"]
    where = _where(row)
    problems: list[IntegrityProblem] = []
    try:
        parsed = parse_compact(row["jws"])
        payload = orjson.loads(parsed.payload)
        computed = event_hash(canonicalize_parsed(payload))
    except (JwsError, orjson.JSONDecodeError, CanonicalizationError, TypeError) as exc:
        return [IntegrityProblem("jws", "a parseable signed event", str(exc), **where)], None
    if computed != row["event_hash"]:
        problems.append(IntegrityProblem("event_hash", computed, str(row["event_hash"]), **where))
    if emitter == SERVER_EMITTER:
        key, alg_ok = server_key, True
    else:
        entry = keys.get(parsed.kid)
        if entry is None or entry.emitter != payload.get("emitter"):
            owner = "unregistered" if entry is None else f"a key of {entry.emitter}"
            problems.append(
                IntegrityProblem(
                    "key", f"a registered key of {payload.get('emitter')}", f"kid {parsed.kid!r} ({owner})", **where
                )
            )
            key, alg_ok = None, False
        else:
            key, alg_ok = entry.key, parsed.alg == entry.alg
            received = row["received_at"]
            if entry.revoked_at is not None and received is not None and received >= _utc(entry.revoked_at):
                problems.append(
                    IntegrityProblem(
                        "key_validity",
                        f"received before {parsed.kid} was revoked at {entry.revoked_at}",
                        f"received at {received}",
                        **where,
                    )
                )
    if key is not None and not (alg_ok and verify_signature(parsed, key)):
        problems.append(
            IntegrityProblem("signature", f"a valid {parsed.alg} signature by {parsed.kid}", "invalid", **where)
        )
    if previous is None:
        pass
    elif payload.get("seq") != previous[1] + 1:
        problems.append(IntegrityProblem("chain_seq", f"seq {previous[1] + 1}", f"seq {payload.get('seq')}", **where))
    elif payload.get("prev_hash") != previous[2]:
        problems.append(
            IntegrityProblem("chain_link", f"prev_hash {previous[2]}", f"prev_hash {payload.get('prev_hash')}", **where)
        )
    received_us = 0 if row["received_at"] is None else (row["received_at"] - _EPOCH) // _MICROSECOND
    return problems, Signed(payload, row["jws"], parsed.kid, computed, received_us)


def _where(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "emitter": row["emitter"],
        "seq": row["seq"],
        "event_id": row["event_id"],
        "file": _short(row["filename"]),
        "tenant": row["tenant"],
    }


def _check_columns(
    rows: list[dict[str, Any]], recomputed: list[tuple[int, Signed]], batch: pa.RecordBatch | None = None
) -> list[IntegrityProblem]:
    """Every typed column and the partition of each row against the same columns rebuilt from its payload. With
    the ``batch`` the rows came from, a column is compared whole (Arrow) and row by row only where it differs."""
    problems: list[IntegrityProblem] = []
    usable: list[tuple[int, Signed]] = []
    for index, signed in recomputed:
        try:
            tenant, day = partition_of(signed.payload)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(
                IntegrityProblem(
                    "payload", "a payload of the protocol", f"{type(exc).__name__}: {exc}", **_where(rows[index])
                )
            )
            continue
        row = rows[index]
        if row["tenant"] != tenant or _as_date(row["date"]) != day:
            problems.append(
                IntegrityProblem(
                    "partition",
                    f"tenant={tenant}/date={day}",
                    f"tenant={row['tenant']}/date={row['date']}",
                    **_where(row),
                )
            )
        usable.append((index, signed))
    try:
        expected = event_table(signed for _, signed in usable)
    except (KeyError, TypeError, ValueError, pa.ArrowException):
        return problems + _check_columns_one_by_one(rows, usable)
    positions = pa.array([index for index, _ in usable], pa.int64())
    for name in _COLUMNS:
        wanted = expected.column(name)
        if batch is not None:
            found = batch.column(name).take(positions)
            if _whole_column_equal(wanted, found):
                continue
            actual = found.to_pylist()
        else:
            actual = [rows[index][name] for index, _ in usable]
        for (index, _), value, stored in zip(usable, wanted.to_pylist(), actual, strict=True):
            if not _same(value, stored):
                problems.append(IntegrityProblem(f"column {name}", repr(value), repr(stored), **_where(rows[index])))
    return problems


def _whole_column_equal(expected: pa.ChunkedArray, found: pa.Array) -> bool:
    """True when the lake's column equals the rebuilt one, value for value and null for null (False when the
    types cannot be made alike: then the rows are compared one by one)."""
    try:
        return bool(expected.combine_chunks().equals(found.cast(expected.type)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False


def _check_columns_one_by_one(rows: list[dict[str, Any]], usable: list[tuple[int, Signed]]) -> list[IntegrityProblem]:
    """A batch with a payload Arrow cannot type: find it, and check the others."""
    problems = []
    for index, signed in usable:
        try:
            expected = event_table([signed]).to_pylist()[0]
        except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
            problems.append(
                IntegrityProblem(
                    "payload", "a payload of the protocol", f"{type(exc).__name__}: {exc}", **_where(rows[index])
                )
            )
            continue
        problems += [
            IntegrityProblem(f"column {name}", repr(expected[name]), repr(rows[index][name]), **_where(rows[index]))
            for name in _COLUMNS
            if not _same(expected[name], rows[index][name])
        ]
    return problems


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC)


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, datetime) and isinstance(actual, datetime):
        return expected.astimezone(UTC) == actual.astimezone(UTC)
    return bool(expected == actual)


def _as_date(value: Any) -> date | None:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def _fold_admin(payload: dict[str, Any], registry: dict[str, Any], tenants: dict[str, str]) -> None:
    change, at = payload.get("admin") or {}, payload["occurred_at"]
    action = change.get("action")
    if action in ("emitter_registered", "server_key"):
        tenants.setdefault(change["emitter"], change["tenant"])
    if action in ("key_added", "server_key"):
        registry.setdefault(change["kid"], (change["emitter"], change["jwk"], at, None))
    elif action == "key_revoked" and change.get("kid") in registry:
        owner, jwk, added, revoked = registry[change["kid"]]
        registry[change["kid"]] = (owner, jwk, added, revoked or at)


def _server_public_key(data_dir: Path) -> Ed25519PublicKey:
    return DataDir(data_dir).server_key().public_key()


def _short(filename: str) -> str:
    marker = "/lake/events/"
    return filename.split(marker, 1)[1] if marker in filename else filename
