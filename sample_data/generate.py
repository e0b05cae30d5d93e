"""The demo organisation, generated: thirty days of work with incidents planted in it, seeded and deterministic.

``generate(seed, end)`` returns every event as ``(emitter, fields)`` in time order (fields as ``Emitter.emit`` takes
them) and the answer key of the planted incidents. The same seed and end give the same events, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sample_data.activity import Workload, work_days
from sample_data.incidents import plant

__all__ = ["Generated", "generate"]


@dataclass
class Generated:
    seed: int
    start: datetime
    end: datetime
    events: list[tuple[str, dict[str, Any]]]
    answer_key: dict[str, Any] = field(default_factory=dict)


def generate(seed: int = 7, *, end: datetime, days: int = 30, tasks_per_day: int = 1850) -> Generated:
    """The organisation's last ``days`` days up to ``end``: about 8 events per task (250k with the defaults)."""
    end = end.astimezone(UTC).replace(microsecond=0)
    start = end - timedelta(days=days)
    work = Workload(seed)
    work_days(work, start, end, tasks_per_day)
    answer_key = plant(work, start, end)
    return Generated(seed, start, end, work.events(), answer_key)
