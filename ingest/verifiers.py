"""Signature verification on every core: verifier processes driven straight from the server's event loop.

Ed25519 and ECDSA verification is most of the work per event, and the rest of the checks (JSON, schema, hash) hold
the GIL, so threads alone cannot use a second core. Each worker is a spawned process with two pipes: the event
loop writes a chunk of tokens into one (the loop's transport buffers it, so writing never blocks) and reads the
worker's answers from the other as they arrive, in the order the worker got the chunks. No thread stands between a
request and its verifiers: ``concurrent.futures.ProcessPoolExecutor`` passed every chunk through a manager thread and
a queue-feeder thread and every answer back through the manager thread, and each of those hand-offs waited for the
GIL (see docs/performance.md).

Each worker keeps its own copy of the key ring, rebuilt only when the ring's version changes (an admin call): a
chunk carries the version, and a worker that is behind answers None and gets the chunk again with the specs. A
worker that dies fails its chunks in flight with ``VerifierUnavailable`` (a 503: nothing in that request was
acknowledged) and is replaced; while none is running, checks run in the server's threads.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ingest.checks import Rejected, Verified, check_event
from ingest.codes import ErrorCode
from store.ground.canonical import ZERO_HASH, canonicalize
from store.ground.errors import CustodyError
from store.ground.jws import public_jwk, sign_compact
from store.ground.keys import KeyRing, KeySpec
from store.orphans import name_process

__all__ = ["VerifierPool", "VerifierUnavailable"]

log = logging.getLogger(__name__)

_MIN_CHUNK = 8
# The framing of ``multiprocessing.connection.Connection.send_bytes`` for messages under 2 GiB (a request is at most
# 8 MiB): the worker side uses a Connection, the event loop's side reads and writes the same frames.
_HEADER = struct.Struct("!i")
_READY = b"ready"
_START_TIMEOUT = 120.0
_worker_ring: KeyRing | None = None

# Results cross the process boundary as plain tuples: unpickling frozen slotted dataclasses costs ~10 us each,
# on the one process that also acknowledges. A verified event's JWS is not sent back; the caller has it.
_Flat = tuple[str, str, str, int, str, str, str] | tuple[str, str, str, str | None, str | None]
# (key-ring version, pickled specs or None, tokens, now as POSIX seconds, max event bytes, max skew in seconds, max
# age in seconds or 0 for none): floats, because pickling an aware datetime costs 15 us, twice per request.
_Chunk = tuple[int, bytes | None, list[object], float, int, float, float]


class VerifierUnavailable(CustodyError):
    """A verifier process ended with chunks of this request in flight; nothing in the request was acknowledged."""

    code = "verifier_unavailable"
    http_status = 503


class VerifierPool:
    """``workers`` verifier processes. Started (and imported into) at construction, so the first requests do not
    wait for them; attached to the running event loop on the first ``check``."""

    def __init__(self, workers: int, *, on_replace: Callable[[], object] = lambda: None) -> None:
        self._on_replace = on_replace
        self._context = multiprocessing.get_context("spawn")
        self._live: list[_Worker] = [_Worker.spawn(self._context) for _ in range(workers)]
        for worker in self._live:
            worker.wait_ready()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._attaching: asyncio.Lock | None = None
        self._replacements: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
        self._closed = False
        # Key specs pickled once per key-ring version (the specs of thousands of emitters cost more than a chunk).
        self._specs: tuple[int, bytes] = (-1, b"")

    async def check(
        self,
        tokens: Sequence[object],
        keys: KeyRing,
        *,
        now: datetime,
        max_event_bytes: int,
        max_skew: timedelta,
        max_age: timedelta | None = None,
        leave_free: int = 0,
    ) -> list[Verified | Rejected]:
        """The stateless checks of ``tokens``, in their order, spread over the workers. ``leave_free``: use that
        many workers fewer (at least one), to leave a core to the lake writer while it catches up: at equal
        priority it got about 0.3 of 2 saturated cores and wrote 5,000 events/s while 5,600 came in."""
        if not tokens:
            return []
        await self._attach()
        version, specs = keys.snapshot()
        if not self._live:
            return await asyncio.to_thread(_check_here, tokens, keys, now, max_event_bytes, max_skew, max_age)
        # Only strings can be JWS; anything else is rejected here at once, and is never pickled (a list nested a
        # few hundred deep, which orjson accepts, exceeds the pickler's recursion limit).
        checked: list[Verified | Rejected | None] = [
            None
            if isinstance(token, str)
            else check_event(token, keys, now=now, max_event_bytes=max_event_bytes, max_skew=max_skew, max_age=max_age)
            for token in tokens
        ]
        texts = [token for token in tokens if isinstance(token, str)]
        if not texts:
            return [item for item in checked if item is not None]
        live = self._live[: max(1, len(self._live) - leave_free)]
        chunks = max(1, min(len(live), len(texts) // _MIN_CHUNK))
        size = -(-len(texts) // chunks)
        chunked: list[list[object]] = [list(texts[start : start + size]) for start in range(0, len(texts), size)]
        clock, skew, age = (
            now.timestamp(),
            max_skew.total_seconds(),
            0.0 if max_age is None else max_age.total_seconds(),
        )
        sent = []
        for chunk in chunked:
            worker = min(live, key=lambda candidate: candidate.outstanding)
            message = (version, self._specs_for(worker, version, specs), chunk, clock, max_event_bytes, skew, age)
            sent.append((worker, worker.send(message, len(chunk))))
        flat: list[_Flat] = []
        for chunk, (worker, answer) in zip(chunked, sent, strict=True):
            answered = await answer
            if answered is None:  # not expected (the specs went ahead of this chunk): send them with it
                message = (version, self._pickled(version, specs), chunk, clock, max_event_bytes, skew, age)
                answered = await worker.send(message, len(chunk))
                assert answered is not None
            flat += answered
        revived = iter([_revive(item, token) for item, token in zip(flat, texts, strict=True)])
        return [next(revived) if item is None else item for item in checked]

    async def warm(self, keys: KeyRing) -> None:
        """Attach to the running loop and give every worker the key ring now, so that the first requests after
        a start neither wait for that nor meet a worker that never ran a check."""
        await self._attach()
        version, specs = keys.snapshot()
        answers = [
            worker.send((version, self._specs_for(worker, version, specs), [], time.time(), 0, 0.0, 0.0), 0)
            for worker in self._live
        ]
        await asyncio.gather(*answers)

    def _specs_for(self, worker: _Worker, version: int, specs: list[KeySpec]) -> bytes | None:
        """The pickled specs when ``worker`` has not been sent this key-ring version, else None. A worker reads
        its pipe in order, so every later chunk reaches it after the specs."""
        if worker.ring_version == version:
            return None
        worker.ring_version = version
        return self._pickled(version, specs)

    @property
    def running(self) -> int:
        return len(self._live)

    async def _attach(self) -> None:
        """Connect the workers' pipes to the running loop, once."""
        if self._loop is None:
            if self._attaching is None:
                self._attaching = asyncio.Lock()
            async with self._attaching:
                if self._loop is None:
                    loop = asyncio.get_running_loop()
                    for worker in self._live:
                        await worker.attach(loop, self._lost)
                    self._loop = loop

    def _lost(self, worker: _Worker) -> None:
        """A worker's pipe closed: its chunks in flight have failed; start a replacement unless the pool is closing."""
        if worker in self._live:
            self._live.remove(worker)
        if self._closed or self._loop is None:
            return
        log.error("verifier process %s ended (exit code %s); starting a new one", worker.pid, worker.process.exitcode)
        task = self._loop.create_task(self._replace())
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _replace(self) -> None:
        try:
            worker = await asyncio.to_thread(_Worker.started, self._context)
            if self._closed:
                worker.stop()
                return
            assert self._loop is not None
            await worker.attach(self._loop, self._lost)
            self._live.append(worker)
            self._on_replace()
        except Exception:
            log.exception("could not start a verifier process; the others (or the server's threads) check alone")

    def _pickled(self, version: int, specs: list[KeySpec]) -> bytes:
        if self._specs[0] != version:
            self._specs = (version, pickle.dumps(specs, protocol=pickle.HIGHEST_PROTOCOL))
        return self._specs[1]

    async def aclose(self) -> None:
        """Close the pipes in the loop (each worker then ends by itself), then stop the processes."""
        self._closed = True
        workers = list(self._live)
        for worker in workers:
            worker.detach()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks, which also empty self._live
        await asyncio.to_thread(_stop, workers)

    def close(self) -> None:
        """Stop every worker (they are stateless: nothing to flush)."""
        self._closed = True
        _stop(self._live)
        self._live.clear()


