"""What verification reports: problems, each under its emitter's tenant, and the report they make up.

Shared by the full verification (``query.verify.integrity``) and the column-at-a-time one
(``query.verify.chains``), which both also compare the streams' ends with the heads the server recorded
(``compare_heads``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from store.ground.layout import DataDir
from store.state import StateDB

__all__ = ["LOG_CHECKS", "IntegrityProblem", "IntegrityReport", "attributed", "compare_heads"]

# The transparency log's checks (query.verify.log): about the whole log, no emitter's or tenant's events
LOG_CHECKS = frozenset(
    {
        "log_missing",
        "log_duplicate",
        "log_leaf",
        "log_root",
        "checkpoint_missing",
        "checkpoint_signature",
        "history_root",
    }
)


@dataclass(frozen=True)
class IntegrityProblem:
    check: str
    expected: str
    actual: str
    emitter: str | None = None
    seq: int | None = None
    event_id: str | None = None
    file: str | None = None
    tenant: str | None = None

    def describe(self) -> str:
        where = f"{self.emitter} seq {self.seq}" if self.emitter else "lake"
        ident = f" event {self.event_id}" if self.event_id else ""
        origin = f" ({self.file})" if self.file else ""
        return f"{where}{ident}{origin}: {self.check}: expected {self.expected}, found {self.actual}"


@dataclass
class IntegrityReport:
    events: int = 0
    emitters: dict[str, int] = field(default_factory=dict)
    # emitter -> tenant: the one it is registered to (the server's signed stream), else its rows' partition. A
    # problem belongs to its emitter's tenant, never to the partition a row was found in (a row moved into another
    # tenant's partition must not show that tenant's auditor another tenant's event).
    tenants: dict[str, str] = field(default_factory=dict)
    problems: list[IntegrityProblem] = field(default_factory=list)
    log: dict[str, Any] | None = None  # the transparency-log check's summary (query.verify.log), when it ran

    @property
    def ok(self) -> bool:
        return not self.problems

    def for_tenant(self, tenant: str | None) -> IntegrityReport:
        """What a caller bound to ``tenant`` sees: its emitters' counts and problems (all, for None)."""
        if tenant is None:
            return self
        emitters = {e: n for e, n in self.emitters.items() if self.tenants.get(e) == tenant}
        return IntegrityReport(
            events=sum(emitters.values()),
            emitters=emitters,
            tenants={e: t for e, t in self.tenants.items() if t == tenant},
            # the log's own problems belong to no tenant (a hole does not say whose event is gone): a
            # tenant-bound view leaves them out, as it leaves out every other tenant's; see docs/transparency.md
            problems=[problem for problem in self.problems if problem.tenant == tenant],
            log=None,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": sum(self.emitters.values()),
            "emitters": self.emitters,
            "problems": [{**asdict(problem), "description": problem.describe()} for problem in self.problems],
            "log": self.log,
        }


def compare_heads(data_dir: Path, last_seqs: dict[str, int], tenants: dict[str, str]) -> list[IntegrityProblem]:
    """Streams that end before the head the server recorded (truncation of the newest events)."""
    layout = DataDir(data_dir)
    path = layout.state_db
    if path.exists():
        state = StateDB(path)
        try:
            heads = {emitter: head.seq for emitter, head in state.heads().items()}
            registered = {emitter: record.tenant for emitter, record in state.emitters().items()}
        finally:
            state.close()
    elif layout.lake_heads.exists():  # a cluster's (store.cluster): its leader's heads as of the lake
        recorded = orjson.loads(layout.lake_heads.read_bytes())
        heads = {str(emitter): int(head["seq"]) for emitter, head in recorded.items()}
        registered = {str(emitter): str(head["tenant"]) for emitter, head in recorded.items()}
    else:
        return []
    problems = []
    for emitter, head_seq in sorted(heads.items()):
        found = last_seqs.get(emitter, 0)
        if found < head_seq:
            problems.append(
                IntegrityProblem(
                    "stream_end",
                    f"events up to seq {head_seq} (the server's head)",
                    f"events up to seq {found}",
                    emitter=emitter,
                    seq=found + 1,
                    tenant=tenants.get(emitter) or registered.get(emitter),
                )
            )
    return problems


def attributed(problems: list[IntegrityProblem], tenants: dict[str, str]) -> list[IntegrityProblem]:
    """Each problem under its emitter's tenant."""
    return [
        replace(problem, tenant=tenants[problem.emitter]) if problem.emitter in tenants else problem
        for problem in problems
    ]
