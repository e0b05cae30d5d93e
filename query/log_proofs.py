"""Proofs from the transparency log for the read API: an event's inclusion in a signed tree, and the consistency of
two trees. The tiles are read from the data dir (``store.merkle_log.LogReader``); the event is looked up in the lake
within the caller's tenant, so a tenant-bound caller cannot learn another tenant's event exists."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from query.lake import LakeReader
from store.ground.errors import InvalidInput, NotFound
from store.ground.layout import DataDir
from store.ground.tlog import LogError, leaf_hash
from store.merkle_log import LogReader

__all__ = ["Inclusion", "consistency", "inclusion"]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Inclusion:
    """An event's leaf in the log and the RFC 6962 path from it to the root of the tree of ``tree_size``."""

    event_id: str
    log_index: int
    event_hash: str
    tree_size: int
    proof: list[bytes]
    checkpoint: str | None  # the signed checkpoint of that size, when it is the newest

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "log_index": self.log_index,
            "event_hash": self.event_hash,
            "leaf_hash": _b64(leaf_hash(bytes.fromhex(self.event_hash))),
            "tree_size": self.tree_size,
            "proof": [_b64(item) for item in self.proof],
            "checkpoint": self.checkpoint,
        }


def inclusion(reader: LakeReader, event_id: str, tree_size: int | None, *, tenant: str | None) -> Inclusion:
    """The inclusion proof of ``event_id`` in the tree of ``tree_size`` (default: the newest checkpoint's)."""
    condition, params = "event_id = ?", [event_id]
    if tenant is not None:
        condition, params = condition + " AND tenant = ?", [event_id, tenant]
    with reader.connect() as connection:
        row = connection.execute(
            f"SELECT log_index, event_hash FROM events WHERE {condition} LIMIT 1", params
        ).fetchone()
    if row is None:
        raise NotFound(f"no event {event_id} in the lake" + ("" if tenant is None else f" of tenant {tenant}"))
    index, event_hash = row
    if index is None:
        raise InvalidInput(f"event {event_id} was written before the transparency log existed: it has no log index")
    log = LogReader(DataDir(reader.data_dir))
    newest = log.newest()
    newest_size = 0 if newest is None else int(str(newest["size"]))
    size = newest_size if tree_size is None else tree_size
    if index >= size:
        raise InvalidInput(f"event {event_id} is at log index {index}, not in the tree of size {size} (yet)")
    try:
        proof = log.inclusion(int(index), size)
    except LogError as exc:
        raise InvalidInput(str(exc)) from exc
    note = log.checkpoint_note() if size == newest_size else None
    return Inclusion(event_id, int(index), str(event_hash), size, proof, note)


def consistency(reader: LakeReader, old_size: int, size: int) -> dict[str, Any]:
    """The consistency proof between two tree sizes, both at most the newest checkpoint's."""
    if old_size > size:
        raise InvalidInput(f"from ({old_size}) must not be larger than to ({size})")
    try:
        proof = LogReader(DataDir(reader.data_dir)).consistency(old_size, size)
    except LogError as exc:
        raise InvalidInput(str(exc)) from exc
    return {"from": old_size, "tree_size": size, "proof": [_b64(item) for item in proof]}
