"""Reading the lake, by job: forensics (``search``, ``paths``, ``blast``, ``findings``, ``overview``), derived
indexes (``index``), verification (``verify``), access recertification (``recert``) and the read API (``api``,
``tokens``)."""

import os

# Set before anything here imports Polars (query.verify.chains, query.index.tree_index), which appends it to its
# own allocator settings. Polars has jemalloc hand freed pages back to the kernel after a second, and
# hash-and-chain verification frees and refills hundreds of MB per row group, so most pages were faulted in again
# (see the changelog for the figures). A 60 s decay keeps them for the run and still returns them after it. An
# operator's own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:60000,muzzy_decay_ms:60000")

from query.verify.integrity import verify_lake
from query.verify.report import IntegrityProblem, IntegrityReport

__all__ = ["IntegrityProblem", "IntegrityReport", "verify_lake"]
