"""Incremental detection: the finding queries of ``query.findings``, run as events reach the lake on a small working
set instead of the whole lake, so the cost of a batch does not grow with the lake.

The working set of a batch is the batch's rows plus the few rows of history each kind needs, kept as state:

- ``action_after_revocation``: every revocation; on a new revocation, the revoked credential's earlier uses
  (read once from the lake);
- ``denied_burst``: the denied calls of the last two burst windows (by the emitters' clocks);
- ``shared_credential``: one row per (credential, client, agent) seen;
- ``borrowed_session``: one row per agent name seen in a delegation chain or as a delegate;
- ``cross_tenant_link``: one row per (tenant, credential) and (tenant, approval); the parents and approvals a
  batch names, read from the lake;
- ``cross_tenant``, ``deep_delegation``, ``scope_escalation``, ``unregistered_tool``: nothing, each event decides.

Running the same SQL on that set gives, for each finding, the evidence the batch adds; the union over batches is
what the on-demand query gives over the whole lake (a test replays the demo organisation both ways). A denied
call that arrives more than two burst windows after calls of its burst (a late backfill) is seen by the on-demand
query only; ``over_privileged`` is run by the loop periodically instead (docs/detection.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from query.findings import KINDS, Finding, FindingSettings, RuleBook, findings
from query.lake import LakeReader

__all__ = ["INCREMENTAL_KINDS", "PERIODIC_KINDS", "Detector", "FindingKey", "lake_agents", "named_agents"]

FindingKey = tuple[str, str, str]  # (tenant, kind, subject): one finding

# over_privileged (a scope unused for N days) is about time passing, not an arriving event: the detection loop runs
# it on the whole lake periodically instead (query.detect.loop).
PERIODIC_KINDS = ("over_privileged",)
INCREMENTAL_KINDS = tuple(kind for kind in KINDS if kind not in PERIODIC_KINDS)


@dataclass
class _State:
    revocations: list[pa.Table] = field(default_factory=list)
    denied: pa.Table | None = None
    keys: set[tuple[Any, ...]] = field(default_factory=set)  # what the representatives stand for
    table: pa.Table | None = None  # one row per key: the first event that named it


class Detector:
    """Feed it the lake's new rows in log order (``observe``); it returns the findings those rows complete or
    extend, each with only the evidence in this batch's working set (merge them into ``FindingStore``)."""

    def __init__(self, lake: LakeReader, settings: FindingSettings | RuleBook | None = None) -> None:
        self.lake = lake
        self.settings = settings or FindingSettings()
        self.state = _State()
        every = (
            [self.settings]
            if isinstance(self.settings, FindingSettings)
            else [self.settings.defaults, *(own for _, own in self.settings.tenants)]
        )
        # Denied calls are kept for two of the longest burst window any tenant set.
        self.burst_window = timedelta(minutes=max(s.burst_window_minutes for s in every))
        # the agents named by the evidence of each finding the last ``observe`` returned (``named_agents``)
        self.agents: dict[FindingKey, list[str]] = {}

    def observe(self, batch: pa.Table) -> list[Finding]:
        """The findings these rows complete or extend, each with every evidence id of its working set."""
        self.agents = {}
        rows = batch.filter(pc.not_equal(batch["tenant"], "_system")) if batch.num_rows else batch
        if rows.num_rows == 0:
            return []
        kept, looked_up = self._history(rows)
        context = [rows, *kept, *looked_up]
        working = _distinct(pa.concat_tables([table.select(rows.column_names) for table in context]))
        found = findings(
            LakeReader(self.lake.data_dir, rows=working),
            kinds=INCREMENTAL_KINDS,
            settings=self.settings,
            evidence_limit=None,  # the store counts evidence exactly: it needs every id
        )
        self._remember(rows)
        fresh = set(rows["event_id"].to_pylist())
        for table in looked_up:
            fresh.update(table["event_id"].to_pylist())
        # A finding counts for this batch only when the batch (or the history it made relevant, such as the uses
        # of a credential revoked now) brought some of its evidence: the kept rows alone were reported already.
        reported = [finding for finding in found if fresh.intersection(finding.evidence)]
        self.agents = named_agents(working, reported)
        return reported

    def warm(self, upto: int) -> None:
        """Rebuild the state from the lake's events up to log index ``upto`` (after a restart): the revocations,
        the last two burst windows of denied calls, and the first event of each representative key, in log order."""
        if upto < 0:
            return
        window = self.burst_window
        with self.lake.connect() as connection:
            connection.execute(f"CREATE TEMP VIEW seen AS SELECT * FROM events WHERE log_index <= {int(upto)}")
            [(newest,)] = connection.execute(
                "SELECT max(occurred_at) FROM seen WHERE type = 'tool.invocation' AND decision_result = 'deny'"
            ).fetchall()
            since = "TRUE" if newest is None else f"occurred_at >= TIMESTAMPTZ '{(newest - 2 * window).isoformat()}'"
            table: pa.Table = connection.sql(
                f"""SELECT * FROM seen WHERE type = 'credential.revoked'
                UNION BY NAME SELECT * FROM seen WHERE type = 'tool.invocation' AND decision_result = 'deny' AND {since}
                UNION BY NAME (SELECT DISTINCT ON (tenant, credential_id, credential_client_id, agent) * FROM seen
                    WHERE type = 'tool.invocation' AND credential_id IS NOT NULL ORDER BY log_index)
                UNION BY NAME (SELECT DISTINCT ON (tenant, credential_id) * FROM seen
                    WHERE credential_id IS NOT NULL AND type <> 'credential.revoked' ORDER BY log_index)
                UNION BY NAME (SELECT DISTINCT ON (tenant, approval_id) * FROM seen
                    WHERE type = 'task.approval' AND approval_id IS NOT NULL ORDER BY log_index)
                UNION BY NAME (SELECT DISTINCT ON (tenant, delegate_agent) * FROM seen
                    WHERE delegate_agent IS NOT NULL ORDER BY log_index)
                UNION BY NAME (SELECT * FROM (SELECT DISTINCT ON (tenant, name) * EXCLUDE (name) FROM
                    (SELECT *, unnest(delegation_chain[2:]) AS name FROM seen) ORDER BY log_index))
                ORDER BY log_index"""
            ).to_arrow_table()
        if table.num_rows:
            self._remember(_distinct(table))

    # -- the history a batch needs ------------------------------------------------------------------------------

    def _history(self, rows: pa.Table) -> tuple[list[pa.Table], list[pa.Table]]:
        """(the rows kept as state, the rows this batch made relevant, read from the lake)."""
        state, kept, history = self.state, [], []
        kept.extend(state.revocations)
        if state.denied is not None:
            kept.append(state.denied)
        if state.table is not None:
            kept.append(state.table)
        revoked = rows.filter(pc.equal(rows["type"], "credential.revoked"))
        if revoked.num_rows:
            history.append(self._lake_rows("credential_id", revoked["credential_id"].to_pylist()))
        parents = [value for value in pc.unique(rows["parent_event_id"]).to_pylist() if value is not None]
        if parents:
            history.append(self._lake_rows("event_id", parents))
        approvals = [value for value in pc.unique(rows["approval_id"]).to_pylist() if value is not None]
        if approvals:
            history.append(self._lake_rows("approval_id", approvals, where="type = 'task.approval'"))
        return kept, history

    def _lake_rows(self, column: str, values: Sequence[Any], where: str = "TRUE") -> pa.Table:
        """Rows of the lake whose ``column`` is one of ``values`` (a point lookup: rare events ask for it)."""
        assert column in {"credential_id", "event_id", "approval_id"}
        with self.lake.connect() as connection:
            connection.execute("CREATE TEMP TABLE wanted AS SELECT unnest(?) AS value", [list(values)])
            table: pa.Table = connection.sql(
                f"SELECT * FROM all_events WHERE {column} IN (SELECT value FROM wanted) AND {where}"
            ).to_arrow_table()
        return table

    def _remember(self, rows: pa.Table) -> None:
        state = self.state
        revoked = rows.filter(pc.equal(rows["type"], "credential.revoked"))
        if revoked.num_rows:
            state.revocations.append(revoked)
        denied = rows.filter(
            pc.and_(pc.equal(rows["type"], "tool.invocation"), pc.equal(rows["decision_result"], "deny"))
        )
        if denied.num_rows or state.denied is not None:
            kept = denied if state.denied is None else _append(state.denied, denied)
            window = self.burst_window
            newest = pc.max(kept["occurred_at"]).as_py()
            if newest is not None:
                kept = kept.filter(
                    pc.greater_equal(kept["occurred_at"], pa.scalar(newest - 2 * window, kept["occurred_at"].type))
                )
            state.denied = kept
        # Only the columns that make the keys leave Arrow; a representative row stays an Arrow row.
        columns = {
            name: rows[name].to_pylist()
            for name in ("type", "tenant", "credential_id", "credential_client_id", "agent", "delegation_chain",
                         "delegate_agent", "approval_id")
        }  # fmt: skip
        chosen = []
        for position in range(rows.num_rows):
            kind, tenant, credential = (
                columns["type"][position],
                columns["tenant"][position],
                columns["credential_id"][position],
            )
            keys: list[tuple[Any, ...]] = []
            if credential is not None and kind == "tool.invocation":
                keys.append(("credential", tenant, credential, columns["credential_client_id"][position],
                             columns["agent"][position]))  # fmt: skip
            keys.extend(("agent", tenant, name) for name in (columns["delegation_chain"][position] or [])[1:])
            if columns["delegate_agent"][position] is not None:
                keys.append(("agent", tenant, columns["delegate_agent"][position]))
            if credential is not None and kind != "credential.revoked":
                keys.append(("holder", tenant, credential))
            if kind == "task.approval" and columns["approval_id"][position] is not None:
                keys.append(("approval", tenant, columns["approval_id"][position]))
            fresh = [key for key in keys if key not in state.keys]
            if fresh:
                state.keys.update(fresh)
                chosen.append(position)
        if chosen:
            added = rows.take(chosen)
            state.table = added if state.table is None else _append(state.table, added).combine_chunks()


