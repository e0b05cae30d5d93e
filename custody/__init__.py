"""Custody: a delegation-chain audit log and forensics service for AI agents.

This package is only the composition root: the ``custody`` command, which wires the layers ``ingest``,
``store``, ``query`` and ``dashboard`` together. Logic lives in those packages.
"""

__version__ = "0.1.0"
