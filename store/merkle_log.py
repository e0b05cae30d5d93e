"""The transparency log: one RFC 6962 Merkle tree over every acknowledged event, stored as C2SP tlog-tiles.

The leaf data of an event is its ``event_hash`` as 32 raw bytes (the SHA-256 of its canonical payload, which the
emitter signed), leaf ``log_index`` is the order in which the WAL made it durable (``store.wal``). On disk, beside
the lake (``store.ground.layout.DataDir``)::

    log/tile/<L>/<N>[.p/<W>]          hash tiles, exactly as c2sp.org/tlog-tiles lays them out
    log/tile/entries/<N>[.p/<W>]      entry bundles: each entry a big-endian u16 length (32) and the event hash
    log/checkpoint                    the newest signed checkpoint (c2sp.org/tlog-checkpoint)
    log/checkpoints.jsonl             every checkpoint ever signed, oldest first (append-only)

The WAL, the lake and the quarantine hold every leaf (each record carries its log index), so tiles are derived
data: ``recover`` loads the tree's right edge from the tiles of the newest checkpoint, checks it against that
checkpoint's root, and appends the leaves the lake and the WAL hold beyond it; tiles that are missing or do not
match are rebuilt from the lake. A leaf index missing from the lake is refused, never skipped: the log must not
sign a tree that leaves out an acknowledged event, nor one inconsistent with a checkpoint it signed before.

Leaves reach the tree in the publisher thread (``publish``, every ``interval``), not in the request: ``add`` only
records an acknowledged batch's first index and hashes.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from store.ground.errors import CorruptState
from store.ground.layout import DataDir
from store.ground.tlog import (
    Checkpoint,
    LogError,
    NoteKey,
    checkpoint_text,
    consistency_proof,
    inclusion_proof,
    open_checkpoint,
    root_of,
    sign_note,
)

__all__ = [
    "LogReader",
    "MerkleLog",
    "TileStore",
    "log_key",
    "log_origin",
    "newest_history_record",
    "read_history",
    "tile_path",
]

log = logging.getLogger(__name__)

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
_ENTRY_PREFIX = struct.pack(">H", 32)


def log_key(private: Ed25519PrivateKey) -> NoteKey:
    """The log's signed-note key: its origin (``log_origin``) as the name, the server's Ed25519 public key."""
    return NoteKey.of(log_origin(private), private)


def log_origin(private: Ed25519PrivateKey) -> str:
    """The log's origin line and key name: ``custody/`` and the first 16 hex digits of its public key; fixed by
    the key, so a new key is a new log (docs/transparency.md)."""
    return f"custody/{NoteKey.of('custody', private).public.hex()[:16]}"


def tile_path(level: int | str, index: int, width: int = TILE_WIDTH) -> str:
    """``<L>/<N>[.p/<W>]`` with N in 3-digit elements, all but the last prefixed by ``x`` (tlog-tiles)."""
    digits = f"{index:03d}"
    groups = [digits[max(0, end - 3) : end] for end in range(len(digits), 0, -3)][::-1]
    groups = [group.zfill(3) for group in groups]
    name = "/".join([*(f"x{group}" for group in groups[:-1]), groups[-1]])
    return f"{level}/{name}" + ("" if width == TILE_WIDTH else f".p/{width}")


class TileStore:
    """Tiles and entry bundles under ``log/tile``; files appear by rename. They reach the disk in batches: the
    log syncs the file system every ``sync_interval`` and then records the size its tiles are durable up to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[int | str, int], bytes] = {}  # full tiles never change; a miss is not cached

    def path(self, level: int | str, index: int, width: int = TILE_WIDTH) -> Path:
        return self.root / tile_path(level, index, width)

    def write(self, level: int | str, index: int, data: bytes, width: int) -> None:
        final = self.path(level, index, width)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(final.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)  # no fsync per tile (one each would queue before the WAL's): see MerkleLog.sync
        finally:
            os.close(fd)
        os.replace(temporary, final)
        if width == TILE_WIDTH:
            self._drop_partials(level, index)

    def _drop_partials(self, level: int | str, index: int) -> None:
        """tlog-tiles lets a log delete the partial tiles of a tile once the full one is there."""
        partials = self.path(level, index, 1).parent
        if partials.is_dir():
            for item in partials.iterdir():
                item.unlink(missing_ok=True)
            partials.rmdir()

    def hashes(self, level: int, index: int, needed: int) -> bytes | None:
        """At least ``needed`` hashes of tile (level, index): the full tile, or the widest partial that has them."""
        if (full := self._cache.get((level, index))) is not None:
            return full
        if (full := self._read_full(level, index)) is not None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[(level, index)] = full
            return full
        partials = self.path(level, index, 1).parent
        try:
            widths = sorted((int(item.name) for item in partials.iterdir() if item.name.isdigit()), reverse=True)
        except FileNotFoundError:
            return None
        for width in widths:
            if width < needed:
                break
            try:
                data = (partials / str(width)).read_bytes()
            except FileNotFoundError:  # the full tile replaced it meanwhile
                return self._read_full(level, index)
            if len(data) == 32 * width:
                return data
        return None

    def _read_full(self, level: int, index: int) -> bytes | None:
        try:
            data = self.path(level, index).read_bytes()
        except FileNotFoundError:
            return None
        return data if len(data) == 32 * TILE_WIDTH else None

    def forget(self) -> None:
        self._cache.clear()