def named_agents(rows: pa.Table, found: Sequence[Finding]) -> dict[FindingKey, list[str]]:
    """For each finding, the agents its evidence events name (``rows`` holds them): the delegates of their
    delegation chains and the clients of their credentials. The access review lists a finding under each."""
    wanted = {event_id for finding in found for event_id in finding.evidence}
    named: dict[str, set[str]] = {}
    if wanted and rows.num_rows:
        evidence = rows.filter(pc.is_in(rows["event_id"], pa.array(sorted(wanted), rows["event_id"].type)))
        for event_id, chain, client in zip(
            evidence["event_id"].to_pylist(),
            evidence["delegation_chain"].to_pylist(),
            evidence["credential_client_id"].to_pylist(),
            strict=True,
        ):
            names = {name for name in (chain or [])[1:] if name is not None}
            if client is not None:
                names.add(client)
            named[event_id] = names
    return {
        (finding.tenant, finding.kind, finding.subject): sorted(
            set[str]().union(*(named.get(event_id, set()) for event_id in finding.evidence))
        )
        for finding in found
    }


def lake_agents(lake: LakeReader, found: Sequence[Finding]) -> dict[FindingKey, list[str]]:
    """``named_agents`` with the evidence events read from the lake (after a whole-lake query)."""
    wanted = sorted({event_id for finding in found for event_id in finding.evidence})
    if not wanted:
        return named_agents(pa.table({"event_id": pa.array([], pa.string())}), found)
    with lake.connect() as connection:
        connection.register("wanted", pa.table({"event_id": pa.array(wanted, pa.string())}))
        rows: pa.Table = connection.sql(
            "SELECT event_id, delegation_chain, credential_client_id FROM all_events"
            " WHERE event_id IN (SELECT event_id FROM wanted)"
        ).to_arrow_table()
    return named_agents(rows, found)


def _append(kept: pa.Table, new: pa.Table) -> pa.Table:
    """``new`` after ``kept``, in ``new``'s columns and types (the state may come from another query's shape)."""
    return pa.concat_tables([kept.select(new.column_names).cast(new.schema), new])


def _distinct(table: pa.Table) -> pa.Table:
    """Each event once (a row may be both in the batch and in the state)."""
    ids = table["event_id"].to_pylist()
    seen: set[str] = set()
    keep = []
    for position, event_id in enumerate(ids):
        if event_id not in seen:
            seen.add(event_id)
            keep.append(position)
    return table.take(keep) if len(keep) < len(ids) else table
