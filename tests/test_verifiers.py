"""The verifier processes follow the key ring: a key revoked or added after they started is seen by the next
check, although a chunk carries the key specs only when its worker has not been sent that ring version."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import types
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ingest.checks import Rejected, Verified, check_event
from ingest.codes import ErrorCode
from ingest.sdk import generate_key, public_jwk
from ingest.verifiers import VerifierPool, VerifierUnavailable
from store.ground.keys import KeyRing, KeySpec
from tests.signing import chain, payload, sign, sign_raw

pytestmark = pytest.mark.slow  # real verifier processes


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
    loop = asyncio.new_event_loop()
    try:

        def check(batch: list[str]) -> list[Verified | Rejected]:
            now = datetime.now(UTC)
            return loop.run_until_complete(
                pool.check(batch, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=3650))
            )

        loop.run_until_complete(pool.warm(ring))  # what the server does at start: every worker has version 1
        assert [worker.ring_version for worker in pool._live] == [1, 1]
        assert all(isinstance(item, Verified) for item in check(tokens))
        assert all(isinstance(item, Rejected) and item.code is ErrorCode.UNKNOWN_KEY for item in check(later))
        revoked: KeySpec = ("k1", "gw-1", "acme", public_jwk(first, "k1"), "2026-01-01T00:00:00Z")
        ring.load_specs([revoked, ("k2", "gw-1", "acme", public_jwk(second, "k2"), None)], 2)
        assert all(isinstance(item, Rejected) and item.code is ErrorCode.KEY_REVOKED for item in check(tokens))
        assert all(isinstance(item, Verified) for item in check(later))
        assert [worker.ring_version for worker in pool._live] == [2, 2]
        checked = check(later[:3] + tokens[:3])  # one chunk: in request order
        assert [type(item).__name__ for item in checked] == ["Verified"] * 3 + ["Rejected"] * 3
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()


def test_a_killed_worker_fails_only_its_chunks_in_flight_and_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    key = generate_key()
    tokens, _ = chain("gw-1", 600, key, "k1")
    ring = KeyRing()
    ring.load_specs([("k1", "gw-1", "acme", public_jwk(key, "k1"), None)], 1)
    replaced: list[int] = []
    pool = VerifierPool(2, on_replace=lambda: replaced.append(1))
    loop = asyncio.new_event_loop()

    async def check(batch: list[str]) -> list[Verified | Rejected]:
        now = datetime.now(UTC)
        return await pool.check(batch, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=3650))

    async def scenario() -> None:
        assert all(isinstance(item, Verified) for item in await check(tokens[:40]))  # attached, key specs sent
        victim = pool._live[0].pid
        assert victim is not None
        in_flight = asyncio.ensure_future(check(tokens))  # 300 events a worker: ~50 ms of work each
        await asyncio.sleep(0.005)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(VerifierUnavailable, match=f"verifier process {victim} ended"):
            await in_flight
        assert pool.running == 1
        assert all(isinstance(item, Verified) for item in await check(tokens[:40]))  # the survivor answers
        for _ in range(600):
            if pool.running == 2:
                break
            await asyncio.sleep(0.1)
        assert pool.running == 2
        assert replaced == [1]
        assert victim not in [worker.pid for worker in pool._live]
        checked = await check(tokens)  # both workers again, the new one given the key specs
        assert [item.seq for item in checked if isinstance(item, Verified)] == list(range(1, 601))

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()


def test_values_that_are_not_strings_are_rejected_in_place_without_reaching_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    key = generate_key()
    tokens, _ = chain("gw-1", 20, key, "k1")
    ring = KeyRing()
    ring.load_specs([("k1", "gw-1", "acme", public_jwk(key, "k1"), None)], 1)
    deep: object = []
    for _ in range(1000):  # orjson parses up to 1,024 levels; the pickler gives up long before
        deep = [deep]
    batch: list[object] = [deep, *tokens[:10], {"jws": tokens[10]}, 7, None, *tokens[10:]]
    pool = VerifierPool(2)
    loop = asyncio.new_event_loop()
    try:
        now = datetime.now(UTC)
        checked = loop.run_until_complete(
            pool.check(batch, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=3650))
        )
        only_junk = loop.run_until_complete(
            pool.check([deep, 7], ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=3650))
        )
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()
    kinds = ["r", *["v"] * 10, "r", "r", "r", *["v"] * 10]
    assert [type(item).__name__[0].lower() for item in checked] == kinds
    assert [item.seq for item in checked if isinstance(item, Verified)] == list(range(1, 21))
    for item in (checked[0], checked[11], checked[12], checked[13], *only_junk):
        assert isinstance(item, Rejected)
        assert item.code is ErrorCode.MALFORMED_JWS
        assert "expected a JWS compact string" in item.detail
    assert len(only_junk) == 2


def test_workers_judge_the_clock_by_the_server_time_and_skew_they_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk carries the server's clock and the allowed skew (as numbers, cheaper to pickle than datetimes): the
    workers use them, not their own clock. Against a server clock set to 2026-01-01T12:00:00Z, an event six minutes
    later is clock_skew and one four minutes later is accepted, although both are long past by the real clock."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    key = generate_key()
    ring = KeyRing()
    ring.load_specs([("k1", "gw-1", "acme", public_jwk(key, "k1"), None)], 1)
    server_clock = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    tokens = [
        sign(payload("gw-1", seq=1, occurred_at="2026-01-01T12:06:00Z"), key, "k1"),
        sign(payload("gw-1", seq=1, occurred_at="2026-01-01T12:04:00Z"), key, "k1"),
    ]
    pool = VerifierPool(1)
    loop = asyncio.new_event_loop()
    try:
        checked = loop.run_until_complete(
            pool.check(tokens, ring, now=server_clock, max_event_bytes=65536, max_skew=timedelta(minutes=5))
        )
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()
    skewed, near = checked
    assert isinstance(skewed, Rejected)
    assert skewed.code is ErrorCode.CLOCK_SKEW
    assert skewed.detail == (
        "occurred_at 2026-01-01T12:06:00Z is 360 s ahead of the server clock (2026-01-01T12:00:00Z); at most 300 s"
        " allowed"
    )
    assert isinstance(near, Verified)
    assert near.seq == 1


def test_a_pool_leaving_a_core_free_uses_one_worker_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the lake writer catches up, the server asks for ``leave_free=1``: every chunk then goes to the other
    workers. Shown with the second worker stopped: a request that would be split over both completes anyway."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    key = generate_key()
    tokens, _ = chain("gw-1", 40, key, "k1")
    ring = KeyRing()
    ring.load_specs([("k1", "gw-1", "acme", public_jwk(key, "k1"), None)], 1)
    pool = VerifierPool(2)
    loop = asyncio.new_event_loop()
    stopped = pool._live[1].pid
    assert stopped is not None
    try:
        loop.run_until_complete(pool.warm(ring))
        os.kill(stopped, signal.SIGSTOP)

        async def check(leave_free: int) -> list[Verified | Rejected]:
            now = datetime.now(UTC)
            return await pool.check(
                tokens, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=1), leave_free=leave_free
            )

        checked = loop.run_until_complete(asyncio.wait_for(check(leave_free=1), timeout=30))
        assert all(isinstance(item, Verified) for item in checked)
        assert len(checked) == 40
        with pytest.raises(TimeoutError):  # the same request split over both workers waits for the stopped one
            loop.run_until_complete(asyncio.wait_for(check(leave_free=0), timeout=2))
    finally:
        os.kill(stopped, signal.SIGCONT)
        loop.run_until_complete(pool.aclose())
        loop.close()


def deep_payloads() -> dict[str, bytes]:
    """Payloads of a registered emitter that once raised outside any handler: in the canonicalizer on the rejection
    path, or in the duplicate-key parse."""
    delegation = b"".join(b'{"sub":"agent-%d","act":' % depth for depth in range(1, 300)) + b'{"sub":"x"}' + b"}" * 299
    base = payload("gw-1", 1)
    del base["delegation"], base["attrs"]
    raw = orjson.dumps(base)[:-1]  # the payload without its closing brace, to append raw JSON to
    return {
        "delegation 300 deep": raw + b',"delegation":' + delegation + b"}",
        "attrs array 1000 deep": raw + b',"attrs":{"a":' + b"[" * 1000 + b'"x"' + b"]" * 1000 + b"}}",
        "repeated key, first value 1010 deep": raw
        + b',"reason":'
        + b"[" * 1010
        + b"1"
        + b"]" * 1010
        + b',"reason":"x"}',
        "33 agents deep": orjson.dumps({**base, "delegation": _nested(34)}),
    }


def _nested(names: int) -> dict[str, object]:
    node: dict[str, object] = {"sub": f"agent-{names}"}
    for depth in range(names - 1, 0, -1):
        node = {"sub": f"agent-{depth}", "act": node}
    return node


@pytest.mark.parametrize("workers", [0, 2], ids=["server threads", "verifier processes"])
def test_hostile_nesting_is_an_invalid_payload_and_kills_no_process(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    key = generate_key()
    ring = KeyRing()
    ring.load_specs([("k1", "gw-1", "acme", public_jwk(key, "k1"), None)], 1)
    hostile = deep_payloads()
    # Deep as the protocol allows, with brackets in its strings: accepted.
    good = sign(payload("gw-1", 1, delegation=_nested(33), reason="{[" * 500 + '\\"{'), key, "k1")
    tokens: list[object] = [*(sign_raw(raw, key, "k1") for raw in hostile.values()), good]
    now = datetime.now(UTC)
    if workers == 0:
        checked = [
            check_event(token, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=1)) for token in tokens
        ]
    else:
        pool = VerifierPool(workers)
        pids = {worker.pid for worker in pool._live}
        loop = asyncio.new_event_loop()
        try:
            checked = loop.run_until_complete(
                pool.check(tokens * 8, ring, now=now, max_event_bytes=65536, max_skew=timedelta(days=1))
            )[: len(tokens)]
            assert {worker.pid for worker in pool._live} == pids  # none died, none was replaced
        finally:
            loop.run_until_complete(pool.aclose())
            loop.close()
    expected = [
        "nests more than 40",
        "nests more than 40",
        "nests more than 40",
        "delegation is 33 agents deep, more than 32",
    ]
    for (name, _), item, detail in zip(hostile.items(), checked, expected, strict=False):
        assert isinstance(item, Rejected), name
        assert item.code is ErrorCode.INVALID_PAYLOAD, (name, item)
        assert detail in item.detail, (name, item.detail)
        assert item.emitter == "gw-1"
    assert isinstance(checked[-1], Verified)
