"""Incremental verification: a signed record of which Parquet files a clean verification covered.

After a verification that found nothing, ``record`` stores the SHA-256 of every live Parquet file in
``state/verify-checkpoint.jws``, signed with the server's key. ``verify_since_checkpoint`` then re-checks
signatures and columns only for files that are new or whose bytes changed, while hashes and chains are always
recomputed for the whole lake (``verify_chains``: fast, and it is what catches deleted, inserted or reordered
rows anywhere). Nothing an attacker could edit is trusted: an edited file has another digest, an edited or
unsigned checkpoint fails its signature and the run falls back to a full verification, saying so.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from query.lake import LakeReader
from query.verify.integrity import verify_lake
from query.verify.report import IntegrityProblem, IntegrityReport
from store.ground.canonical import canonicalize
from store.ground.jws import JwsError, parse_compact, sign_compact, verify_signature
from store.ground.layout import DataDir

__all__ = ["last_run", "record", "record_run", "verify_since_checkpoint"]


def file_digests(data_dir: Path) -> dict[Path, str]:
    digests = {}
    for path in LakeReader(data_dir).files():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digests[path] = digest.hexdigest()
    return digests


def record(data_dir: Path, digests: dict[Path, str]) -> None:
    events_dir = DataDir(data_dir).events
    body = {
        "v": 1,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {str(path.relative_to(events_dir)): digest for path, digest in sorted(digests.items())},
    }
    key = _server_key(data_dir)
    token = sign_compact(canonicalize(body), key, "custody-server-checkpoint")
    target = DataDir(data_dir).verify_checkpoint
    temporary = target.with_suffix(".tmp")
    temporary.write_text(token, encoding="ascii")
    temporary.replace(target)


def verify_since_checkpoint(
    data_dir: Path, *, progress: Callable[[int], None] | None = None, server_key: Ed25519PublicKey | None = None
) -> tuple[IntegrityReport, str]:
    """Verify incrementally when a valid checkpoint exists, else fully; record a new checkpoint when clean.
    Returns the report and a sentence saying which mode ran and why."""
    digests = file_digests(data_dir)
    known, why = _load(data_dir)
    if known is None:
        report = verify_lake(data_dir, progress=progress, server_key=server_key)
        mode = f"full verification ({why})"
        if why.startswith("checkpoint "):
            report.problems.insert(0, IntegrityProblem("checkpoint", "a checkpoint signed by the server key", why))
    else:
        events_dir = DataDir(data_dir).events
        changed = {path for path, digest in digests.items() if known.get(str(path.relative_to(events_dir))) != digest}
        report = verify_lake(data_dir, progress=progress, only_files=changed, server_key=server_key)
        mode = f"incremental: signatures and columns of {len(changed)} new or changed of {len(digests)} files"
    if report.ok and DataDir(data_dir).server_key_file.exists():
        record(data_dir, digests)
    record_run(data_dir, report, mode)
    return report, mode


def record_run(data_dir: Path, report: IntegrityReport, mode: str) -> None:
    """Keep the outcome of the latest verification for the dashboard (a display: the checkpoint is what is trusted)."""
    body = {
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "ok": report.ok,
        "events": report.events,
        "emitters": report.emitters,
        "problems": [asdict(problem) for problem in report.problems],
    }
    target = DataDir(data_dir).last_verify
    if not target.parent.is_dir():  # an auditor's copy of the lake without state/: nothing to show it in
        return
    temporary = target.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    temporary.replace(target)


def last_run(data_dir: Path) -> dict[str, Any] | None:
    """The latest verification's outcome, or None if none ran (or its record is unreadable)."""
    try:
        body: dict[str, Any] = orjson.loads(DataDir(data_dir).last_verify.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return body


def _load(data_dir: Path) -> tuple[dict[str, str] | None, str]:
    path = DataDir(data_dir).verify_checkpoint
    if not path.exists():
        return None, "no checkpoint yet"
    if not DataDir(data_dir).server_key_file.exists():
        return None, "no server key in the data dir to check its record with"
    try:
        parsed = parse_compact(path.read_text(encoding="ascii").strip())
    except (JwsError, UnicodeDecodeError) as exc:
        return None, f"checkpoint unreadable: {exc}"
    if not verify_signature(parsed, _server_key(data_dir).public_key()):
        return None, "checkpoint signature does not verify with the server key"
    body: dict[str, Any] = orjson.loads(parsed.payload)
    return {str(name): str(digest) for name, digest in body["files"].items()}, "checkpoint valid"


def _server_key(data_dir: Path) -> Ed25519PrivateKey:
    return DataDir(data_dir).server_key()
