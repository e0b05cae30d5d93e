"""Reading the lake: search, delegation paths, blast radius, findings, integrity verification and reports."""

import os

# Set before anything here imports Polars (query.verify.chains, query.tree_index), which appends it to its own allocator
# settings. Polars has jemalloc hand freed pages back to the kernel after 0.5-1 s; hash-and-chain verification
# frees and refills about 500 MB per row group, so most pages were faulted in again: 7-9 s of system time per 10M
# events. A 60 s decay keeps them for the run (system time 1.7 s) and still returns them after it. An operator's
# own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:60000,muzzy_decay_ms:60000")

from query.verify.integrity import verify_lake
from query.verify.report import IntegrityProblem, IntegrityReport

__all__ = ["IntegrityProblem", "IntegrityReport", "verify_lake"]
