"""The verifier processes follow the key ring: a key revoked or added after they started is seen by the next
check, although chunks carry only the ring's version."""

from __future__ import annotations

import sys
import types
from datetime import UTC, datetime, timedelta

import pytest

from ingest.checks import Rejected, Verified
from ingest.codes import ErrorCode
from ingest.keys import KeyRing, KeySpec
from ingest.sdk import generate_key, public_jwk
from ingest.verifiers import VerifierPool
from tests.signing import chain


def test_workers_follow_revocations_and_new_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned workers re-run the parent's __main__; after the dashboard's AppTests that is dashboard/app.py.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    first, second = generate_key(), generate_key()
    tokens, _ = chain("gw-1", 40, first, "k1")
    later, _ = chain("gw-1", 40, second, "k2")
    ring = KeyRing()
    spec: KeySpec = ("k1", "gw-1", "acme", public_jwk(first, "k1"), None)
    ring.load_specs([spec], 1)
    pool = VerifierPool(2)
    try:

        def check(batch: list[str]) -> list[Verified | Rejected]:
            now = datetime.now(UTC)
            return pool.check(batch, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=3650))

        assert all(isinstance(item, Verified) for item in check(tokens))
        assert all(isinstance(item, Rejected) and item.code is ErrorCode.UNKNOWN_KEY for item in check(later))
        revoked: KeySpec = ("k1", "gw-1", "acme", public_jwk(first, "k1"), "2026-01-01T00:00:00Z")
        ring.load_specs([revoked, ("k2", "gw-1", "acme", public_jwk(second, "k2"), None)], 2)
        assert all(isinstance(item, Rejected) and item.code is ErrorCode.KEY_REVOKED for item in check(tokens))
        assert all(isinstance(item, Verified) for item in check(later))
        checked = check(later[:3] + tokens[:3])  # one chunk: in request order
        assert [type(item).__name__ for item in checked] == ["Verified"] * 3 + ["Rejected"] * 3
    finally:
        pool.close()
