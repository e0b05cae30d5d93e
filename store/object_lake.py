"""The lake on S3-compatible object storage: ``custody serve --lake s3://bucket/prefix``.

The objects under ``s3://bucket/prefix/events/`` are the lake, in the same Hive layout as on disk
(``events/tenant=<t>/date=<d>/<file>.parquet``), for any engine to read (Athena, Trino, Spark, DuckDB). The data
dir names it in ``lake.json``, and its ``lake/`` directory is then a **copy**, which Custody's own readers (the
query library, the read API, the dashboard, ``verify``, ``bundle``) refresh before they read
(``refresh``: new objects downloaded, objects that a compaction removed deleted), so every reader works against
the object store with DuckDB's local Parquet scans.

Atomicity is the object store's: an object appears whole when its upload completes, so no reader ever sees a
partial file. The writer uploads a file before it gives it its final local name, and deletes a compaction's
inputs from the store before it deletes them locally: a copy never holds a file the store does not, and a
reader that lists the store in the middle of a compaction sees the merged file and its inputs, of which
``live_files`` keeps only the merged one, exactly as on disk. One writer compacts at a time: the embedded server,
or a cluster's leader (``store.cluster``).

Credentials and endpoint come from the standard AWS environment and config (AWS_ACCESS_KEY_ID, AWS_PROFILE,
~/.aws/config, AWS_REGION, AWS_ENDPOINT_URL for an S3-compatible server), through pyarrow's S3 filesystem (the
AWS SDK's own credential chain).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import orjson
import pyarrow.fs as pafs

from store.ground.errors import CustodyError, StorageUnavailable
from store.ground.layout import DataDir

__all__ = ["ObjectStore", "configure", "refresh"]

log = logging.getLogger(__name__)

_REFRESH_EVERY = 1.0  # seconds: readers of one data dir list the store at most this often
_CHUNK = 8 * 1024 * 1024


class ObjectStore:
    """``s3://bucket/prefix`` through pyarrow's filesystem; paths are relative to the lake (``events/...``)."""

    def __init__(self, uri: str) -> None:
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise CustodyError(f"the lake's home must be an s3://bucket/prefix URI, got {uri!r}")
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as exc:
            raise CustodyError(f"cannot open {self.uri}: {exc}") from exc
        self._refreshed_at = 0.0
        self._refresh_lock = threading.Lock()

    def key(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def put(self, local: Path, relative: str) -> None:
        """Upload ``local`` as ``relative``: the object appears whole or not at all.

        It is uploaded under a hidden temporary name (``.<name>.<id>.tmp``: Custody lists only ``*.parquet``, and
        Hive-style engines skip names starting with a dot) and then copied to its name by the server, which
        makes the object appear at once. An upload stream closed after an error completes whatever it had sent,
        so the temporary name is what keeps a partial upload from ever being a lake file."""
        name = relative.rsplit("/", 1)
        temporary = f"{name[0]}/.{name[1]}.{uuid.uuid4().hex}.tmp"
        try:
            with local.open("rb") as source, self.fs.open_output_stream(self.key(temporary)) as sink:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
            self.fs.move(self.key(temporary), self.key(relative))
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.fs.delete_file(self.key(temporary))
            raise StorageUnavailable(f"cannot upload {relative} to {self.uri}: {exc}") from exc

    def remove_temporary_objects(self) -> int:
        """Delete the temporary objects of uploads that did not finish (a writer that ended mid-upload)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.key("events"), recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageUnavailable(f"cannot list {self.uri}: {exc}") from exc
        stale = [info.path for info in infos if info.base_name.startswith(".") and info.base_name.endswith(".tmp")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(path)
        return len(stale)

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.key(relative))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete {relative} from {self.uri}: {exc}") from exc

    def listing(self) -> dict[str, int]:
        """Every Parquet object of the lake: its path relative to the lake, and its size."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.key("events"), recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageUnavailable(f"cannot list {self.uri}: {exc}") from exc
        start = len(self.base) + 1
        return {
            info.path[start:]: info.size or 0
            for info in infos
            if info.type == pafs.FileType.File and info.path.endswith(".parquet")
        }

    def get(self, relative: str, local: Path) -> None:
        """Download ``relative`` to ``local`` through a temporary file and a rename: a local reader never sees a
        partial copy."""
        local.parent.mkdir(parents=True, exist_ok=True)
        temporary = local.parent / f".{local.name}.{os.getpid()}.{threading.get_ident()}.get.tmp"
        try:
            with self.fs.open_input_stream(self.key(relative)) as source, temporary.open("wb") as sink:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
            os.replace(temporary, local)
        except FileNotFoundError:
            temporary.unlink(missing_ok=True)  # removed by a compaction since the listing: nothing to copy
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot download {relative} from {self.uri}: {exc}") from exc

    def refresh(self, lake_root: Path, *, force: bool = False) -> tuple[int, int]:
        """Make ``lake_root`` a copy of the store: download what it lacks, delete what the store no longer has.
        Returns (downloaded, deleted)."""
        with self._refresh_lock:
            recent = time.monotonic() - self._refreshed_at < _REFRESH_EVERY
            if recent and not force and (lake_root / "events").is_dir():
                return 0, 0
            remote = self.listing()
            local = {
                str(path.relative_to(lake_root)): path
                for path in (lake_root / "events").glob("tenant=*/date=*/*.parquet")
            }
            downloaded = deleted = 0
            for relative, size in sorted(remote.items()):
                path = local.get(relative)
                if path is None or path.stat().st_size != size:
                    self.get(relative, lake_root / relative)
                    downloaded += 1
            for relative, path in local.items():
                if relative not in remote:
                    path.unlink(missing_ok=True)
                    deleted += 1
            self._refreshed_at = time.monotonic()
        if downloaded or deleted:
            log.debug("lake copy refreshed from %s: %d downloaded, %d deleted", self.uri, downloaded, deleted)
        return downloaded, deleted


_stores: dict[Path, ObjectStore | None] = {}
_stores_lock = threading.Lock()


def home_of(data_dir: Path) -> ObjectStore | None:
    """The object store the data dir's lake lives in (``lake.json``), or None for a lake on this disk."""
    key = data_dir.resolve()
    with _stores_lock:
        if key not in _stores:
            path = DataDir(data_dir).lake_home
            if not path.exists():
                return None  # not cached: a lake.json written later (by serve --lake) is seen
            try:
                uri = orjson.loads(path.read_bytes())["uri"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CustodyError(f'{path} is not a lake home ({{"uri": "s3://..."}}): {exc}') from exc
            _stores[key] = ObjectStore(str(uri))
        return _stores[key]


def configure(data_dir: Path, uri: str) -> ObjectStore:
    """Record that the data dir's lake lives at ``uri`` (``serve --lake``); a data dir whose lake already lives
    elsewhere, or on its own disk with events, is refused."""
    store = ObjectStore(uri)
    layout = DataDir(data_dir)
    current = home_of(data_dir)
    if current is not None:
        if current.uri != store.uri:
            raise CustodyError(f"the lake of {data_dir} lives at {current.uri}, not {store.uri}")
        return current
    if any(layout.events.glob("tenant=*/date=*/*.parquet")):
        raise CustodyError(
            f"the lake of {data_dir} already holds events on this disk: moving it to {store.uri} is not supported"
        )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = layout.lake_home.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps({"uri": store.uri}))
    os.replace(temporary, layout.lake_home)
    return home_of(data_dir) or store


def refresh(data_dir: Path, *, force: bool = False) -> None:
    """Before reading the lake: bring the data dir's copy up to date when the lake lives on object storage."""
    home = home_of(data_dir)
    if home is not None:
        home.refresh(DataDir(data_dir).lake, force=force)
