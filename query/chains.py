"""Hash-and-chain verification at DuckDB speed: the check to run often, on the whole lake.

One query recomputes every event's SHA-256 from the payload bytes inside its ``jws`` (base64url-decoded by
DuckDB) and walks each emitter's chain with window functions: seq continuity and ``prev_hash`` against the
previous event's recomputed hash. Payloads are signed in canonical form by the SDK, so the bytes hash to the
event hash; the rare row that does not (an emitter that signs non-canonical JSON) is re-checked in Python with
the RFC 8785 canonicalizer before it is reported. Signatures and typed columns are ``verify_lake``'s job.
"""

from __future__ import annotations

import base64
from pathlib import Path

import orjson

from query.integrity import IntegrityProblem, IntegrityReport, compare_heads
from query.lake import LakeReader
from store.canonical import ZERO_HASH, canonicalize, event_hash
from store.errors import CanonicalizationError

__all__ = ["verify_chains"]

_CHECK = """
WITH recomputed AS (
    SELECT emitter, seq, event_id, tenant, event_hash, prev_hash, jws, filename,
           sha256(from_base64(rpad(replace(replace(split_part(jws, '.', 2), '-', '+'), '_', '/'),
                  CAST(ceil(length(split_part(jws, '.', 2)) / 4) * 4 AS INTEGER), '='))) AS computed
    FROM read_parquet($files, hive_partitioning = true, filename = true)
),
linked AS (
    SELECT *, lag(computed) OVER w AS previous_hash, lag(seq) OVER w AS previous_seq
    FROM recomputed WINDOW w AS (PARTITION BY emitter ORDER BY seq)
)
SELECT emitter, seq, event_id, tenant, event_hash, prev_hash, computed, previous_hash, previous_seq, filename,
       CASE WHEN computed <> event_hash THEN jws END AS jws
FROM linked
WHERE computed <> event_hash
   OR seq <> coalesce(previous_seq, 0) + 1
   OR prev_hash <> coalesce(previous_hash, $zero)
ORDER BY emitter, seq
"""


def verify_chains(data_dir: Path) -> IntegrityReport:
    report = IntegrityReport()
    reader = LakeReader(data_dir)
    files = [str(path) for path in reader.files()]
    if not files:
        return report
    with reader.connect() as connection:
        counts = connection.execute("SELECT emitter, max(seq), count(*), any_value(tenant) FROM all_events GROUP BY 1")
        for emitter, last, events, tenant in counts.fetchall():
            report.emitters[emitter] = last
            report.tenants[emitter] = tenant
            report.events += events
        suspects = connection.execute(_CHECK, {"files": files, "zero": ZERO_HASH}).fetchall()
    canonical: dict[tuple[str, int], str] = {}
    for (
        emitter,
        seq,
        event_id,
        tenant,
        stored,
        prev_hash,
        computed,
        previous_hash,
        previous_seq,
        filename,
        jws,
    ) in suspects:
        where = {
            "emitter": emitter,
            "seq": seq,
            "event_id": event_id,
            "tenant": tenant,
            "file": filename.split("/lake/events/", 1)[-1],
        }
        if jws is not None:
            computed = _canonical_hash(jws) or computed
            canonical[(emitter, seq)] = computed
            if computed != stored:
                report.problems.append(IntegrityProblem("event_hash", computed, stored, **where))
        if seq != (previous_seq or 0) + 1:
            report.problems.append(
                IntegrityProblem("chain_seq", f"seq {(previous_seq or 0) + 1}", f"seq {seq}", **where)
            )
            continue
        expected = canonical.get((emitter, previous_seq), previous_hash) if previous_seq else ZERO_HASH
        if prev_hash != expected:
            report.problems.append(
                IntegrityProblem("chain_link", f"prev_hash {expected}", f"prev_hash {prev_hash}", **where)
            )
    report.problems.extend(compare_heads(data_dir, report.emitters, report.tenants))
    return report


def _canonical_hash(jws: str) -> str | None:
    """The RFC 8785 hash of a payload that is not in canonical form (None if it does not even parse)."""
    try:
        part = jws.split(".")[1]
        return event_hash(canonicalize(orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))))
    except (IndexError, ValueError, CanonicalizationError):
        return None
