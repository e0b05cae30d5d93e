"""One ingest server over one data dir: the store recovered, the key ring loaded, the registry started."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from ingest.admin import Registry
from ingest.auth import AdminToken
from ingest.checks import Rejected, Verified
from ingest.codes import ErrorCode
from ingest.metrics import IngestMetrics
from ingest.service import BatchOutcome, IngestService, Limits, Receipts
from ingest.verifiers import VerifierPool
from ingest.witness import WitnessEndpoint, Witnessing
from store.cluster import ClusterStore, is_postgres_uri
from store.engine import Store
from store.ground.keys import KeyRing
from store.ground.layout import DataDir
from store.ground.server_key import ServerKey

__all__ = ["IngestServer"]

log = logging.getLogger(__name__)


class Companion(Protocol):
    """Work that lives as long as the server and needs it open: started at the end of ``open``, stopped at the
    start of ``close`` (``custody serve`` runs continuous detection as one)."""

    def start(self, server: IngestServer) -> None: ...

    def stop(self) -> None: ...


class IngestServer:
    def __init__(
        self,
        data_dir: Path,
        admin_token: str,
        *,
        limits: Limits | None = None,
        flush_interval: float = 1.0,
        verify_workers: int = 0,
        writer_process: bool = True,
        witnesses: Sequence[WitnessEndpoint] = (),
        witness_quorum: int = 0,
        companions: Sequence[Companion] = (),
        state: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.companions = list(companions)
        self.admin = AdminToken(admin_token)
        self.limits = limits or Limits()
        # --state postgresql://...: one node of several (store.cluster); otherwise the embedded store
        self.store: Store = (
            ClusterStore(data_dir, state, flush_interval=flush_interval)
            if state is not None and is_postgres_uri(state)
            else Store(data_dir, flush_interval=flush_interval, writer_process=writer_process)
        )
        self.keys = KeyRing()
        self.metrics = IngestMetrics(self.store.flush_stats)
        self.ready = False
        self.verify_workers = verify_workers
        if witness_quorum > len(witnesses):
            raise ValueError(f"--witness-quorum {witness_quorum} is more than the {len(witnesses)} witnesses given")
        self.witnesses, self.witness_quorum = list(witnesses), witness_quorum
        self.witnessing: Witnessing | None = None
        self.verifiers: VerifierPool | None = None
        # Commits run in their own threads (the WAL's fsync blocks): a plain executor costs the event loop about
        # 30 us less per request than anyio's worker threads. As many as anyio's default, for the group commit.
        self._commits = ThreadPoolExecutor(max_workers=40, thread_name_prefix="custody-commit")
        self.service: IngestService
        self.registry: Registry

    def open(self, progress: Callable[[str], None] = log.info) -> None:
        """Recover (rebuild state if needed, replay the WAL into the lake), then start flushing."""
        self.store.open(progress)
        self.metrics.watch_index(lambda: self.store.index_pending)
        server_key, created = ServerKey.load_or_create(DataDir(self.data_dir).server_key_file)
        if self.verify_workers > 0:
            restarts = self.metrics.watch_verifiers(lambda: 0 if self.verifiers is None else self.verifiers.running)
            self.verifiers = VerifierPool(self.verify_workers, on_replace=restarts.inc)
        merkle = self.store.merkle
        merkle.sign_with(server_key.private_key)
        assert merkle.key is not None
        if self.witnesses:
            self.witnessing = Witnessing(self.witnesses, self.witness_quorum, merkle.key, merkle.consistency)
            merkle.cosigners = self.witnessing.cosign
        self.service = IngestService(self.store, self.keys, self.limits)
        self.service.receipts = Receipts(server_key.private_key, server_key.kid, merkle.key.name)
        self.registry = Registry(self.service, self.keys, server_key)
        self.registry.start(created)
        if isinstance(self.store, ClusterStore):
            cluster = self.store
            cluster.registry_listeners.append(self.registry.reload)  # keys registered through another node
            self.metrics.watch_cluster(
                lambda: cluster.transactions, lambda: cluster.log_lock_seconds, lambda: int(cluster.leading)
            )
        self.store.start_flusher()
        # Everything loaded so far lives as long as the server: keep it out of the cyclic collector's sweeps,
        # which otherwise walk it on every full collection, in the middle of acknowledgements.
        gc.collect()
        gc.freeze()
        for companion in self.companions:
            companion.start(self)
        self.ready = True

    async def ingest(self, tokens: list[object]) -> BatchOutcome:
        """One request's events: checked in the verifier processes (with none, checked and committed in one server
        thread: one hop off the event loop, not two), then committed in a server thread, because the WAL's fsync (or
        PostgreSQL's commit) blocks."""
        loop = asyncio.get_running_loop()
        if self.verifiers is None:
            return await loop.run_in_executor(self._commits, self._ingest_here, tokens)
        checked = await self._verify(tokens)
        if _unknown_key(checked) and await loop.run_in_executor(self._commits, self.reload_changed_registry):
            checked = await self._verify(tokens)
        return await loop.run_in_executor(self._commits, self.service.commit, checked)

    def _ingest_here(self, tokens: list[object]) -> BatchOutcome:
        now = datetime.now(UTC)
        checked = self.service.check(tokens, now=now)
        if _unknown_key(checked) and self.reload_changed_registry():
            checked = self.service.check(tokens, now=now)
        return self.service.commit(checked)

    def reload_changed_registry(self) -> bool:
        """On a cluster node: load the registry now if another node changed it since the last poll (a key
        registered there a moment ago); whether it was reloaded."""
        if not isinstance(self.store, ClusterStore) or not self.store.registry_changed():
            return False
        self.registry.reload()
        return True

    async def _verify(self, tokens: list[object]) -> list[Verified | Rejected]:
        assert self.verifiers is not None
        return await self.verifiers.check(
            tokens,
            self.keys,
            now=datetime.now(UTC),
            max_event_bytes=self.limits.max_event_bytes,
            max_skew=self.limits.max_clock_skew,
            max_age=self.limits.max_event_age,
            leave_free=1 if self.store.catching_up else 0,
        )

    def close(self) -> None:
        self.ready = False
        for companion in self.companions:
            companion.stop()
        if self.verifiers is not None:
            self.verifiers.close()
        self._commits.shutdown(wait=True)  # commits in flight finish before the store closes under them
        self.store.close()
        if self.witnessing is not None:
            self.witnessing.close()


def _unknown_key(checked: list[Verified | Rejected]) -> bool:
    return any(isinstance(item, Rejected) and item.code is ErrorCode.UNKNOWN_KEY for item in checked)
