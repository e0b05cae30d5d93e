"""Serving Custody's HTTP APIs (``custody serve``, ``custody serve-query``) to a network that may be hostile.

uvicorn alone times out nothing before a request is whole, and its ``limit_concurrency`` counts open connections:
260 sockets that never sent a byte answered every later request with 503, for as long as they were held. Here:

- ``DeadlineProtocol``: a connection must deliver a request's headers within ``header_timeout`` seconds of
  connecting (or of its previous response), and its body within ``body_timeout`` seconds of the headers; otherwise
  it gets ``408 request_timeout`` and is closed. Idle keep-alive connections close after ``keep_alive`` seconds.
- ``RequestLimit``: at most ``max_requests`` requests are processed at once. A request counts from the moment its
  body is whole until its response is sent, so connections that are still sending (or sending nothing) never take
  a place from a client whose request is ready; one over the limit gets ``503 overloaded`` with ``Retry-After``.

Open connections themselves are bounded by the file descriptors the process may hold (raised to the hard limit
at start) and by the deadlines, which close a slow one within seconds. docs/operations.md has the defaults and how
to run behind a reverse proxy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from custody.stopping import GRACE, Server
from ingest.app import create_app
from ingest.server import Companion, IngestServer
from ingest.service import Limits
from ingest.witness import WitnessEndpoint
from store.ground.envelope import envelope

if TYPE_CHECKING:
    from query.detect.alerts import AlertChannels
    from query.detect.loop import DetectionLoop
    from query.findings import RuleBook

__all__ = [
    "DeadlineProtocol",
    "Detection",
    "HttpLimits",
    "RequestLimit",
    "serve_ingest",
    "serve_query",
    "uvicorn_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0  # seconds from connect (or the last response) to a request's last header
    body_timeout: float = 30.0  # seconds from the headers to the body's last byte (8 MiB at 280 KB/s)
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_requests: int = 256  # requests processed at once (body received, response not yet sent)
    max_buffered_body: int = 8 * 1024 * 1024 + 1  # what RequestLimit reads ahead; a longer body streams on


def serve_ingest(
    data_dir: Path,
    admin_token: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    limits: Limits | None = None,
    http: HttpLimits | None = None,
    flush_interval: float = 1.0,
    verify_workers: int = 0,
    witnesses: Sequence[WitnessEndpoint] = (),
    witness_quorum: int = 0,
    detect: bool = True,
    alerts: Path | None = None,
    rules: RuleBook | None = None,
    iceberg: bool = False,
    state: str | None = None,
) -> None:
    """Run the ingest API. Recovery happens in the app's lifespan, before the port takes traffic; SIGTERM and
    Ctrl-C stop accepting, finish requests in flight, and flush the WAL into the lake. With ``detect``, continuous
    detection runs beside it (query.detect.loop), alerting through the channels of ``alerts``."""
    companions: list[Companion] = []
    if detect:
        from query.detect.alerts import load_channels

        try:
            channels = load_channels(alerts) if alerts is not None else None
        except ValueError as exc:
            from store.ground.errors import CustodyError

            raise CustodyError(f"--alerts: {exc}") from exc
        companions.append(Detection(data_dir, channels, rules))
    if iceberg:
        # one node of several: the Iceberg catalog lives in the cluster's PostgreSQL (a SQL catalog there)
        companions.append(IcebergSync(data_dir, catalog_uri=sqlalchemy_uri(state) if state else None))
    try:
        server = IngestServer(
            data_dir,
            admin_token,
            limits=limits,
            flush_interval=flush_interval,
            verify_workers=verify_workers,
            witnesses=witnesses,
            witness_quorum=witness_quorum,
            companions=companions,
            state=state,
        )
    except ValueError as exc:
        from store.ground.errors import CustodyError

        raise CustodyError(str(exc)) from exc
    config = uvicorn_config(create_app(server), host=host, port=port, limits=http or HttpLimits())
    log.info("custody ingest on http://%s:%d, data in %s", host, port, data_dir)
    # SIGTERM, SIGINT and SIGHUP: stop accepting, finish requests in flight, flush the WAL in the lifespan, exit 0
    Server(config).run()


def sqlalchemy_uri(dsn: str) -> str:
    """The SQLAlchemy URI of a PostgreSQL connection string (psycopg 3's dialect)."""
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


class Detection:
    """Continuous detection as a companion of the ingest server: its loop starts once the server is open and
    records each finding's changes in the server's signed stream."""

    def __init__(self, data_dir: Path, channels: AlertChannels | None, rules: RuleBook | None = None) -> None:
        self.data_dir, self.channels, self.rules = data_dir, channels, rules
        self.loop: DetectionLoop | None = None
        self.server: IngestServer

    def start(self, server: IngestServer) -> None:
        from store.cluster import ClusterStore

        self.server = server
        server.store.flush_listeners.append(self._wake)  # a round as soon as new events are in the lake
        if isinstance(server.store, ClusterStore):  # one node of several: detection runs where the lake is written
            server.store.lead_listeners.append(self._lead)
        else:
            self._lead(True)

    def _lead(self, leading: bool) -> None:
        from query.detect.loop import DetectionLoop

        if not leading:
            self.stop()
            return
        self.loop = DetectionLoop(
            self.data_dir, channels=self.channels, settings=self.rules, record=self.server.registry.record_findings
        )
        self.loop.start()

    def _wake(self) -> None:
        if self.loop is not None:
            self.loop.wake()

    def stop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.stop()


class IcebergSync:
    """The lake kept as an Iceberg table beside it (query.iceberg): a sync after every flush that wrote events, one
    snapshot each, in a thread of its own."""

    def __init__(self, data_dir: Path, catalog_uri: str | None = None, warehouse: str | None = None) -> None:
        self.data_dir, self.catalog_uri, self.warehouse = data_dir, catalog_uri, warehouse
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, server: IngestServer) -> None:
        from query.iceberg import IcebergMirror

        mirror = IcebergMirror(self.data_dir, catalog_uri=self.catalog_uri, warehouse=self.warehouse)
        server.store.flush_listeners.append(self._wake.set)
        self._thread = threading.Thread(target=self._run, args=(mirror,), name="custody-iceberg", daemon=True)
        self._thread.start()

    def _run(self, mirror: Any) -> None:
        while not self._stop.is_set():
            try:
                synced = mirror.sync()
                if synced.appended:
                    log.info("iceberg: %d events, up to log index %d", synced.appended, synced.log_index_max)
            except Exception:  # the next flush retries; the lake stays the truth
                log.exception("iceberg sync failed; the next flush retries")
            self._wake.wait(30.0)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def serve_query(app: ASGIApp, *, host: str, port: int, http: HttpLimits | None = None) -> None:
    """Run the read API."""
    Server(uvicorn_config(app, host=host, port=port, limits=http or HttpLimits())).run()


