"""Signature verification on every core: a pool of processes that run the stateless checks on chunks of a batch.

Ed25519 and ECDSA verification is most of the work per event, and the rest of the checks (JSON, schema, hash) hold
the GIL, so threads alone cannot use a second core. Each worker keeps its own copy of the key ring, rebuilt only
when the ring's version changes (an admin call): a chunk carries the version, and a worker that is behind asks
for the specs.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta

from ingest.checks import Rejected, Verified, check_event
from ingest.codes import ErrorCode
from ingest.keys import KeyRing, KeySpec
from store.orphans import exit_with_parent

__all__ = ["VerifierPool"]

_MIN_CHUNK = 8
_worker_ring: KeyRing | None = None


class VerifierPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent
        )
        # Start (and import into) every worker now, so the first requests after a start do not wait for them.
        for future in [self._pool.submit(_warm_up) for _ in range(workers)]:
            future.result()
        # Chunks carry the key ring's version only; a worker with an older ring answers None and gets the specs,
        # pickled once per version (the specs of thousands of emitters would cost more than the chunk).
        self._specs: tuple[int, bytes] = (-1, b"")

    def check(
        self, tokens: Sequence[object], keys: KeyRing, *, now: datetime, max_event_bytes: int, max_skew: timedelta
    ) -> list[Verified | Rejected]:
        if not tokens:
            return []
        chunks = max(1, min(self.workers, len(tokens) // _MIN_CHUNK))
        size = -(-len(tokens) // chunks)
        version, specs = keys.snapshot()
        chunked = [list(tokens[start : start + size]) for start in range(0, len(tokens), size)]
        futures = [
            self._pool.submit(_check_chunk, version, None, chunk, now, max_event_bytes, max_skew) for chunk in chunked
        ]
        flat: list[_Flat] = []
        for chunk, future in zip(chunked, futures, strict=True):
            checked = future.result()
            if checked is None:  # that worker's key ring is older than this version: send it the specs
                checked = self._pool.submit(
                    _check_chunk, version, self._pickled(version, specs), chunk, now, max_event_bytes, max_skew
                ).result()
                assert checked is not None
            flat += checked
        return [_revive(item, token) for item, token in zip(flat, tokens, strict=True)]

    def _pickled(self, version: int, specs: list[KeySpec]) -> bytes:
        if self._specs[0] != version:
            self._specs = (version, pickle.dumps(specs, protocol=pickle.HIGHEST_PROTOCOL))
        return self._specs[1]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _warm_up() -> None:
    """Runs once per worker at start; importing this module imported everything a check needs."""


def _check_chunk(
    version: int,
    specs: bytes | None,
    tokens: list[object],
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
) -> list[_Flat] | None:
    """The checks of ``tokens``; None when this worker's key ring is not at ``version`` and no specs came."""
    global _worker_ring
    if _worker_ring is None or _worker_ring.version != version:
        if specs is None:
            return None
        ring = KeyRing()
        loaded: list[KeySpec] = pickle.loads(specs)  # noqa: S301 - pickled by the parent process, never input
        ring.load_specs(loaded, version)
        _worker_ring = ring
    return [
        _flatten(check_event(token, _worker_ring, now=now, max_event_bytes=max_event_bytes, max_skew=max_skew))
        for token in tokens
    ]


# Results cross the process boundary as plain tuples: unpickling frozen slotted dataclasses costs ~10 us each,
# on the one process that also acknowledges. A verified event's JWS is not sent back; the caller has it.
_Flat = tuple[str, str, str, int, str, str, str] | tuple[str, str, str, str | None, str | None]


def _flatten(item: Verified | Rejected) -> _Flat:
    if isinstance(item, Verified):
        return ("v", item.event_id, item.emitter, item.seq, item.prev_hash, item.event_hash, item.kid)
    return ("r", item.code.value, item.detail, item.event_id, item.emitter)


def _revive(item: _Flat, token: object) -> Verified | Rejected:
    if item[0] == "v":
        _, event_id, emitter, seq, prev_hash, digest, kid = item  # type: ignore[misc]
        return Verified(event_id, emitter, seq, prev_hash, digest, kid, str(token))
    _, code, detail, event_id, emitter = item  # type: ignore[misc]
    return Rejected(ErrorCode(code), detail, event_id, emitter)
