"""Signature verification on every core: a pool of processes that run the stateless checks on chunks of a batch.

Ed25519 and ECDSA verification is ~80% of the work per event, and the rest of the checks (JSON, schema, hash) hold
the GIL, so threads alone cannot use a second core. Each worker keeps its own copy of the key ring, rebuilt only
when the ring's version changes (an admin call); a chunk carries the version and the key specs.
"""

from __future__ import annotations

import multiprocessing
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

    def check(
        self, tokens: Sequence[object], keys: KeyRing, *, now: datetime, max_event_bytes: int, max_skew: timedelta
    ) -> list[Verified | Rejected]:
        if not tokens:
            return []
        chunks = max(1, min(self.workers, len(tokens) // _MIN_CHUNK))
        size = -(-len(tokens) // chunks)
        version, specs = keys.version, keys.specs
        futures = [
            self._pool.submit(
                _check_chunk, version, specs, list(tokens[start : start + size]), now, max_event_bytes, max_skew
            )
            for start in range(0, len(tokens), size)
        ]
        flat = [item for future in futures for item in future.result()]
        return [_revive(item, token) for item, token in zip(flat, tokens, strict=True)]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _warm_up() -> None:
    """Runs once per worker at start; importing this module imported everything a check needs."""


def _check_chunk(
    version: int,
    specs: list[KeySpec],
    tokens: list[object],
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
) -> list[_Flat]:
    global _worker_ring
    if _worker_ring is None or _worker_ring.version != version:
        ring = KeyRing()
        ring.load_specs(specs, version)
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