@dataclass
class _Edge:
    """The tree's right edge: per tile level, the hashes of its partial tile (fewer than 256), and the level-0
    tile's entries; plus the full tiles completed since the last publish."""

    size: int = 0
    levels: list[list[bytes]] = field(default_factory=lambda: [[]])
    entries: list[bytes] = field(default_factory=list)
    completed: list[tuple[int | str, int, bytes]] = field(default_factory=list)

    def extend(self, event_hashes: list[bytes]) -> None:
        """Append leaves: their hashes computed a level-0 tile's worth at a time."""
        sha256 = hashlib.sha256
        start = 0
        while start < len(event_hashes):
            room = TILE_WIDTH - len(self.levels[0])
            chunk = event_hashes[start : start + room]
            start += len(chunk)
            self.entries += chunk
            self.levels[0] += [sha256(b"\x00" + digest).digest() for digest in chunk]
            self.size += len(chunk)
            if len(self.levels[0]) == TILE_WIDTH:
                self._complete(0)

    def _complete(self, level: int) -> None:
        """The partial tile at ``level`` has just become full: keep it for writing, push its root a level up."""
        hashes = self.levels[level]
        index = (self.size - 1) >> (TILE_HEIGHT * (level + 1))
        self.completed.append((level, index, b"".join(hashes)))
        if level == 0:
            self.completed.append(("entries", index, b"".join(_ENTRY_PREFIX + e for e in self.entries)))
            self.entries = []
        self.levels[level] = []
        if level + 1 == len(self.levels):
            self.levels.append([])
        self.levels[level + 1].append(_subtree_root(hashes))
        if len(self.levels[level + 1]) == TILE_WIDTH:
            self._complete(level + 1)

    def subtrees(self) -> list[bytes]:
        """The roots of the maximal complete subtrees, left to right: the tree's root is ``root_of`` them."""
        roots: list[bytes] = []
        for hashes in reversed(self.levels):
            start = 0
            for bit in reversed(range(TILE_HEIGHT)):
                width = 1 << bit
                if len(hashes) - start >= width:
                    roots.append(_subtree_root(hashes[start : start + width]))
                    start += width
        return roots


def _subtree_root(hashes: list[bytes]) -> bytes:
    """The root over a power-of-two count of hashes (the subtree a run of tile hashes spans)."""
    sha256 = hashlib.sha256
    while len(hashes) > 1:
        hashes = [sha256(b"\x01" + hashes[i] + hashes[i + 1]).digest() for i in range(0, len(hashes), 2)]
    return hashes[0]


