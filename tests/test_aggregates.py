"""The overview from hourly aggregates per lake file gives the lake's own answer, for every window (aligned on the
hour or not, under an hour, the whole lake), tenant-bound or not, with aggregates complete, partial or stale."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from query.index.aggregates import LakeAggregates, Window
from query.lake import LakeReader
from query.overview import overview
from query.recert.review import DAILY_FACTS, access_review
from tests.conftest import ORG_END, copy_data_dir

pytestmark = pytest.mark.slow  # the demo organisation


@pytest.fixture
def lake(org: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the demo organisation's data dir, so that the aggregates written here stay here."""
    data = tmp_path / "data"
    copy_data_dir(org["data"], data)
    return data


WINDOWS: list[tuple[datetime | None, datetime | None]] = [
    (None, None),  # the whole lake
    (ORG_END - timedelta(days=7, minutes=13, seconds=5), ORG_END - timedelta(minutes=41)),  # not on the hour
    (ORG_END - timedelta(days=2), ORG_END),  # on the hour
    (ORG_END - timedelta(hours=5, minutes=20), ORG_END - timedelta(hours=5, minutes=1)),  # within one hour
    (ORG_END - timedelta(days=30, minutes=7), None),
]


def same(reader: LakeReader, aggregates: LakeAggregates) -> None:
    for since, until in WINDOWS:
        for tenant in (None, "acme", "globex"):
            expected = asdict(overview(reader, since=since, until=until, tenant=tenant))
            found = asdict(overview(reader, since=since, until=until, tenant=tenant, aggregates=aggregates))
            assert found == expected, (since, until, tenant)


def test_the_overview_from_aggregates_is_the_lakes(lake: Path) -> None:
    reader = LakeReader(lake)
    aggregates = LakeAggregates(reader)
    assert aggregates.split(reader.files())[0] == []
    same(reader, aggregates)  # none written yet: every file read from the lake (and aggregates warmed meanwhile)
    aggregates.refresh()
    assert aggregates.split(reader.files())[1] == []  # every file (but the system stream's) has its aggregate
    same(reader, aggregates)
    everything = overview(reader, aggregates=aggregates)
    assert everything.events > 1000
    assert everything.denied > 0


def test_a_stale_or_wrong_aggregate_is_not_used(lake: Path) -> None:
    reader = LakeReader(lake)
    aggregates = LakeAggregates(reader)
    aggregates.refresh()
    expected = asdict(overview(reader))
    # an aggregate that does not count its file's rows (tampered with, or written by something else): not used
    victim = aggregates.split(reader.files())[0][0]
    table = pq.read_table(victim)
    pq.write_table(table.slice(0, table.num_rows // 2), victim)  # its footer no longer records the file's rows
    fresh = LakeAggregates(reader)
    usable, rest = fresh.split(reader.files())
    assert len(rest) == 1
    assert victim not in usable
    assert not victim.exists()  # removed: the next refresh writes it again
    assert asdict(overview(reader, aggregates=fresh)) == expected
    fresh.refresh()  # written again (unless the overview's background refresh already did)
    assert victim.exists()
    assert fresh.split(reader.files())[1] == []
    assert asdict(overview(reader, aggregates=fresh)) == expected


def test_windows_split_into_whole_hours_and_edges() -> None:
    since = datetime(2026, 10, 1, 10, 15)
    until = datetime(2026, 10, 2, 8, 30)
    window = Window.of(since, until)
    assert (window.start, window.end) == (datetime(2026, 10, 1, 11), datetime(2026, 10, 2, 8))
    assert window.edges == ((since, datetime(2026, 10, 1, 11)), (datetime(2026, 10, 2, 8), until))
    assert Window.of(datetime(2026, 10, 1, 10), datetime(2026, 10, 1, 12)).edges == ()
    short = Window.of(datetime(2026, 10, 1, 10, 5), datetime(2026, 10, 1, 10, 50))
    assert short.edges == ((datetime(2026, 10, 1, 10, 5), datetime(2026, 10, 1, 10, 50)),)
    assert Window.of(None, None) == Window(None, None, ())


REVIEW_ENDS = [ORG_END, ORG_END - timedelta(hours=7, minutes=13, seconds=5)]  # on a day boundary, and not


def test_the_access_review_from_daily_facts_is_the_lakes(lake: Path) -> None:
    """The review's per-agent facts (credentials, scopes used with last use, users and approvals, delegations,
    heads) from the daily facts per file: the same review as from the lake's rows, for windows that start and end
    on a day or not, and with a fact file tampered with."""
    reader = LakeReader(lake)
    facts = LakeAggregates(reader, DAILY_FACTS)

    def reviews(using: LakeAggregates | None) -> list[dict[str, Any]]:
        return [
            asdict(access_review(lake, tenant, window_days=days, now=end, facts=using))
            for tenant in ("acme", "globex", "initech")
            for end in REVIEW_ENDS
            for days in (1, 30)
        ]

    assert facts.split(reader.files())[0] == []
    expected = reviews(facts)  # nothing written yet: every file's facts computed from its rows
    assert any(agent["scopes_used"] and agent["users"] for review in expected for agent in review["agents"])
    facts.refresh()
    assert facts.split(reader.files())[1] == []
    assert reviews(facts) == expected
    victim = facts.split(reader.files())[0][0]
    table = pq.read_table(victim)
    pq.write_table(table.slice(0, table.num_rows // 2), victim)
    assert reviews(LakeAggregates(reader, DAILY_FACTS)) == expected  # refused, its file read instead
    assert not victim.exists()


def test_daily_windows_split_into_whole_days_and_edges() -> None:
    since, until = datetime(2026, 10, 1, 10, 30), datetime(2026, 10, 4, 6)
    window = Window.of(since, until, "day")
    assert (window.start, window.end) == (datetime(2026, 10, 2), datetime(2026, 10, 4))
    assert window.edges == ((since, datetime(2026, 10, 2)), (datetime(2026, 10, 4), until))
    assert Window.of(datetime(2026, 10, 1, 1), datetime(2026, 10, 1, 23), "day").edges == (
        (datetime(2026, 10, 1, 1), datetime(2026, 10, 1, 23)),
    )
