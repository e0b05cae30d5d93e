"""Run the ingest API under uvicorn. Recovery happens in the app's lifespan, before the port takes traffic;
SIGTERM and Ctrl-C stop accepting, finish requests in flight, and flush the WAL into the lake."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import uvicorn

from ingest.app import create_app
from ingest.server import IngestServer
from ingest.service import Limits

__all__ = ["serve"]


def serve(
    data_dir: Path,
    admin_token: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    limits: Limits | None = None,
    flush_interval: float = 1.0,
    verify_workers: int = 0,
) -> None:
    try:
        server = IngestServer(
            data_dir, admin_token, limits=limits, flush_interval=flush_interval, verify_workers=verify_workers
        )
    except ValueError as exc:
        from store.errors import CustodyError

        raise CustodyError(str(exc)) from exc
    app = create_app(server)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=30,
        limit_concurrency=256,
        # Custody records no client addresses, so it has no use for X-Forwarded-For; uvicorn would rewrite every
        # request's client address from it (trusting 127.0.0.1) in a middleware of its own.
        proxy_headers=False,
    )
    logging.getLogger(__name__).info("custody ingest on http://%s:%d, data in %s", host, port, data_dir)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (flushing the WAL in the lifespan), then re-raises the signal
    # with the previous handler in place. This handler makes that final step a clean exit 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    uvicorn.Server(config).run()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