class MerkleLog:
    """The tree, its tiles and its checkpoints. Thread-safe: ``add`` from request threads, ``publish`` from one
    publisher thread, proofs from any."""

    def __init__(self, layout: DataDir) -> None:
        self.layout = layout
        self.tiles = TileStore(layout.log_tiles)
        self.reader = LogReader(layout, self.tiles)
        self._edge = _Edge()
        self._lock = threading.Lock()  # the edge
        self._pending: dict[int, list[bytes]] = {}  # first index -> event hashes, acknowledged, not yet in the tree
        self._pending_lock = threading.Lock()
        self._signer: Ed25519PrivateKey | None = None
        self.key: NoteKey | None = None
        self.checkpoint: Checkpoint | None = None
        self.published_at = 0.0
        self._written = 0  # the tree size whose tiles are all on disk: proofs are served up to it
        # Asked for cosignature lines of each new checkpoint (ingest.witness.Witnessing), from the publisher thread
        self.cosigners: Callable[[Checkpoint], list[str]] | None = None
        # Called first in each publish, to ``add`` leaves that arrived elsewhere (a cluster's leader reads them
        # from PostgreSQL, store.cluster)
        self.feed: Callable[[], None] | None = None
        self.reissue_after = (
            60.0  # idle: submit the same checkpoint again after this many seconds, for fresh cosignatures
        )
        self.sync_interval = 30.0  # how often the tiles written meanwhile are made durable (one syncfs)
        self._synced_at = time.monotonic()

    # -- identity -----------------------------------------------------------------------------------------------

    def sign_with(self, private: Ed25519PrivateKey) -> None:
        self._signer = private
        self.key = log_key(private)
        self.checkpoint = self._newest_checkpoint()

    @property
    def size(self) -> int:
        return self._edge.size

    # -- several nodes (store.cluster) ----------------------------------------------------------------------------

    def forget_pending(self) -> None:
        """Drop batches added but not integrated: a node that (again) leads recovers the tree from the lake."""
        with self._pending_lock:
            self._pending.clear()

    def reload_checkpoint(self) -> None:
        """The newest checkpoint on disk, which another node may have signed since this one last looked."""
        self.checkpoint = self._newest_checkpoint()

    def follow(self) -> None:
        """On a node that does not write the log: serve proofs up to the newest checkpoint another node wrote
        (its tiles were written before it was signed)."""
        self.reload_checkpoint()
        if self.checkpoint is not None:
            self._written = self.checkpoint.size

    # -- writing ------------------------------------------------------------------------------------------------

    def add(self, first_index: int, event_hashes: list[str]) -> None:
        """An acknowledged batch (durable in the WAL): it joins the tree at the next ``publish``."""
        with self._pending_lock:
            self._pending[first_index] = [bytes.fromhex(digest) for digest in event_hashes]

    def _integrate(self) -> int:
        """Move the pending batches that continue the tree into it, in index order."""
        added = 0
        with self._pending_lock, self._lock:
            while (batch := self._pending.pop(self._edge.size, None)) is not None:
                self._edge.extend(batch)
                added += len(batch)
        return added

    def publish(self) -> Checkpoint | None:
        """Integrate what was acknowledged, write its tiles, and sign a checkpoint of the new size (None when the
        tree did not grow or no key signs for it)."""
        if self.feed is not None:
            self.feed()
        self._integrate()
        with self._lock:
            edge = self._edge
            size = edge.size
            unchanged = size == self._written and not edge.completed
            completed, edge.completed = edge.completed, []
            partial = [(level, list(hashes)) for level, hashes in enumerate(edge.levels) if hashes]
            entries = list(edge.entries)
            root = root_of(edge.subtrees())
        if unchanged:
            if self.checkpoint is not None and time.monotonic() - self.published_at >= self.reissue_after:
                self._publish_note(self.checkpoint)  # re-issued while idle: fresh cosignatures
            return self._sign_if_due(size, root)
        for level, index, data in completed:
            self.tiles.write(level, index, data, TILE_WIDTH)
        for level, hashes in partial:
            self.tiles.write(level, size >> (TILE_HEIGHT * (level + 1)), b"".join(hashes), len(hashes))
        if entries:
            bundle = b"".join(_ENTRY_PREFIX + e for e in entries)
            self.tiles.write("entries", size >> TILE_HEIGHT, bundle, len(entries))
        self._written = size
        return self._sign_if_due(size, root)

    def sync(self) -> None:
        """Make every tile written so far durable (one syncfs of the data dir's file system, not one fsync per
        tile), then record the newest checkpoint as the size the tiles hold on disk: recovery starts there."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        _sync_file_system(self.layout.log)
        marker = {"size": checkpoint.size, "root": base64.b64encode(checkpoint.root).decode()}
        temporary = self.layout.tiles_durable.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps(marker))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.layout.tiles_durable)
        self._synced_at = time.monotonic()

    def sync_if_due(self) -> None:
        if time.monotonic() - self._synced_at >= self.sync_interval:
            self.sync()

    def _sign_if_due(self, size: int, root: bytes | None) -> Checkpoint | None:
        signer, key = self._signer, self.key
        if signer is None or key is None:
            return None
        if self.checkpoint is not None and self.checkpoint.size >= size:
            return None
        return self._sign(signer, key, size, self.root(size) if root is None else root)

    def _sign(self, signer: Ed25519PrivateKey, key: NoteKey, size: int, root: bytes) -> Checkpoint:
        text = checkpoint_text(key.name, size, root)
        note = text + "\n" + sign_note(text, key.name, signer)
        checkpoint = open_checkpoint(note, key)
        record = {"size": size, "root": base64.b64encode(root).decode(), "issued_at": time.time(), "note": note}
        history = self.layout.checkpoint_history
        with history.open("ab") as handle:
            handle.write(orjson.dumps(record) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.checkpoint = checkpoint
        self._publish_note(checkpoint)
        return checkpoint

    def _publish_note(self, checkpoint: Checkpoint) -> None:
        """``log/checkpoint``: the checkpoint at once, then with the witnesses' cosignatures once they answer."""
        self._write_checkpoint(checkpoint.note)
        self.published_at = time.monotonic()
        if self.cosigners is not None:
            lines = self.cosigners(checkpoint)
            if lines and self.checkpoint is checkpoint:  # no newer checkpoint was published meanwhile
                self._write_checkpoint(checkpoint.note + "".join(lines))

    def _write_checkpoint(self, note: str) -> None:
        temporary = self.layout.checkpoint_file.with_suffix(".tmp")
        temporary.write_text(note, encoding="utf-8")
        os.replace(temporary, self.layout.checkpoint_file)

    # -- reading ------------------------------------------------------------------------------------------------

    def hash_at(self, level: int, index: int) -> bytes:
        return self.reader.hash_at(level, index)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return self.reader.inclusion(index, size, limit=self._written)

    def consistency(self, old_size: int, size: int) -> list[bytes]:
        return self.reader.consistency(old_size, size, limit=self._written)

    def root(self, size: int) -> bytes:
        """The root of the tree of ``size`` (at most the size whose tiles are written)."""
        return self.reader.root(size, limit=self._written)

    # -- recovery -----------------------------------------------------------------------------------------------

    def recover(self, leaves_from: Callable[[int], Iterable[tuple[int, str]]], progress: Callable[[str], None]) -> None:
        """Load the tree: the right edge at the size the tiles were last made durable at (``log/tiles-durable``),
        from its tiles and checked against that checkpoint's root, then every leaf the data dir holds beyond it
        (``leaves_from(size)``: (log index, event hash) from the lake, the quarantine and the WAL, any order).
        Without usable tiles, every leaf is read and the tiles are written again. The tree must then give the root
        of the newest checkpoint the log signed."""
        durable = _read_json(self.layout.tiles_durable)
        edge = self._edge_from_tiles(durable) if durable is not None else None
        newest = newest_history_record(self.layout.checkpoint_history)
        if edge is None and newest is not None:
            progress(f"rebuilding the transparency log's tiles from the lake (checkpoint {newest['size']})")
        try:
            self._extend(edge or _Edge(), leaves_from, newest)
        except _TilesDisagree:
            if edge is None:
                raise CorruptState(_disagree(newest)) from None
            progress("the tiles do not give the newest checkpoint; rebuilding them from the lake")
            try:
                self._extend(_Edge(), leaves_from, newest)
            except _TilesDisagree:
                raise CorruptState(_disagree(newest)) from None

    def _extend(
        self,
        edge: _Edge,
        leaves_from: Callable[[int], Iterable[tuple[int, str]]],
        newest: dict[str, object] | None,
    ) -> None:
        ordered = sorted(leaves_from(edge.size))
        for expected, (index, _) in enumerate(ordered, edge.size):
            if index != expected:
                raise CorruptState(
                    f"the transparency log cannot be rebuilt: the data dir holds no event at log index {expected}"
                    f" (next held: {index}); an acknowledged event is missing. Run `custody verify`"
                )
        edge.extend([bytes.fromhex(digest) for _, digest in ordered])
        with self._lock:
            self._edge = edge
            self._written = 0
        self.tiles.forget()
        self.publish()  # the tiles; the checkpoint once a key signs for the log
        if newest is not None:
            size, root = int(str(newest["size"])), str(newest["root"])
            if size > edge.size or base64.b64encode(self.root(size)).decode() != root:
                raise _TilesDisagree

    def _edge_from_tiles(self, record: dict[str, object]) -> _Edge | None:
        """The right edge at the size of a checkpoint record, from the partial tiles written for it; None when
        any is missing or they do not give the checkpoint's root."""
        size = int(record["size"])  # type: ignore[call-overload]
        edge = _Edge(size=size, levels=[])
        top = max(1, (size.bit_length() + TILE_HEIGHT - 1) // TILE_HEIGHT)
        for level in range(top):
            width = (size >> (TILE_HEIGHT * level)) % TILE_WIDTH
            data = self.tiles.hashes(level, size >> (TILE_HEIGHT * (level + 1)), width) if width else b""
            if data is None:
                return None
            edge.levels.append([data[i : i + 32] for i in range(0, 32 * width, 32)])
        width = size % TILE_WIDTH
        if width:
            bundle = self._entries(size >> TILE_HEIGHT, width)
            if bundle is None:
                return None
            edge.entries = bundle
        if base64.b64encode(root_of(edge.subtrees())).decode() != record["root"]:
            return None
        return edge

    def _entries(self, index: int, width: int) -> list[bytes] | None:
        for candidate in (TILE_WIDTH, *range(TILE_WIDTH - 1, width - 1, -1)):
            try:
                data = self.tiles.path("entries", index, candidate).read_bytes()
            except FileNotFoundError:
                continue
            entries = [data[i + 2 : i + 34] for i in range(0, len(data), 34)]
            if len(data) == 34 * candidate and all(len(e) == 32 for e in entries):
                return entries[:width]
        return None

    def _newest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint this key signed; None (and an error in the log) when it was signed by another
        key: the server's key was replaced, and clients that pinned the old one will see a new log."""
        record = newest_history_record(self.layout.checkpoint_history)
        if self.key is None or record is None:
            return None
        try:
            return open_checkpoint(str(record["note"]), self.key)
        except LogError as exc:
            log.error(
                "the newest checkpoint (size %s) was not signed by this server's key (%s): the log goes on under"
                " the new key %s, which clients must pin anew",
                record["size"],
                exc,
                self.key.vkey,
            )
            return None


class LogReader:
    """Proofs and roots from the tiles on disk, for any tree size up to the newest checkpoint: what the read API
    and ``custody verify`` use, and the writer too (it serves proofs only up to the size it has written)."""

    def __init__(self, layout: DataDir, tiles: TileStore | None = None) -> None:
        self.layout = layout
        self.tiles = tiles or TileStore(layout.log_tiles)

    def newest(self) -> dict[str, object] | None:
        return newest_history_record(self.layout.checkpoint_history)

    def checkpoint_note(self) -> str | None:
        try:
            return self.layout.checkpoint_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _limit(self, limit: int | None) -> int:
        if limit is not None:
            return limit
        newest = self.newest()
        return 0 if newest is None else int(newest["size"])  # type: ignore[call-overload]

    def hash_at(self, level: int, index: int) -> bytes:
        """The root of complete subtree (level, index), from the tile that holds it."""
        tile_level, height = divmod(level, TILE_HEIGHT)
        first = index << height  # in units of hashes of tile_level
        tile, offset = divmod(first, TILE_WIDTH)
        count = 1 << height
        data = self.tiles.hashes(tile_level, tile, offset + count)
        if data is None:
            raise CorruptState(f"tile {tile_path(tile_level, tile)} of the transparency log is missing")
        return _subtree_root([data[i : i + 32] for i in range(32 * offset, 32 * (offset + count), 32)])

    def inclusion(self, index: int, size: int, *, limit: int | None = None) -> list[bytes]:
        self._check(size, limit)
        return inclusion_proof(index, size, self.hash_at)

    def consistency(self, old_size: int, size: int, *, limit: int | None = None) -> list[bytes]:
        self._check(size, limit)
        return consistency_proof(old_size, size, self.hash_at)

    def root(self, size: int, *, limit: int | None = None) -> bytes:
        self._check(size, limit)
        return root_of(_range_subtrees(self.hash_at, size))

    def _check(self, size: int, limit: int | None) -> None:
        top = self._limit(limit)
        if not 0 <= size <= top:
            raise LogError(f"tree size {size} is beyond the log's newest checkpoint ({top})")


class _TilesDisagree(Exception):
    """The tree loaded from the tiles and the leaves does not give the newest checkpoint's root."""


def _disagree(newest: dict[str, object] | None) -> str:
    size, root = (None, None) if newest is None else (newest["size"], newest["root"])
    return (
        f"the data dir's events do not match checkpoint {size} (root {root}) that this log signed; run `custody verify`"
    )


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        value = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and {"size", "root"} <= value.keys() else None


def _sync_file_system(path: Path) -> None:
    """syncfs(2) of the file system holding ``path`` (all its dirty data in one call); sync(2) where there is none."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "syncfs") or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _range_subtrees(hash_at: Callable[[int, int], bytes], size: int) -> list[bytes]:
    """The maximal complete subtrees of the tree of ``size``, left to right."""
    roots = []
    start = 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            roots.append(hash_at(bit, start >> bit))
            start += 1 << bit
    return roots


def read_history(path: Path) -> list[dict[str, object]]:
    """Every checkpoint in ``log/checkpoints.jsonl``; a torn last line (a crash mid-append) is left out."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise CorruptState(f"{path}: line {number} is not JSON") from exc
    return records


def newest_history_record(path: Path) -> dict[str, object] | None:
    """The last whole line of ``log/checkpoints.jsonl``, read from its end."""
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, end - 65536))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record: dict[str, object] = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        return record
    return None
