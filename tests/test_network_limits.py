"""The network cannot exhaust the servers: idle and slow connections neither lock clients out nor stay for ever.

Against real ``custody serve`` and ``custody serve-query`` processes: 1,000 connections are held open, sending
nothing, part of their headers, or their headers and one byte of a body. A well-behaved client is served all the
while, and the deadlines close every held connection with a 408.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from custody.serving import RequestLimit
from tests.conftest import ADMIN, REPO, ServerProcess, free_port
from tests.signing import chain

pytestmark = pytest.mark.slow

HELD = 1000


def hold_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections in three kinds of stall."""
    held = []
    for number in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if number % 3 == 1:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        elif number % 3 == 2:
            sock.sendall(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )  # one byte of a 100-byte body
        held.append(sock)
    return held


def whole_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read to its last byte."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def closed_with_408(sock: socket.socket, timeout: float) -> bool:
    """Whether the server answers 408 and closes ``sock`` within ``timeout`` seconds."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return False
    finally:
        sock.close()
    return received.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in received


@pytest.fixture
def ingest_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        "--header-timeout",
        "3",
        "--body-timeout",
        "3",
        "--max-requests",
        "8",
    ).start()
    yield server
    server.stop()


def test_held_connections_lock_no_client_out_of_the_ingest_api(ingest_server: ServerProcess) -> None:
    key, kid = _register(ingest_server.url)
    tokens, _ = chain("gw-1", 3, key, kid)
    held = hold_connections(ingest_server.port, HELD)
    try:
        with httpx.Client(base_url=ingest_server.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/metrics").status_code == 200
            assert client.get("/v1/emitters", headers=ADMIN).status_code == 200
            body = client.post("/v1/events", json={"events": tokens}).json()
            assert [result["status"] for result in body["results"]] == ["accepted"] * 3
        # Every held connection is answered 408 and closed by its deadline (3 s; generous bound for slow machines).
        assert all(closed_with_408(sock, timeout=60) for sock in held)
    finally:
        for sock in held:
            sock.close()
    with httpx.Client(base_url=ingest_server.url, timeout=10) as client:
        assert client.get("/v1/emitters/gw-1/head", headers=ADMIN).json()["seq"] == 3  # the stalled POSTs: nothing


def test_a_keep_alive_connection_must_send_its_next_request_in_time(ingest_server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", ingest_server.port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(30)
    first = whole_response(sock)  # all of it: its body can come in a segment of its own
    assert first.startswith(b"HTTP/1.1 200 ")
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request starts, and stalls
    assert closed_with_408(sock, timeout=60)


def test_held_connections_lock_no_client_out_of_the_read_api(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "lake" / "events").mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "CUSTODY_READ_TOKENS": "open"}
    command = [sys.executable, "-m", "custody.cli", "serve-query", "--data-dir", str(data), "--port", str(port)]
    command += ["--header-timeout", "3", "--body-timeout", "3"]
    with (tmp_path / "api.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", tmp_path / "api.log")
        held = hold_connections(port, HELD)
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
            assert all(closed_with_408(sock, timeout=60) for sock in held[:30])
        finally:
            for sock in held:
                sock.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_requests_over_the_limit_get_503_only_once_their_body_is_whole() -> None:
    """The limit counts requests in work: one waiting for its body takes no place."""
    release = asyncio.Event()
    started: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        started.append(message["body"].decode())
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = RequestLimit(app, max_requests=1, max_buffered_body=1024)
    sent: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "slow": []}

    def request(name: str, body_arrives: asyncio.Event | None = None) -> Any:
        async def receive() -> dict[str, Any]:
            if body_arrives is not None:
                await body_arrives.wait()
            return {"type": "http.request", "body": name.encode(), "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent[name].append(message)

        return limited({"type": "http"}, receive, send)

    async def scenario() -> None:
        slow_body = asyncio.Event()
        slow = asyncio.create_task(request("slow", slow_body))  # still sending: holds no place
        first = asyncio.create_task(request("a"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert started == ["a"]
        await request("b")  # a is in work: b is refused at once
        assert sent["b"][0]["status"] == 503
        assert (b"retry-after", b"1") in sent["b"][0]["headers"]
        assert b'"overloaded"' in sent["b"][1]["body"]
        release.set()
        await first
        slow_body.set()
        await slow  # a has finished: the slow request, whole now, is served
        assert [message.get("status") for message in sent["slow"]] == [200, None]

    asyncio.run(scenario())


def _register(url: str) -> tuple[Any, str]:
    from ingest.sdk import generate_key, public_jwk

    key = generate_key()
    response = httpx.put(
        f"{url}/v1/emitters/gw-1",
        json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, "gw-1-k1")]},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    return key, "gw-1-k1"


def _wait_healthy(url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
