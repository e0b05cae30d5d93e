"""GET /metrics: what the issue pins (events by status and error code, the ack latency histogram, unflushed events,
flush lag), read back as Prometheus text after real requests."""

from __future__ import annotations

import re

from tests.conftest import Harness
from tests.signing import chain


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text; fails when it is missing."""
    selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, metrics, re.MULTILINE)
    assert match, f"no sample {name} {labels} in:\n{metrics}"
    return float(match.group(1))


def test_events_are_counted_by_status_and_code_and_acks_are_timed(harness: Harness) -> None:
    key, kid = harness.register("gw-1")
    tokens, _ = chain("gw-1", 6, key, kid)
    harness.post(tokens[:3])
    harness.post(tokens[:2])  # both again: duplicates
    harness.post([tokens[4], tokens[5]])  # seq 5 after head 3: a gap, then seq 6 after a rejected event
    metrics = harness.client.get("/metrics").text

    assert sample(metrics, "custody_events_total", status="accepted", error="") == 3
    assert sample(metrics, "custody_events_total", status="duplicate", error="") == 2
    assert sample(metrics, "custody_events_total", status="rejected", error="chain_gap") == 1
    assert sample(metrics, "custody_events_total", status="rejected", error="after_rejected") == 1
    assert sample(metrics, "custody_ack_latency_seconds_count") == 3
    assert sample(metrics, "custody_ack_latency_seconds_bucket", le="+Inf") == 3
    assert sample(metrics, "custody_unflushed_events") >= 3  # the 3 accepted (admin changes are events too)
    assert sample(metrics, "custody_flush_lag_seconds") > 0

    harness.flush()
    metrics = harness.client.get("/metrics").text
    assert sample(metrics, "custody_unflushed_events") == 0
    assert sample(metrics, "custody_flush_lag_seconds") == 0
