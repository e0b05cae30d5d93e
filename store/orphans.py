"""Helper processes (signature verifiers, the lake writer) end when the server does, even after a kill -9.

A child process outlives its parent by default: after ``kill -9`` of ``custody serve``, its verifier and lake-writer
processes kept running, about 190 MB each, and a restarted server started new ones beside them. ``PR_SET_PDEATHSIG``
would signal a child when the *thread* that started it ends, which is not the same thing; so the lake writer
watches its parent instead and exits within a second of the parent being gone. (The verifiers need no watcher:
they read their chunks from a pipe only the server holds open, and end at its EOF.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

__all__ = ["exit_with_parent", "name_process"]

_CHECK_SECONDS = 0.5


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
