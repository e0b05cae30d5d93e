"""Reach copies: the columns an identity blast radius reads, per lake file, sorted by agent.

An agent's events are spread over every row group of every lake file (files hold one tenant-day, sorted by emitter
and seq), so a blast radius over the lake decodes the resource, scope and tool columns of all 10M rows to use the
4% that are the agent's. A *reach copy* of a lake file holds only the columns the blast radius reads (plus the
file's tenant), sorted by ``agent`` then ``credential_id``, in row groups of 16,384 rows: the agent's rows are
contiguous, and DuckDB skips every row group whose ``agent`` statistics exclude it. Each copy also carries, in its
Parquet metadata, the file's tool -> scope map, which would otherwise be a scan of the whole lake on every call.
A file of more than 262,144 events (a compacted day of a busy tenant) is copied in sorted runs of that many, so
that writing its copy takes no more memory than a smaller file's (sorting a big file whole costs several times
its size); an agent's rows are then contiguous within each run.

Copies are derived data in ``<data-dir>/index/reach/`` (see ``query.index.copies``): a blast radius uses the copy of
every file that has a current one and reads the lake file itself for the rest, so the answer never depends on
how far the copies have got, only the time it takes. Long-running readers (read API, dashboard) ``warm`` them in
the background at start and after each blast radius that found files without one. A copy whose row count differs
from its lake file's is not used.

Like the task-tree index's row copies, copies are as trustworthy as the data dir they live in: ``custody verify``
checks the lake, not ``index/``. Delete ``index/`` to have everything rebuilt from the lake.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from query.index.copies import BackgroundRefresh, CopyDir, CopyWriter
from query.lake import LakeReader
from store.ground.layout import DataDir
from store.lake_files import partition_of_file

__all__ = ["COLUMNS", "CopyFacts", "ReachCopies"]

log = logging.getLogger(__name__)

COLUMNS = [
    "agent",
    "credential_client_id",
    "credential_id",
    "credential_scopes",
    "type",
    "delegate_agent",
    "delegate_scopes",
    "decision_result",
    "decision_required_scope",
    "tool_server",
    "tool_name",
    "user",
    "resource_tenant",
    "resource_type",
    "resource_id",
    "occurred_at",
]
_ROWS = 16_384  # rows per row group (4,096 made every query slower: more groups to consider)
_RUN_ROWS = 16 * _ROWS  # rows sorted at a time: a larger file's copy is a sequence of sorted runs
_TOOL_MAP = b"custody.tool_scopes"  # metadata key: the file's distinct [tool_server, tool_name, required_scope]
_FOREIGN = b"custody.foreign_clients"  # metadata key: clients that presented a credential for another agent

ToolScope = tuple[str, str, str]


@dataclass(frozen=True)
class CopyFacts:
    """What a copy's metadata says of its file."""

    tool_map: list[ToolScope]  # distinct (tool server, tool name, required scope) of its invocations
    foreign_clients: frozenset[str]  # credential_client_id values of rows whose agent is another (or none)


