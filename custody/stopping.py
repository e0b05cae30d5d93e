"""How every Custody HTTP server stops: on SIGTERM (docker stop, systemd, CI), SIGINT (Ctrl-C) and SIGHUP (a closed
terminal) alike.

``Server``, uvicorn's server, serves every HTTP face (``serve``, ``serve-query``, ``gateway``): each of the three
signals stops accepting, finishes the requests in flight (for at most ``GRACE`` seconds), runs the lifespan's
shutdown (``serve`` flushes its write-ahead log to the lake), and the process exits 0; a second signal stops at
once. What a process started stops with it: ``store.orphans`` (children told by ``CUSTODY_PARENT_PID``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator

import uvicorn

__all__ = ["GRACE", "Server"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE = 5  # seconds a stopping server gives requests in flight, so that a stop takes well under 10 s


class Server(uvicorn.Server):
    """uvicorn's server, stopped gracefully by SIGHUP as by SIGTERM and SIGINT, exiting 0 afterwards (uvicorn
    itself re-raises the signal once it has shut down, which ends the process with the signal's status)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