def uvicorn_config(app: ASGIApp, *, host: str, port: int, limits: HttpLimits) -> uvicorn.Config:
    """A uvicorn config serving ``app`` with ``limits``, as every Custody HTTP face runs: info log without an access
    log, a grace of ``GRACE`` seconds for requests in flight when it stops, and no X-Forwarded-For (Custody records no
    client addresses; uvicorn would rewrite every request's client address from it, trusting 127.0.0.1)."""
    _raise_open_files_limit()
    return uvicorn.Config(
        RequestLimit(app, limits.max_requests, limits.max_buffered_body),
        host=host,
        port=port,
        http=_protocol(limits),
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        log_level="info",
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACE,
    )


def _protocol(limits: HttpLimits) -> type[DeadlineProtocol]:
    class Configured(DeadlineProtocol):
        header_timeout = limits.header_timeout
        body_timeout = limits.body_timeout

    return Configured


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for the headers and one for the body of every request.

    A deadline is a number on the connection, set and cleared as a request's parts arrive; one sweep a quarter of a
    second over the open connections closes the late ones. (A timer armed and cancelled per request part cost the
    event loop measurably at thousands of requests a second.)"""

    header_timeout = HttpLimits.header_timeout
    body_timeout = HttpLimits.body_timeout

    _deadline = math.inf  # loop time by which the part below must have arrived
    _part = ""
    _seconds = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _watch(self)
        self._arm(self.header_timeout, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline == math.inf:  # a keep-alive connection's next request
            self._arm(self.header_timeout, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout, "body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._deadline = math.inf

    def connection_lost(self, exc: Exception | None) -> None:
        _WATCHED.discard(self)
        super().connection_lost(exc)

    def _arm(self, seconds: float, part: str) -> None:
        self._deadline, self._part, self._seconds = self.loop.time() + seconds, part, seconds

    def expire(self) -> None:
        """Answer 408 where no response has started, then close; a request waiting for its body sees a
        disconnect, so nothing of it is processed."""
        self._deadline = math.inf
        _WATCHED.discard(self)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answering = cycle is None or cycle.response_complete or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if answering:
            message = f"the request's {self._part} did not arrive within {self._seconds:g} s"
            body = orjson.dumps(envelope("request_timeout", message))
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()


_SWEEP_SECONDS = 0.25
_WATCHED: set[DeadlineProtocol] = set()  # open connections of this process's one event loop
_sweeping: list[asyncio.TimerHandle] = []


def _watch(protocol: DeadlineProtocol) -> None:
    _WATCHED.add(protocol)
    if not _sweeping:
        _sweeping.append(protocol.loop.call_later(_SWEEP_SECONDS, _sweep, protocol.loop))


def _sweep(loop: asyncio.AbstractEventLoop) -> None:
    _sweeping.clear()
    now = loop.time()
    for protocol in [p for p in _WATCHED if p._deadline <= now]:
        protocol.expire()
    if _WATCHED:
        _sweeping.append(loop.call_later(_SWEEP_SECONDS, _sweep, loop))


class RequestLimit:
    """At most ``max_requests`` requests in work at once, counted from a whole body to the response's end."""

    def __init__(self, app: ASGIApp, max_requests: int, max_buffered_body: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.max_buffered_body = max_buffered_body
        self.in_work = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        size = 0
        while size <= self.max_buffered_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the body never came (a deadline closed the connection): nothing to process
            received.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if self.in_work >= self.max_requests:
            await _overloaded(send, self.max_requests)
            return
        self.in_work += 1
        try:
            await self.app(scope, _replay(received, receive), send)
        finally:
            self.in_work -= 1


def _replay(received: list[Message], receive: Receive) -> Callable[[], Awaitable[Message]]:
    """``receive`` for the app: the messages read ahead, then the connection's own."""
    pending = list(received)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _overloaded(send: Send, limit: int) -> None:
    body = orjson.dumps(envelope("overloaded", f"{limit} requests are in work already; retry in a second"))
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _raise_open_files_limit() -> None:
    """Every open connection is a file descriptor: take all the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit: %s", exc)
