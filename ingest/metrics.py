"""Prometheus metrics of one ingest server (a registry of its own, so tests can run several servers)."""

from __future__ import annotations

import collections
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ingest.service import BatchOutcome
from store.engine import FlushStats

__all__ = ["IngestMetrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class IngestMetrics:
    def __init__(self, flush_stats: FlushStats) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "custody_events",
            "Events by result: status accepted/duplicate/rejected, error the rejection code (empty otherwise).",
            ["status", "error"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], Counter] = {}  # labels() looks a child up under a lock; this does not
        self.ack_latency = Histogram(
            "custody_ack_latency_seconds",
            "Time from reading a POST /v1/events body to its durable acknowledgement.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.storage_failures = Counter(
            "custody_storage_failures",
            "Requests answered 503 because the data dir could not persist.",
            registry=self.registry,
        )
        unflushed = Gauge(
            "custody_unflushed_events",
            "Acknowledged events in the write-ahead log, not yet in the Parquet lake.",
            registry=self.registry,
        )
        unflushed.set_function(lambda: flush_stats.unflushed_events)
        lag = Gauge(
            "custody_flush_lag_seconds",
            "Age of the oldest acknowledged event not yet in the Parquet lake (0 when all are flushed).",
            registry=self.registry,
        )
        lag.set_function(flush_stats.lag_seconds)
        quarantined = Gauge(
            "custody_quarantined_events",
            "Acknowledged events the lake could not store, kept in <data-dir>/quarantine (see custody quarantine).",
            registry=self.registry,
        )
        quarantined.set_function(lambda: flush_stats.quarantined_events)

    def watch_index(self, pending: Callable[[], int]) -> None:
        """Export the acknowledged events whose index entries are not yet in SQLite."""
        gauge = Gauge(
            "custody_index_pending_entries",
            "Acknowledged events indexed in memory, not yet in SQLite (grows while SQLite fails).",
            registry=self.registry,
        )
        gauge.set_function(pending)

    def watch_cluster(
        self, transactions: Callable[[], int], log_lock: Callable[[], float], leading: Callable[[], int]
    ) -> None:
        """Export a cluster node's PostgreSQL figures (store.cluster)."""
        for name, help_text, read in (
            ("custody_pg_transactions", "Ingest transactions this node committed in PostgreSQL.", transactions),
            (
                "custody_pg_log_lock_seconds",
                "Seconds this node's transactions held the log's order (the custody_log row), commit included:"
                " the cluster's serial section.",
                log_lock,
            ),
            ("custody_cluster_leader", "1 while this node writes the lake and the log.", leading),
        ):
            gauge = Gauge(name, help_text, registry=self.registry)
            gauge.set_function(read)

    def watch_verifiers(self, running: Callable[[], int]) -> Counter:
        """Export the verifier processes running; returns the counter of replacements to increment."""
        gauge = Gauge(
            "custody_verifier_processes",
            "Signature verifier processes running (0: checks run in the server's threads).",
            registry=self.registry,
        )
        gauge.set_function(running)
        return Counter(
            "custody_verifier_restarts",
            "Verifier processes started to replace one that ended.",
            registry=self.registry,
        )

    def observe(self, outcome: BatchOutcome, seconds: float) -> None:
        """Count a request's events by status and error code, one ``inc`` per distinct pair: ``labels().inc()``
        per event cost 81 us for 20 events, on the event loop."""
        counts = collections.Counter(
            (result.status.value, "" if result.error is None else result.error.value) for result in outcome.results
        )
        for pair, count in counts.items():
            child = self._children.get(pair)
            if child is None:
                child = self._children[pair] = self.events.labels(*pair)
            child.inc(count)
        self.ack_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
