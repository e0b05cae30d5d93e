"""Helper processes (signature verifiers, the lake writer) end when the server does, even after a kill -9; and so
do the servers a command starts (the demo's), whatever signal stops it.

A command stops on SIGTERM, SIGINT and SIGHUP alike (``stop_on_signals``: each raises ``KeyboardInterrupt``, so
its ``finally`` blocks stop what it started). A parent passes its pid in ``CUSTODY_PARENT_PID``
(``child_environment``); every ``custody`` command checks it (``watch_parent``) and stops as on SIGTERM once that
parent is gone, so no orphan keeps a port or a data dir's lock. A child that is not a custody command (Streamlit)
gets ``PR_SET_PDEATHSIG`` from a parent that starts it from its main thread (``die_with_parent``).

A child process outlives its parent by default: after ``kill -9`` of ``custody serve``, its verifier and lake-writer
processes kept running, about 190 MB each, and a restarted server started new ones beside them. ``PR_SET_PDEATHSIG``
would signal a child when the *thread* that started it ends, which is not the same thing; so the lake writer
watches its parent instead and exits within a second of the parent being gone. (The verifiers need no watcher:
they read their chunks from a pipe only the server holds open, and end at its EOF.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

__all__ = [
    "STOP_SIGNALS",
    "child_environment",
    "die_with_parent",
    "exit_with_parent",
    "name_process",
    "stop_on_signals",
    "watch_parent",
]

_CHECK_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PARENT_VARIABLE = "CUSTODY_PARENT_PID"


def exit_with_parent() -> None:
    """Called first thing in a helper process: a daemon thread ends the process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_CHECK_SECONDS)
            if os.getppid() != parent:  # re-parented: the server died without stopping us
                os._exit(0)

    threading.Thread(target=watch, name="custody-parent-watch", daemon=True).start()


def name_process(name: str) -> None:
    """Give this process a name that ``ps -o comm``, ``top`` and /proc/<pid>/comm show (Linux; at most 15 bytes),
    so an operator can tell the helpers apart: they all run ``python -c 'from multiprocessing.spawn ...'``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: the name is a convenience


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, as SIGINT does."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler)


def child_environment(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must stop when this process is gone."""
    return {**(os.environ if environment is None else environment), PARENT_VARIABLE: str(os.getpid())}


def watch_parent(stop: Callable[[], None] | None = None) -> None:
    """When started by a Custody process (``CUSTODY_PARENT_PID``): once that parent is gone, stop as on SIGTERM
    (or call ``stop``)."""
    value = os.environ.get(PARENT_VARIABLE)
    if not value or not value.isdigit():
        return
    parent = int(value)

    def gone() -> bool:
        return os.getppid() != parent

    def watch() -> None:
        while not gone():
            time.sleep(_CHECK_SECONDS / 2)
        if stop is not None:
            stop()
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    if gone():  # the parent died before this process got here
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=watch, name="custody-parent-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1
_libc: Callable[..., int] | None = None
with contextlib.suppress(OSError, AttributeError, TypeError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl


def die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)`` of a child that is not a Custody command (Streamlit): the kernel
    sends it SIGTERM when the process that started it ends (Linux; the parent must start it from the thread that
    lives as long as it does, its main thread). Only an already-resolved C call runs between fork and exec."""
    if _libc is not None:
        _libc(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
