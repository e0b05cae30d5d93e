"""The emitter SDK against a real (in-process) server: retries, head recovery, threads, rejections."""

from __future__ import annotations

import threading

import httpx
import pytest

from ingest.sdk import Emitter, EventsRejected
from store.ground.errors import CanonicalizationError
from tests.conftest import Harness, invocation, read_lake

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL


class LoseFirstResponses(httpx.BaseTransport):
    """Deliver each request to the server, but lose the first ``count`` responses (a timeout after the write)."""

    def __init__(self, inner: httpx.BaseTransport, count: int) -> None:
        self.inner = inner
        self.count = count
        self.delivered = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.inner.handle_request(request)
        # Starlette's test transport may answer with another HTTP library's response class (httpx2, which mcp
        # brings in): rebuild it as httpx's.
        response = httpx.Response(answer.status_code, headers=list(answer.headers.items()), content=answer.read())
        self.delivered += 1
        if self.count > 0 and request.url.path == "/v1/events":
            self.count -= 1
            raise httpx.ReadTimeout("response lost", request=request)
        return response


def lake_seqs(harness: Harness, emitter: str) -> list[int]:
    harness.flush()
    return [seq for name, seq in read_lake(harness.data_dir, "emitter, seq") if name == emitter]


def test_retry_after_a_lost_response_stores_each_event_once(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    transport = LoseFirstResponses(harness.client._transport, count=2)
    client = httpx.Client(transport=transport, base_url="http://testserver")
    emitter = Emitter("http://testserver", "gw-1", "acme", key, kid, client=client)
    for _ in range(10):
        emitter.emit(**invocation())
    results = emitter.flush()
    assert transport.delivered == 3  # the same batch three times
    assert [r["status"] for r in results] == ["duplicate"] * 10
    assert lake_seqs(harness, "gw-1") == list(range(1, 11))


def test_a_restarted_emitter_recovers_its_head(harness: Harness) -> None:
    first = harness.emitter("gw-1")
    for _ in range(7):
        first.emit(**invocation())
    first.flush()
    again = Emitter("http://testserver", "gw-1", "acme", first.key, first.kid, client=harness.client)
    assert again.recover_head() == first.head
    again.emit(**invocation())
    assert [r["status"] for r in again.flush()] == ["accepted"]
    assert lake_seqs(harness, "gw-1") == list(range(1, 9))


def test_without_recovery_the_chain_is_rejected_then_rechained(harness: Harness) -> None:
    first = harness.emitter("gw-1")
    first.emit(**invocation())
    first.flush()
    naive = Emitter("http://testserver", "gw-1", "acme", first.key, first.kid, client=harness.client)
    naive.emit(**invocation())  # seq 1 again: the server already has a different seq 1
    with pytest.raises(EventsRejected, match="chain_conflict"):
        naive.flush()
    assert [r["status"] for r in naive.flush()] == ["accepted"]
    assert naive.head[0] == 2
    assert lake_seqs(harness, "gw-1") == [1, 2]


def test_a_refused_event_is_dropped_and_the_rest_rechained(harness: Harness) -> None:
    emitter = harness.emitter("gw-1")
    emitter.emit(**invocation())
    bad = emitter.emit(**invocation(outcome="exploded"))
    later = [emitter.emit(**invocation()) for _ in range(3)]
    with pytest.raises(EventsRejected) as caught:
        emitter.flush()
    first = caught.value.results[0]
    assert (first["event_id"], first["error"]) == (bad.event_id, "invalid_payload")
    results = emitter.flush()
    assert [r["event_id"] for r in results] == [event.event_id for event in later]
    assert [r["status"] for r in results] == ["accepted"] * 3
    assert lake_seqs(harness, "gw-1") == [1, 2, 3, 4]


def test_floats_are_refused_before_signing(harness: Harness) -> None:
    emitter = harness.emitter("gw-1")
    with pytest.raises(CanonicalizationError, match="numbers must be integers"):
        emitter.emit(**invocation(attrs={"score": 0.9}))
    assert emitter.head == (0, "0" * 64)


def test_emit_from_many_threads_keeps_one_chain(harness: Harness) -> None:
    emitter = harness.emitter("gw-1", batch_size=37)

    def work() -> None:
        for _ in range(150):
            emitter.emit(**invocation())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emitter.flush()
    assert emitter.head[0] == 600
    assert lake_seqs(harness, "gw-1") == list(range(1, 601))
