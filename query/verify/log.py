"""The lake against the transparency log: the tree rebuilt from the lake's events must be the tree the log signed.

``verify_log`` reads every event's ``log_index`` and ``event_hash`` (lake, quarantine, WAL), rebuilds the RFC 6962
tree in index order, and checks:

- every log index from 0 up is held by exactly one event (``log_missing``, ``log_duplicate``; ``log_leaf`` for an
  event hash that is not one): an event deleted
  anywhere, the newest ones included, leaves a hole or a short tree;
- the newest checkpoint verifies with the log's key and its root is the rebuilt tree's at its size
  (``checkpoint_signature``, ``log_root``; ``checkpoint_missing`` when the lake has numbered events and no
  checkpoint is there to compare with);
- every checkpoint in the history verifies and is the rebuilt tree's root at its size, so the history is
  consistent (``history_root``).

The checkpoint to trust can come from outside the data dir (``trusted``: one an auditor fetched earlier, or a
witness cosigned) with the log's public key (``log_key``): then nothing in ``state/`` or ``log/`` is needed, and
an operator who deletes events and rewrites everything under ``--data-dir`` is still caught.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from query.lake import LakeReader
from query.verify.report import LOG_CHECKS, IntegrityProblem
from store.ground.errors import CustodyError
from store.ground.layout import DataDir
from store.ground.tlog import Checkpoint, LogError, NoteKey, open_checkpoint, root_of
from store.merkle_log import log_key, read_history
from store.quarantine import Quarantine
from store.wal import read_records

__all__ = ["LOG_CHECKS", "LogCheck", "log_key_of", "verify_log"]

_SLICE = 65_536  # leaves turned into Python objects at a time
_BLOCK = 256  # leaves hashed as one complete subtree when aligned and whole


@dataclass
class LogCheck:
    """What the log check found: the rebuilt tree's size, the checkpoint it was compared with, and problems."""

    tree_size: int = 0
    before_log: int = 0  # events written before the transparency log existed (no log_index)
    checkpoint: Checkpoint | None = None
    history: int = 0
    problems: list[IntegrityProblem] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "events_before_log": self.before_log,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.as_json(),
            "history_checked": self.history,
        }


def log_key_of(data_dir: Path) -> NoteKey:
    """The log's key from the server key in the data dir (MissingServerKey when there is none)."""
    return log_key(DataDir(data_dir).server_key())


