"""Evidence bundles: one file that proves a set of events to someone who trusts only the log's key.

A bundle holds each selected event's JWS with its inclusion proof, the server's admin events that registered
(and revoked) the keys that signed them, with theirs, and the newest checkpoint, all to one tree size; the whole
is a signed note by the log's key whose text is the bundle's JSON. ``store.ground.tlog.verify_bundle`` checks it
with nothing but that module, the bundle and the key (``custody bundle verify``; docs/transparency.md).

The selection is an event's delegation path, a finding's evidence, a forward-taint result or plain event ids,
always within the caller's tenant.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from query.blast import forward_taint
from query.findings import KINDS, findings
from query.lake import LakeReader
from query.paths import delegation_path
from store.ground.errors import InvalidInput, NotFound
from store.ground.layout import SERVER_EMITTER, DataDir
from store.ground.tlog import BUNDLE_FORMAT, sign_note
from store.merkle_log import LogReader, log_origin

__all__ = ["finding_ids", "path_ids", "taint_ids", "write_bundle"]

MAX_EVENTS = 10_000  # a bundle is read by a person's tools: a selection past this is refused, not cut


def path_ids(reader: LakeReader, event_id: str, *, tenant: str | None) -> list[str]:
    """The events of an event's delegation path: itself, its approval, its ancestors and descendants."""
    path = delegation_path(reader, event_id, tenant=tenant)
    rows = [path.event, *([path.approval] if path.approval else []), *path.ancestors, *path.descendants]
    return list(dict.fromkeys(str(row["event_id"]) for row in rows))


def finding_ids(reader: LakeReader, kind: str, subject: str, *, tenant: str | None) -> list[str]:
    """The evidence of the finding of ``kind`` about ``subject`` (as ``custody findings`` lists it)."""
    if kind not in KINDS:
        raise InvalidInput(f"no finding kind {kind!r}; the kinds are {', '.join(KINDS)}")
    for finding in findings(reader, tenant=tenant, kinds=(kind,)):
        if finding.subject == subject:
            if finding.evidence_truncated:
                raise InvalidInput(
                    f"finding {kind} of {subject} has {finding.evidence_total} evidence events, more than are listed;"
                    " bundle them by --event in parts"
                )
            return list(finding.evidence)
    raise NotFound(f"no {kind} finding about {subject}" + ("" if tenant is None else f" in tenant {tenant}"))


def taint_ids(reader: LakeReader, agent: str, since: datetime, *, tenant: str | None) -> list[str]:
    """The events a forward taint from ``agent`` since ``since`` reaches."""
    return [str(row["event_id"]) for row in forward_taint(reader, "agent", agent, since, tenant=tenant).events]


def write_bundle(data_dir: Path, event_ids: Sequence[str], selection: dict[str, Any], *, tenant: str | None) -> bytes:
    """The bundle of ``event_ids`` (within ``tenant``), proved to the newest checkpoint, signed by the log key."""
    wanted = list(dict.fromkeys(event_ids))
    if not wanted:
        raise InvalidInput("the selection holds no events")
    if len(wanted) > MAX_EVENTS:
        raise InvalidInput(f"the selection holds {len(wanted)} events; a bundle holds at most {MAX_EVENTS}")
    reader = LakeReader(data_dir)
    events = _rows(reader, wanted, tenant)
    registry = _registry(reader, {str(row["kid"]) for row in events})
    log = LogReader(DataDir(data_dir))
    note = log.checkpoint_note()
    newest = log.newest()
    if note is None or newest is None:
        raise InvalidInput("the log has signed no checkpoint yet")
    size = int(str(newest["size"]))
    late = [row["event_id"] for row in [*events, *registry] if row["log_index"] >= size]
    if late:
        raise InvalidInput(
            f"{len(late)} events (first {late[0]}) are not in the newest checkpoint yet; try again in a second"
        )
    body = {
        "bundle": BUNDLE_FORMAT,
        "selection": selection,
        "checkpoint": note,
        "events": [_entry(log, row, size) for row in events],
        "registry": [_entry(log, row, size) for row in registry],
    }
    text = orjson.dumps(body).decode() + "\n"
    private = DataDir(data_dir).server_key()
    return (text + "\n" + sign_note(text, log_origin(private), private)).encode()


def _rows(reader: LakeReader, wanted: list[str], tenant: str | None) -> list[dict[str, Any]]:
    condition, params = "list_contains(?, event_id)", list[Any]([wanted])
    if tenant is not None:
        condition, params = condition + " AND tenant = ?", [wanted, tenant]
    with reader.connect() as connection:
        result = connection.execute(
            f"SELECT event_id, log_index, jws, kid FROM events WHERE {condition} ORDER BY log_index", params
        )
        columns = [column[0] for column in result.description]
        rows = [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
    found = {row["event_id"] for row in rows}
    missing = [event_id for event_id in wanted if event_id not in found]
    if missing:
        raise NotFound(f"{len(missing)} events not in the lake (first {missing[0]})")
    unlogged = [row["event_id"] for row in rows if row["log_index"] is None]
    if unlogged:
        raise InvalidInput(f"{len(unlogged)} events were written before the transparency log (first {unlogged[0]})")
    return rows


def _registry(reader: LakeReader, kids: set[str]) -> list[dict[str, Any]]:
    """The server's events that added or revoked the keys ``kids``."""
    with reader.connect() as connection:
        result = connection.execute(
            "SELECT event_id, log_index, jws, kid, admin FROM all_events WHERE emitter = ? AND admin IS NOT NULL"
            " ORDER BY log_index",
            [SERVER_EMITTER],
        )
        rows = result.fetchall()
    chosen = []
    for event_id, index, jws, kid, admin in rows:
        change = orjson.loads(admin)
        if change.get("action") in ("key_added", "key_revoked") and change.get("kid") in kids and index is not None:
            chosen.append({"event_id": event_id, "log_index": index, "jws": jws, "kid": kid})
    return chosen


def _entry(log: LogReader, row: dict[str, Any], size: int) -> dict[str, Any]:
    proof = log.inclusion(int(row["log_index"]), size)
    return {
        "log_index": int(row["log_index"]),
        "jws": row["jws"],
        "proof": [base64.b64encode(h).decode() for h in proof],
    }
