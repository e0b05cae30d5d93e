"""A CSV Custody writes never carries a formula: every cell a spreadsheet would evaluate is neutralised."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest

from query.blast import forward_taint
from query.lake import LakeReader
from query.recert.reports import build_report, verify_report
from query.spreadsheet import FORMULA_TRIGGERS, csv_cell
from tests import hostile_values
from tests.conftest import Harness


@pytest.mark.parametrize("value", ["=1+2", "+1", "-1+1", "@SUM(A1)", "\tx", "\rx"])
def test_a_cell_a_spreadsheet_would_evaluate_gets_a_leading_quote(value: str) -> None:
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["agent", "a=1", "", None, 7, -7])
def test_other_cells_are_unchanged(value: object) -> None:
    assert csv_cell(value) == value


def cells_of(text: str) -> list[str]:
    rows = csv.reader(io.StringIO("\n".join(line for line in text.splitlines() if not line.startswith("#"))))
    return [cell for row in rows for cell in row]


def test_taint_and_access_review_csv_neutralise_values_from_the_log(harness: Harness) -> None:
    hostile_values.post(harness)
    since = datetime.now(UTC) - timedelta(days=1)
    taint = forward_taint(LakeReader(harness.data_dir), "agent", hostile_values.FORMULA_AGENT, since)
    report = build_report(harness.data_dir, "acme", window_days=30, form="csv")
    for text in (taint.as_csv(), report.content.decode()):
        assert not [cell for cell in cells_of(text) if cell.startswith(FORMULA_TRIGGERS)]
    assert "'" + hostile_values.FORMULA_RESOURCE in cells_of(taint.as_csv())
    assert "'" + hostile_values.FORMULA_AGENT in cells_of(report.content.decode())
    # The signed report still verifies: its signature covers what the file shows.
    path = harness.data_dir.parent / report.filename
    path.write_bytes(report.content)
    verified = verify_report(path)
    assert verified.signature_ok
    assert verified.differences == []