def verify_log(
    data_dir: Path,
    *,
    log_key: NoteKey | None = None,
    trusted: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> LogCheck:
    """Rebuild the tree from the data dir's events and compare it with the checkpoints (see the module doc)."""
    check = LogCheck()
    indexes, hashes = _leaves(data_dir, check)
    key = log_key or _own_key(data_dir, check)
    wanted = _checkpoints(data_dir, key, trusted, check)
    roots = _rebuild(indexes, hashes, sorted({size for size, _ in wanted}), check, progress)
    if check.checkpoint is None and check.tree_size > 0 and key is not None:
        check.problems.append(
            IntegrityProblem(
                "checkpoint_missing",
                f"a checkpoint to compare the lake's {check.tree_size} numbered events with",
                f"none: no {DataDir(data_dir).checkpoint_file} and no --checkpoint given",
            )
        )
    claims: dict[tuple[int, bytes], str] = {}  # one claim per (size, root); the newest or trusted one names it
    for size, (label, root) in wanted:
        claims.setdefault((size, root), label)
    for (size, root), label in claims.items():
        if size > check.tree_size:
            check.problems.append(
                IntegrityProblem(
                    "history_root" if label == "history checkpoint" else "log_root",
                    f"{size} events (the {label} of size {size})",
                    f"the lake's events at log indexes 0-{check.tree_size - 1} only: {size - check.tree_size}"
                    " acknowledged events are missing at the end",
                )
            )
        elif roots[size] != root:
            check.problems.append(
                IntegrityProblem(
                    "history_root" if label == "history checkpoint" else "log_root",
                    f"root {_b64(root)} (the {label} of size {size})",
                    f"root {_b64(roots[size])} from the lake's events",
                )
            )
    return check


def _own_key(data_dir: Path, check: LogCheck) -> NoteKey | None:
    try:
        return log_key_of(data_dir)
    except CustodyError as exc:
        check.problems.append(IntegrityProblem("checkpoint_signature", "the log's public key", str(exc)))
        return None


def _leaves(data_dir: Path, check: LogCheck) -> tuple[pa.Array, pa.Array]:
    """Every numbered event's (log index, event hash), sorted by index, from the lake, quarantine and WAL."""
    tables = []
    for path in LakeReader(data_dir).files():
        parquet = pq.ParquetFile(path)
        if "log_index" not in parquet.schema_arrow.names:
            check.before_log += parquet.metadata.num_rows
            continue
        table = parquet.read(columns=["log_index", "event_hash"])
        check.before_log += table["log_index"].null_count
        tables.append(table.filter(pc.is_valid(table["log_index"])))
    layout = DataDir(data_dir)
    extra = [event.record for event in Quarantine(layout.quarantine).events()]
    if layout.wal.is_dir():
        extra += [record for path in sorted(layout.wal.glob("*.wal")) for record in read_records(path)[0]]
    numbered = [record for record in extra if record.log_index is not None]
    if numbered:
        tables.append(
            pa.table(
                {
                    "log_index": pa.array([r.log_index for r in numbered], pa.int64()),
                    "event_hash": pa.array([r.event_hash for r in numbered], pa.string()),
                }
            )
        )
    if not tables:
        return pa.array([], pa.int64()), pa.array([], pa.string())
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    table = table.take(pc.sort_indices(table["log_index"]))
    return table["log_index"].combine_chunks(), table["event_hash"].combine_chunks()


def _checkpoints(
    data_dir: Path, key: NoteKey | None, trusted: str | None, check: LogCheck
) -> list[tuple[int, tuple[str, bytes]]]:
    """(size, (label, root)) of the checkpoint to compare with and of every one in the history."""
    layout = DataDir(data_dir)
    wanted: list[tuple[int, tuple[str, bytes]]] = []
    note = trusted
    if note is None:
        try:
            note = layout.checkpoint_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            note = None
    if key is not None and note is not None:
        try:
            check.checkpoint = open_checkpoint(note, key)
        except LogError as exc:
            check.problems.append(
                IntegrityProblem("checkpoint_signature", f"a checkpoint signed by {key.vkey}", str(exc))
            )
        else:
            wanted.append(
                (check.checkpoint.size, ("trusted checkpoint" if trusted else "checkpoint", check.checkpoint.root))
            )
    for record in read_history(layout.checkpoint_history):
        check.history += 1
        size = int(record["size"])  # type: ignore[call-overload]
        if key is not None:
            try:
                opened = open_checkpoint(str(record["note"]), key)
            except LogError as exc:
                check.problems.append(
                    IntegrityProblem("history_root", f"checkpoint {size} signed by the log key", str(exc))
                )
                continue
            wanted.append((opened.size, ("history checkpoint", opened.root)))
    return wanted


def _rebuild(
    indexes: pa.Array,
    hashes: pa.Array,
    sizes: list[int],
    check: LogCheck,
    progress: Callable[[int], None] | None,
) -> dict[int, bytes]:
    """Fold the leaves, in index order, into a compact range (one subtree root per set bit of the size), and
    take the root at each of ``sizes``; holes and duplicates end the contiguous tree and are reported. The
    columns are turned into Python objects a slice at a time, the hex of a slice decoded in one call."""
    sha256 = hashlib.sha256
    stack: list[bytes] = []  # roots of the complete subtrees, left to right
    roots: dict[int, bytes] = {}
    pending = iter(sizes)
    next_size = next(pending, None)
    if next_size == 0:
        roots[0], next_size = root_of([]), next(pending, None)
    expected, previous_digest = 0, ""
    for start in range(0, len(indexes), _SLICE):
        digests = hashes.slice(start, _SLICE).to_pylist()
        leaves = _leaf_bytes(digests)
        numbers = indexes.slice(start, _SLICE).to_pylist()
        offset = 0
        while offset < len(numbers):
            if (
                leaves
                and expected % _BLOCK == 0
                and numbers[offset : offset + _BLOCK] == list(range(expected, expected + _BLOCK))
                and not (next_size is not None and expected < next_size < expected + _BLOCK)
            ):  # a whole aligned block of 256 leaves: its subtree at once, then one push of height 8
                base = 32 * offset
                level = [sha256(b"\x00" + leaves[i : i + 32]).digest() for i in range(base, base + 32 * _BLOCK, 32)]
                while len(level) > 1:
                    level = [sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
                node = level[0]
                size = expected + _BLOCK
                carry = (size & -size) >> 9
                while carry:
                    node = sha256(b"\x01" + stack.pop() + node).digest()
                    carry >>= 1
                stack.append(node)
                expected, previous_digest = size, digests[offset + _BLOCK - 1]
                offset += _BLOCK
                if size == next_size:
                    roots[size] = root_of(stack)
                    next_size = next(pending, None)
                    while next_size == size:
                        next_size = next(pending, None)
                continue
            index, digest = numbers[offset], digests[offset]
            offset += 1
            if index != expected:
                if index == expected - 1 and digest == previous_digest:
                    continue  # the same event in the WAL and the lake (a flush the server has not finished)
                if index < expected:
                    check.problems.append(
                        IntegrityProblem(
                            "log_duplicate",
                            f"one event at log index {index} ({previous_digest})",
                            f"another with event hash {digest}",
                        )
                    )
                    continue
                check.problems.append(_missing(indexes, expected, index))
                check.tree_size = expected
                return roots
            leaf = leaves[32 * (offset - 1) : 32 * offset] if leaves else _one_leaf(digest, index, check)
            node = sha256(b"\x00" + leaf).digest()
            size = expected + 1
            carry = (size & -size) >> 1  # equal-height subtrees merge, as a binary counter carries
            while carry:
                node = sha256(b"\x01" + stack.pop() + node).digest()
                carry >>= 1
            stack.append(node)
            expected, previous_digest = size, digest
            if size == next_size:
                roots[size] = root_of(stack)
                next_size = next(pending, None)
                while next_size == size:
                    next_size = next(pending, None)
        if progress is not None:
            progress(expected)
    check.tree_size = expected
    return roots


def _leaf_bytes(digests: list[str]) -> bytes:
    """The raw bytes of a slice of event hashes, decoded at once; empty if any is not 64 hex digits."""
    if any(len(digest) != 64 for digest in digests):
        return b""
    try:
        return bytes.fromhex("".join(digests))
    except ValueError:
        return b""


def _one_leaf(digest: str, index: int, check: LogCheck) -> bytes:
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        check.problems.append(
            IntegrityProblem("log_leaf", f"a SHA-256 event hash at log index {index}", f"{digest[:80]!r}")
        )
    return raw


def _missing(indexes: pa.Array, expected: int, found: int) -> IntegrityProblem:
    """The first hole, with how many indexes are missing in all."""
    last = indexes[len(indexes) - 1].as_py()
    missing = last + 1 - len(pc.unique(indexes))
    return IntegrityProblem(
        "log_missing",
        f"an event at log index {expected}" + (f"-{found - 1}" if found - 1 > expected else ""),
        f"none in the lake, the quarantine or the WAL ({missing} log indexes missing up to {last};"
        " the tree is checked up to the first)",
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
