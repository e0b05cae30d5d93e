"""The data dir: every path under ``--data-dir``, and the one way to read the server's key.

::

    <data-dir>/custody.lock              held (flock) by the one process that writes the data dir
    <data-dir>/wal/<n>.wal               write-ahead log segments not yet in the lake
    <data-dir>/lake/events/tenant=*/date=*/*.parquet
    <data-dir>/lake.json                 the lake's home on object storage, if it has one (lake/ is then a copy)
    <data-dir>/quarantine/               acknowledged events the lake could not store
    <data-dir>/state/state.sqlite        derived: event-id index, chain heads, emitter registry
    <data-dir>/state/server_key.pem      the server's Ed25519 key (created by the first ``custody serve``, 0600)
    <data-dir>/state/verify-checkpoint.jws, last-verify.json   incremental verification, the last run
    <data-dir>/index/rows/, index/reach/ derived copies for long-running readers
    <data-dir>/log/tile/...              the transparency log's tiles (c2sp.org/tlog-tiles; store.merkle_log)
    <data-dir>/log/checkpoint, log/checkpoints.jsonl   its newest signed checkpoint, and every one it signed
    <data-dir>/log/tiles-durable.json    the checkpoint up to which the tiles were last synced to disk

A command that reads a data dir opens it with ``DataDir.existing``, which refuses a path that is not one (a typo
must never read as an empty log, and must never get a key created in it); only ``custody serve`` creates one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from store.ground.errors import CorruptState, CustodyError

__all__ = ["SERVER_EMITTER", "SYSTEM_TENANT", "DataDir", "MissingServerKey", "NotADataDir"]

SERVER_EMITTER = "custody.server"  # the emitter id of the server's own stream (admin changes)
SYSTEM_TENANT = "_system"  # its tenant: lake/events/tenant=_system, hidden from every forensic query


class NotADataDir(CustodyError):
    """A path given as a data dir that holds neither ``state/`` nor ``lake/``."""

    code = "not_a_data_dir"
    exit_code = 2


class MissingServerKey(CustodyError):
    """A data dir without ``state/server_key.pem``: no ``custody serve`` ever ran on it, or the key was lost."""

    code = "missing_server_key"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def existing(cls, path: Path) -> DataDir:
        """The data dir at ``path``; ``NotADataDir`` unless it holds ``state/`` or ``lake/``."""
        if not ((path / "state").is_dir() or (path / "lake").is_dir()):
            raise NotADataDir(f"not a Custody data dir: {path} (no state/ or lake/)")
        return cls(path)

    @property
    def lock(self) -> Path:
        return self.root / "custody.lock"

    @property
    def wal(self) -> Path:
        return self.root / "wal"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def lake_heads(self) -> Path:
        """A cluster's heads as of the lake (``{emitter: {"seq", "tenant"}}``), written by its leader after each
        segment: what ``verify`` compares the lake's chains with where there is no ``state.sqlite``."""
        return self.root / "state" / "lake-heads.json"

    @property
    def lake_home(self) -> Path:
        """Where the lake lives when not here: ``{"uri": "s3://bucket/prefix"}`` (store.object_lake); then
        ``lake/`` is this data dir's copy of it."""
        return self.root / "lake.json"

    @property
    def events(self) -> Path:
        return self.root / "lake" / "events"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.sqlite"

    @property
    def server_key_file(self) -> Path:
        return self.root / "state" / "server_key.pem"

    @property
    def verify_checkpoint(self) -> Path:
        return self.root / "state" / "verify-checkpoint.jws"

    @property
    def last_verify(self) -> Path:
        return self.root / "state" / "last-verify.json"

    @property
    def row_copies(self) -> Path:
        return self.root / "index" / "rows"

    @property
    def reach_copies(self) -> Path:
        return self.root / "index" / "reach"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def log_tiles(self) -> Path:
        return self.root / "log" / "tile"

    @property
    def checkpoint_file(self) -> Path:
        return self.root / "log" / "checkpoint"

    @property
    def checkpoint_history(self) -> Path:
        return self.root / "log" / "checkpoints.jsonl"

    @property
    def tiles_durable(self) -> Path:
        return self.root / "log" / "tiles-durable.json"

    def server_key(self) -> Ed25519PrivateKey:
        """The server's key, for every reader: ``MissingServerKey`` when there is none (never created here: only
        ``custody serve`` creates it), ``CorruptState`` when the file is not an Ed25519 private key."""
        path = self.server_key_file
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise MissingServerKey(
                f"{path} does not exist: no custody serve has run on this data dir, or its key was lost"
            ) from exc
        except OSError as exc:
            raise CorruptState(f"cannot read the server key {path}: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise CorruptState(f"{path} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise CorruptState(f"{path} does not hold an Ed25519 private key")
        return key
