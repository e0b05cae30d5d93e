"""Reach copies give the same identity blast radius as the lake, whatever part of the lake they cover, and a copy
that does not match its file is not used; the resource list is bounded, and says so."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from query.blast import identity_blast_radius
from query.index import reach_copies
from query.index.reach_copies import ReachCopies
from query.lake import LakeReader
from store.ground.errors import InvalidInput
from tests import scenario
from tests.conftest import Harness, read_lake

pytestmark = pytest.mark.slow  # large lakes


@pytest.fixture
def lake(org: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the demo organisation's data dir, so that the copies written here stay here."""
    data = tmp_path / "data"
    shutil.copytree(org["data"] / "lake", data / "lake")
    return data


def answers(reader: LakeReader, copies: ReachCopies | None) -> list[dict[str, Any]]:
    """Blast radii of every agent and of a sample of credentials: all time, a window, one tenant."""
    rows = read_lake(reader.data_dir, "credential_id, agent, credential_client_id")
    # The agents and credentials of borrowed credentials (another agent's client presented them), then some more.
    foreign = [row for row in rows if row[2] and row[1] != row[2]]
    agents = sorted({row[2] for row in foreign})[:3] + sorted({row[1] for row in rows if row[1]})[::5]
    credentials = sorted({row[0] for row in foreign})[:3] + sorted({row[0] for row in rows if row[0]})[::150]
    days = sorted(row[0] for row in read_lake(reader.data_dir, "occurred_at"))
    middle = days[len(days) // 2]
    asked: list[tuple[Any, ...]] = [("agent", name, None, None, None) for name in agents]
    asked += [("credential", name, None, None, None) for name in credentials]
    asked += [("agent", name, middle, middle + timedelta(days=3), None) for name in agents[:3]]
    asked += [("agent", name, None, None, "acme") for name in agents[:3]]
    found = []
    for kind, subject, since, until, tenant in asked:
        reach = identity_blast_radius(
            reader, kind, subject, since=since, until=until, tenant=tenant, copies=copies, resource_limit=None
        )
        found.append({"asked": (kind, subject, since, until, tenant), **asdict(reach)})
    assert sum(answer["events"] for answer in found) > 1000  # they are not all empty
    return found


def test_blast_radius_through_reach_copies_equals_the_lakes(lake: Path) -> None:
    reader = LakeReader(lake)
    expected = answers(reader, None)
    copies = ReachCopies(reader)
    assert answers(reader, copies) == expected  # no copies yet: everything read from the lake
    copies.refresh()
    written = sorted((lake / "index" / "reach").glob("*.parquet"))
    covered, rest = copies.split(reader.files())
    assert len(written) == len(covered) > 10
    assert all("tenant=_system" in str(path) for path in rest)  # only the server's own stream is not copied
    assert any(copies.facts(copy).foreign_clients for copy in covered.values())  # borrowed credentials are in it
    first = next(iter(covered.values()))
    order = pq.read_table(first, columns=["agent"]).column("agent").to_pylist()
    assert order == sorted(order, key=lambda agent: (agent is None, agent))  # sorted by agent, nulls last
    assert answers(reader, copies) == expected
    for copy in written[::2]:  # half the files without a copy: read from the lake, same answers
        copy.unlink()
    assert answers(reader, ReachCopies(reader)) == expected


def test_a_copy_that_does_not_match_its_file_is_not_used(lake: Path) -> None:
    reader = LakeReader(lake)
    expected = answers(reader, None)
    ReachCopies(reader).refresh()
    copies = sorted((lake / "index" / "reach").glob("*.parquet"))
    short = copies[0]
    table = pq.read_table(short)
    pq.write_table(table.slice(0, table.num_rows // 2), short)  # rows dropped, name kept
    stale = [path for path in reader.files() if "tenant=_system" not in str(path)][1]
    later = stale.stat().st_mtime_ns + 5_000_000_000
    os.utime(stale, ns=(later, later))  # the file changed: its copy's name no longer matches
    fresh = ReachCopies(reader)  # a new process: nothing checked yet
    covered, rest = fresh.split(reader.files())
    assert short not in covered.values()
    assert not short.exists()
    assert stale in rest
    assert answers(reader, fresh) == expected
    fresh.refresh()  # writes both again, removes the copy of the old version of the changed file
    covered, rest = fresh.split(reader.files())
    assert all("tenant=_system" in str(path) for path in rest)
    assert len(list((lake / "index" / "reach").glob("*.parquet"))) == len(covered)
    assert answers(reader, fresh) == expected


def test_the_resource_list_is_bounded_and_says_so(harness: Harness) -> None:
    scenario.build(harness)
    reader = LakeReader(harness.data_dir)
    whole = identity_blast_radius(reader, "agent", "support-agent", resource_limit=None)
    assert (whole.resources_total, whole.resources_truncated) == (2, False)
    top = identity_blast_radius(reader, "agent", "support-agent", resource_limit=1)
    assert (len(top.resources), top.resources_total, top.resources_truncated) == (1, 2, True)
    assert top.resources == whole.resources[:1]
    assert top.tenants == whole.tenants == ["acme"]  # of every resource, not only the listed ones
    with pytest.raises(InvalidInput, match="resource_limit"):
        identity_blast_radius(reader, "agent", "support-agent", resource_limit=0)


def test_resources_are_listed_most_used_first(lake: Path) -> None:
    reader = LakeReader(lake)
    agent = "ci-subagent"  # 66 allowed calls on 35 resources, up to 5 on one: the order is not all ties
    allowed = [
        (row[4], row[5], row[3])
        for row in read_lake(lake, "agent, type, decision_result, resource_id, resource_tenant, resource_type")
        if row[0] == agent and row[1] == "tool.invocation" and row[2] == "allow" and row[3] is not None
    ]
    reach = identity_blast_radius(reader, "agent", agent, resource_limit=None)
    keys = [(-r["count"], r["tenant"], r["type"], r["id"]) for r in reach.resources]
    assert keys == sorted(keys)  # most used first, ties by tenant, type, id
    assert len({r["count"] for r in reach.resources}) > 1
    assert sum(r["count"] for r in reach.resources) == len(allowed)
    assert reach.resources_total == len(reach.resources) == len(set(allowed))
    top = identity_blast_radius(reader, "agent", agent, resource_limit=10)
    assert top.resources == reach.resources[:10]


def test_copies_written_in_sorted_runs_give_the_lakes_answers(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file longer than a run is copied a run at a time, each run sorted by agent (the copy of a compacted file
    of millions of events takes no more memory than a small one's): with runs of 40 rows, the copies' facts are
    those of copies sorted whole, and the blast radii are the lake's."""
    reader = LakeReader(lake)
    whole = ReachCopies(reader)
    whole.refresh()
    covered, _ = whole.split(reader.files())
    facts = {path: whole.facts(copy) for path, copy in covered.items()}
    shutil.rmtree(lake / "index" / "reach")
    monkeypatch.setattr(reach_copies, "_RUN_ROWS", 40)
    runs = ReachCopies(reader)
    runs.refresh()
    covered, _ = runs.split(reader.files())
    assert {path: runs.facts(copy) for path, copy in covered.items()} == facts
    assert any(fact.foreign_clients for fact in facts.values())
    agents = [pq.read_table(copy, columns=["agent"]).column("agent").to_pylist() for copy in covered.values()]
    key = lambda agent: (agent is None, agent)  # noqa: E731 - sorted by agent, nulls last
    assert all(run == sorted(run, key=key) for order in agents for run in _chunks(order, 40))
    assert any(order != sorted(order, key=key) for order in agents), "no file was longer than a run"
    assert answers(reader, runs) == answers(reader, None)


def _chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[start : start + size] for start in range(0, len(values), size)]
