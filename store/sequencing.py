"""Who decides the order: each emitter's chain and the log's global order, in one place per deployment.

A request's events are decided against their emitters' heads and the event ids already stored, and the accepted
ones are made durable and numbered in the transparency log, as one step no other request can interleave with.
Two implementations keep that promise:

- ``LocalSequencer`` (the embedded default): per-emitter locks in this process, the write-ahead log's fsync.
- ``store.cluster.PgSequencer`` (``custody serve --state postgresql://...``): one PostgreSQL transaction, so any
  number of nodes may accept any emitter's events.

The caller's ``decide`` sees a consistent ``ChainView`` and returns a ``Decision``; it must not change anything
outside it, because a sequencer may run it again (PostgreSQL retries a transaction that lost a race).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from store.ground.layout import SERVER_EMITTER
from store.state import Head, IndexEntry, StateDB
from store.wal import WalRecord

__all__ = ["ChainView", "Decision", "LocalSequencer", "Sequencer"]

T = TypeVar("T")


class ChainView(Protocol):
    """What a decision may read: heads, stored event ids and stored hashes, as of the moment it runs."""

    def head(self, emitter: str) -> Head: ...

    def stored(self) -> Mapping[str, IndexEntry]:
        """The entries of the request's event ids that are already stored."""
        ...

    def hash_at(self, emitter: str, seq: int) -> str | None: ...


@dataclass
class Decision(Generic[T]):
    """What to append (in order), the heads it moves, and whatever the caller wants back."""

    records: list[WalRecord]
    heads: dict[str, Head]
    outcome: T


class Sequencer(Protocol):
    def sequence(
        self, emitters: Sequence[str], event_ids: set[str], decide: Callable[[ChainView], Decision[T]]
    ) -> tuple[int, Decision[T]]:
        """Run ``decide`` with the emitters' chains held, make its records durable, return the log index of the
        first record and the decision."""
        ...

    def head(self, emitter: str) -> Head: ...

    def registry_lock(self) -> AbstractContextManager[object]:
        """Held while the registry checks a change and records it."""
        ...


class LocalStore(Protocol):
    """What ``LocalSequencer`` needs of ``store.engine.Store``."""

    state: StateDB

    def append(self, records: Sequence[WalRecord]) -> int: ...

    def find_event_ids(self, event_ids: Sequence[str]) -> dict[str, IndexEntry]: ...

    def hashes_at(self, emitter: str, seqs: Sequence[int]) -> dict[int, str]: ...


class _LocalView:
    def __init__(self, sequencer: LocalSequencer, event_ids: set[str]) -> None:
        self._sequencer = sequencer
        self._event_ids = event_ids
        self._stored: Mapping[str, IndexEntry] | None = None

    def head(self, emitter: str) -> Head:
        return self._sequencer.head(emitter)

    def stored(self) -> Mapping[str, IndexEntry]:
        if self._stored is None:
            self._stored = self._sequencer.store.find_event_ids(sorted(self._event_ids))
        return self._stored

    def hash_at(self, emitter: str, seq: int) -> str | None:
        return self._sequencer.store.hashes_at(emitter, [seq]).get(seq)


class LocalSequencer:
    """One process decides: a lock per emitter (taken in sorted order, so two requests never deadlock) and a claim
    on each event id (emitter locks do not cover two emitters sending the same id)."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self._heads: dict[str, Head] = store.state.heads()
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._claimed: set[str] = set()
        self._claims_changed = threading.Condition()

    def head(self, emitter: str) -> Head:
        return self._heads.get(emitter, Head())

    def emitter_lock(self, emitter: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(emitter, threading.RLock())

    def registry_lock(self) -> AbstractContextManager[object]:
        return self.emitter_lock(SERVER_EMITTER)

    def sequence(
        self, emitters: Sequence[str], event_ids: set[str], decide: Callable[[ChainView], Decision[T]]
    ) -> tuple[int, Decision[T]]:
        with ExitStack() as stack:
            for emitter in sorted(emitters):
                stack.enter_context(self.emitter_lock(emitter))
            stack.enter_context(self._claim(event_ids))
            decision = decide(_LocalView(self, event_ids))
            first = self.store.append(decision.records)
            self._heads.update(decision.heads)
        return first, decision

    @contextmanager
    def _claim(self, event_ids: set[str]) -> Iterator[None]:
        """Hold ``event_ids`` while this request decides and appends them; wait first for any request holding
        one of them, whose outcome then shows in the index. Claims are taken all at once and never while holding
        one, so two requests never wait for each other."""
        with self._claims_changed:
            while not self._claimed.isdisjoint(event_ids):
                self._claims_changed.wait()
            self._claimed |= event_ids
        try:
            yield
        finally:
            with self._claims_changed:
                self._claimed -= event_ids
                self._claims_changed.notify_all()
