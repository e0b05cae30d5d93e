"""Helper processes (signature verifiers, the lake writer) end when the server does, even after a kill -9.

A child process outlives its parent by default: after ``kill -9`` of ``custody serve``, its verifier and lake-writer
processes kept running, about 190 MB each, and a restarted server started new ones beside them. ``PR_SET_PDEATHSIG``
would signal a child when the *thread* that started it ends, which is not the same thing; so each helper watches
its parent instead and exits within a second of the parent being gone.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]

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
