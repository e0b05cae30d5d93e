"""Reading the lake: integrity verification now; forensics (paths, blast radius, findings) to come."""

from query.integrity import IntegrityProblem, IntegrityReport, verify_lake

__all__ = ["IntegrityProblem", "IntegrityReport", "verify_lake"]