class _Worker:
    """One verifier process and the parent's ends of its two pipes."""

    def __init__(self, process: BaseProcess, chunks: Connection, answers: Connection) -> None:
        self.process = process
        self.pid = process.pid
        self._chunks = chunks
        self._answers = answers
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.ReadTransport | None = None
        self._pending: deque[tuple[asyncio.Future[list[_Flat] | None], int]] = deque()
        self.outstanding = 0  # events sent and not yet answered: the pool gives a chunk to the least loaded
        self.ring_version = -1  # the key-ring version last sent to this worker

    @classmethod
    def spawn(cls, context: SpawnContext) -> _Worker:
        chunks_read, chunks_write = context.Pipe(duplex=False)
        answers_read, answers_write = context.Pipe(duplex=False)
        process = context.Process(
            target=_serve, args=(chunks_read, answers_write), name="custody-verifier", daemon=True
        )
        process.start()
        chunks_read.close()
        answers_write.close()
        return cls(process, chunks_write, answers_read)

    @classmethod
    def started(cls, context: SpawnContext) -> _Worker:
        worker = cls.spawn(context)
        worker.wait_ready()
        return worker

    def wait_ready(self) -> None:
        """Wait (blocking) until the worker has imported everything a check needs."""
        try:
            ready = self._answers.poll(_START_TIMEOUT) and self._answers.recv_bytes() == _READY
        except EOFError:
            ready = False
        if not ready:
            self.stop()
            raise VerifierUnavailable(f"verifier process {self.pid} did not start (exit code {self.process.exitcode})")

    async def attach(self, loop: asyncio.AbstractEventLoop, lost: Callable[[_Worker], None]) -> None:
        self._writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, self._chunks)
        self._reader, _ = await loop.connect_read_pipe(lambda: _Answers(self, lost), self._answers)

    def detach(self) -> None:
        if self._writer is not None and self._reader is not None:
            self._writer.close()
            self._reader.close()

    def send(self, chunk: _Chunk, events: int) -> asyncio.Future[list[_Flat] | None]:
        assert self._writer is not None
        future: asyncio.Future[list[_Flat] | None] = asyncio.get_running_loop().create_future()
        if self._writer.is_closing():
            future.set_exception(VerifierUnavailable(f"verifier process {self.pid} has ended; resend the request"))
            return future
        body = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(body)) + body)
        self._pending.append((future, events))
        self.outstanding += events
        return future

    def answered(self, body: bytes) -> None:
        future, events = self._pending.popleft()
        self.outstanding -= events
        if not future.done():
            future.set_result(pickle.loads(body))  # noqa: S301 - written by our own worker process

    def fail(self) -> None:
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                message = f"verifier process {self.pid} ended while checking this request; nothing was acknowledged"
                future.set_exception(VerifierUnavailable(message))
        self.outstanding = 0
        if self._writer is not None:
            self._writer.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._writer is None:  # never attached: the parent still owns the pipes
            self._chunks.close()
            self._answers.close()


