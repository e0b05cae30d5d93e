"""Verification: is the lake what the emitters signed, whole and in order? Its own package, because it grows
with the transparency log.

``integrity`` (the full check: hashes, signatures, columns, partitions, chains; one event), ``chains`` (hashes
and chains column-at-a-time), ``checkpoint`` (incremental runs and the last run's record) and ``report``
(problems and the report they make up).
"""

from query.verify.integrity import verify_event, verify_lake
from query.verify.report import IntegrityProblem, IntegrityReport

__all__ = ["IntegrityProblem", "IntegrityReport", "verify_event", "verify_lake"]