class ReachCopies:
    def __init__(self, reader: LakeReader) -> None:
        self.reader = reader
        self.copies = CopyDir(DataDir(reader.data_dir).reach_copies, reader.events_dir)
        self._lock = threading.Lock()  # one refresh at a time
        self._checked: dict[str, CopyFacts] = {}  # copy name -> its facts, once its rows matched its file's
        # ``refresh`` in a background thread, unless one is running
        self.warm = BackgroundRefresh(self.refresh, "reach-copies", "writing reach copies")

    # -- writing ----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Write the copies of live files that have none; remove the copies of files that are gone or changed."""
        with self._lock:
            live = self.copies.live(self.reader.files())
            for path, copy in live:
                if not copy.exists():
                    with contextlib.suppress(FileNotFoundError):  # compacted away since the listing
                        self._write(path, copy)
            live = self.copies.live(self.reader.files())
            for path, copy in live:  # check them now, not in the first blast radius that reads them
                self._usable(path, copy)
            names = {copy.name for _, copy in live}
            self.copies.remove_except(names)
            self._checked = {name: facts for name, facts in self._checked.items() if name in names}

    def _write(self, path: Path, copy: Path) -> None:
        """Write the copy of one lake file, a run of up to ``_RUN_ROWS`` rows at a time (each sorted by agent and
        credential), so that a compacted file of millions of events takes no more memory than a smaller one."""
        tenant, _ = partition_of_file(path)
        writer: CopyWriter | None = None
        tool_map: set[ToolScope] = set()
        foreign_clients: set[str] = set()
        for run in _runs(pq.ParquetFile(path), _RUN_ROWS):
            table = run.append_column("tenant", pa.DictionaryArray.from_arrays(pa.array([0] * len(run)), [tenant]))
            table = table.sort_by([("agent", "ascending"), ("credential_id", "ascending")])
            calls = table.filter(
                pc.and_(pc.equal(table["type"], "tool.invocation"), pc.is_valid(table["decision_required_scope"]))
            )
            mapping = calls.group_by(["tool_server", "tool_name", "decision_required_scope"]).aggregate([])
            tool_map.update(zip(*(mapping.column(i).to_pylist() for i in range(3)), strict=True))
            clients = table.filter(pc.is_valid(table["credential_client_id"])).select(["agent", "credential_client_id"])
            foreign = clients.filter(
                pc.or_kleene(
                    pc.is_null(clients["agent"]), pc.not_equal(clients["agent"], clients["credential_client_id"])
                )
            )
            foreign_clients.update(foreign["credential_client_id"].to_pylist())
            writer = writer or self.copies.writer(copy, table.schema, row_group_size=_ROWS)
            writer.add(table)
        if writer is None:  # not reached: a file without rows is one empty run
            return
        writer.metadata({_TOOL_MAP: orjson.dumps(sorted(tool_map)), _FOREIGN: orjson.dumps(sorted(foreign_clients))})
        writer.finish()

    # -- reading ----------------------------------------------------------------------------------------------

    def split(self, files: list[Path]) -> tuple[dict[Path, Path], list[Path]]:
        """Of ``files``: {lake file: its usable copy}, and the files to read from the lake instead."""
        covered: dict[Path, Path] = {}
        rest: list[Path] = []
        for path in files:
            copy = self.copies.current(path)
            if copy is not None and self._usable(path, copy):
                covered[path] = copy
            else:
                rest.append(path)  # a file gone since the listing is reported by the query as the lake does
        return covered, rest

    def facts(self, copy: Path) -> CopyFacts:
        """What the metadata of a copy that passed ``split`` says of its file."""
        found = self._checked.get(copy.name)  # a refresh may have forgotten it since (its file just went)
        return found if found is not None else _facts(pq.read_metadata(copy))

    def _usable(self, path: Path, copy: Path) -> bool:
        if copy.name in self._checked:
            return True
        try:  # a copy not written (yet) is an OSError too
            metadata = pq.read_metadata(copy)
            rows = pq.read_metadata(path).num_rows
        except (OSError, ValueError):
            return False
        try:
            facts = _facts(metadata)
        except (KeyError, orjson.JSONDecodeError):  # rewritten by something else, say: not ours any more
            log.warning("reach copy %s lacks its facts; removed, the lake file is read instead", copy.name)
            copy.unlink(missing_ok=True)  # the next refresh writes it again
            return False
        if metadata.num_rows != rows or set(metadata.schema.to_arrow_schema().names) != {*COLUMNS, "tenant"}:
            log.warning("reach copy %s does not match %s; removed, the lake file is read instead", copy.name, path)
            copy.unlink(missing_ok=True)  # the next refresh writes it again
            return False
        self._checked[copy.name] = facts
        return True


def _facts(metadata: pq.FileMetaData) -> CopyFacts:
    """The facts a copy's metadata carries; KeyError or a JSON error when it carries none."""
    extra = metadata.metadata or {}
    tool_map = [(server, name, needed) for server, name, needed in orjson.loads(extra[_TOOL_MAP])]
    return CopyFacts(tool_map, frozenset(orjson.loads(extra[_FOREIGN])))


def _runs(parquet: pq.ParquetFile, rows: int) -> Iterator[pa.Table]:
    """The ``COLUMNS`` of a lake file, ``rows`` at a time (one empty table for a file without rows)."""
    pending: list[pa.RecordBatch] = []
    held, yielded = 0, False
    for batch in parquet.iter_batches(batch_size=min(rows, _ROWS), columns=COLUMNS):
        pending.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield pa.Table.from_batches(pending).select(COLUMNS)
            pending, held, yielded = [], 0, True
    if pending or not yielded:
        yield (pa.Table.from_batches(pending) if pending else parquet.schema_arrow.empty_table()).select(COLUMNS)