class _Answers(asyncio.Protocol):
    """The parent's read end of a worker's answer pipe: frames in, futures resolved in order."""

    def __init__(self, worker: _Worker, lost: Callable[[_Worker], None]) -> None:
        self.worker = worker
        self.lost = lost
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self.buffer)
            end = _HEADER.size + length
            if len(self.buffer) < end:
                return
            body = bytes(self.buffer[_HEADER.size : end])
            del self.buffer[:end]
            self.worker.answered(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.fail()
        self.lost(self.worker)


# -- the worker process -----------------------------------------------------------------------------------------


def _serve(chunks: Connection, answers: Connection) -> None:
    """A worker's whole life: answer chunks in order until the parent closes the pipe (or is gone: EOF/EPIPE)."""
    name_process("custody-verify")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server stops us
    _self_test()
    answers.send_bytes(_READY)
    while True:
        try:
            body = chunks.recv_bytes()
        except EOFError:
            return
        # The write that woke this process often placed it on the event loop's core, where it would preempt the
        # loop for its whole chunk (2-3 ms in which no other request moves, often the loop's next chunk for the
        # other worker). Yielding once hands the core back; the loop returns to epoll within microseconds.
        os.sched_yield()
        version, specs, tokens, clock, max_event_bytes, skew, age = pickle.loads(body)  # noqa: S301 - the parent's
        now, max_skew = datetime.fromtimestamp(clock, UTC), timedelta(seconds=skew)
        max_age = timedelta(seconds=age) if age else None
        answer = _check_chunk(version, specs, tokens, now, max_event_bytes, max_skew, max_age)
        try:
            answers.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except BrokenPipeError:
            return


def _check_chunk(
    version: int,
    specs: bytes | None,
    tokens: list[object],
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
    max_age: timedelta | None,
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
        _flatten(
            check_event(
                token, _worker_ring, now=now, max_event_bytes=max_event_bytes, max_skew=max_skew, max_age=max_age
            )
        )
        for token in tokens
    ]


def _stop(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


def _check_here(
    tokens: Sequence[object],
    keys: KeyRing,
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
    max_age: timedelta | None,
) -> list[Verified | Rejected]:
    return [
        check_event(token, keys, now=now, max_event_bytes=max_event_bytes, max_skew=max_skew, max_age=max_age)
        for token in tokens
    ]


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


def _self_test() -> None:
    """Check one event signed with a throwaway key before reporting ready: a worker that cannot verify never takes
    a chunk (it ends, and the pool reports it did not start), and the first requests after a start do not pay
    for the check path's first run (imports and caches warmed on first use)."""
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    payload = {
        "v": 1,
        "event_id": "00000000-0000-4000-8000-000000000001",
        "type": "tool.invocation",
        "occurred_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "emitter": "self-test",
        "tenant": "self-test",
        "seq": 1,
        "prev_hash": ZERO_HASH,
        "delegation": {"sub": "user@self-test", "act": {"sub": "agent"}},
        "credential": {"id": "tok", "kind": "agent_token", "client_id": "agent", "scopes": ["read"]},
        "tool": {"name": "read", "server": "self-test"},
        "resource": {"type": "record", "id": "1", "tenant": "self-test"},
        "decision": {"result": "allow", "required_scope": "read", "policy": "default"},
        "outcome": "success",
    }
    ring = KeyRing()
    ring.load_specs([("self-test-k1", "self-test", "self-test", public_jwk(key, "self-test-k1"), None)], 1)
    token = sign_compact(canonicalize(payload), key, "self-test-k1")
    result = check_event(token, ring, now=now, max_event_bytes=65536, max_skew=timedelta(minutes=5))
    if not isinstance(result, Verified):
        raise RuntimeError(f"verifier self-test failed: {result}")
