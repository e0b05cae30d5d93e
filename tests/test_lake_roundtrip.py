"""Every event the schema admits is accepted, and comes back from the lake through DuckDB unchanged.

Hypothesis draws schema-valid events with every field at and near its boundaries (names of 1 and 512 characters in
any plane of Unicode, free text of 0 and 4,096, integers at +/-(2**53 - 1), timestamps at years 1 and 9999 with 0
to 6 fraction digits, epoch-second expiries at 0 and 9999-12-31T23:59:59Z, delegations 0 to 32 agents deep, scopes
and attrs at their size limits). Each is checked as ingest checks it, written by the lake writer and read back with
plain DuckDB; every column is compared with the payload, decoded here independently of ``store.rows``.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.checks import Verified, check_event
from ingest.sdk import generate_key, public_jwk
from store.ground.keys import KeyRing
from store.lake import Lake
from store.lake_files import HIVE_OPTIONS
from store.rows import Signed, row_problem, row_values
from store.wal import WalRecord
from tests.signing import sign

KEY = generate_key()
NOW = datetime(2026, 12, 1, tzinfo=UTC)
EARLIEST = datetime(1, 1, 1)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999)

CHARACTERS = st.characters(exclude_categories=("Cs",))  # every code point but lone surrogates (not Unicode text)
IDENTIFIER = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,127}", fullmatch=True)


def sized_text(low: int, high: int) -> st.SearchStrategy[str]:
    """Text at its lower bound, its upper bound, or anywhere between (short, to keep examples fast)."""
    return st.one_of(
        st.text(CHARACTERS, min_size=low, max_size=low + 2),
        st.text(CHARACTERS, min_size=high - 2, max_size=high),
        st.text(CHARACTERS, min_size=low, max_size=min(high, 40)),
    )


NAME = sized_text(1, 512)
TEXT = sized_text(0, 4096)
SAFE = st.sampled_from([-(2**53 - 1), -1, 0, 1, 2**31, 2**53 - 1]) | st.integers(-(2**53 - 1), 2**53 - 1)


def timestamps(latest: datetime = LATEST) -> st.SearchStrategy[str]:
    instants = st.sampled_from([EARLIEST, latest]) | st.datetimes(min_value=EARLIEST, max_value=latest)
    return st.builds(_rfc3339, instants, st.integers(0, 6))


def _rfc3339(when: datetime, digits: int) -> str:
    text = when.strftime("%Y-%m-%dT%H:%M:%S").zfill(19)
    fraction = f"{when.microsecond:06d}"[:digits]
    return f"{text}.{fraction}Z" if digits else f"{text}Z"


def scopes() -> st.SearchStrategy[list[str]]:
    return st.lists(NAME, max_size=3) | st.lists(
        st.text(CHARACTERS, min_size=1, max_size=2), min_size=512, max_size=512
    )


def delegation() -> st.SearchStrategy[dict[str, Any]]:
    def nest(names: list[str]) -> dict[str, Any]:
        node: dict[str, Any] = {"sub": names[-1]}
        for name in reversed(names[:-1]):
            node = {"sub": name, "act": node}
        return node

    lengths = st.sampled_from([1, 2, 33]) | st.integers(1, 33)  # the user and 0 to 32 agents
    return lengths.flatmap(lambda n: st.lists(NAME, min_size=n, max_size=n)).map(nest)


CREDENTIAL = st.fixed_dictionaries(
    {
        "id": NAME,
        "kind": st.sampled_from(["agent_token", "user_session", "service_account", "api_key"]),
        "client_id": NAME,
        "scopes": scopes(),
    },
    optional={
        "expires_at": st.none() | timestamps() | st.sampled_from([0, 253_402_300_799]) | st.integers(0, 253_402_300_799)
    },
)
ATTRS = st.dictionaries(
    st.text(CHARACTERS, min_size=1, max_size=256),
    st.text(CHARACTERS, max_size=4096) | SAFE | st.booleans(),
    max_size=256,
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    seq = draw(st.sampled_from([1, 2, 2**53 - 1]) | st.integers(1, 2**53 - 1))
    kind = draw(
        st.sampled_from(
            ["tool.invocation", "agent.delegation", "task.approval", "credential.issued", "credential.revoked"]
        )
    )
    body: dict[str, Any] = {
        "v": 1,
        "event_id": str(draw(st.uuids())),
        "type": kind,
        "occurred_at": draw(timestamps(NOW.replace(tzinfo=None))),
        "emitter": "gw-1",
        "tenant": draw(IDENTIFIER),
        "seq": seq,
        "prev_hash": "0" * 64 if seq == 1 else draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
    }
    if kind in ("tool.invocation", "agent.delegation") or draw(st.booleans()):
        body["delegation"] = draw(delegation())
    if kind in ("tool.invocation", "credential.issued", "credential.revoked") or draw(st.booleans()):
        body["credential"] = draw(CREDENTIAL)
    if kind == "tool.invocation":
        body["tool"] = {"name": draw(NAME), "server": draw(NAME)}
        body["decision"] = {
            "result": draw(st.sampled_from(["allow", "deny"])),
            "required_scope": draw(st.none() | NAME),
            "policy": draw(st.none() | TEXT),
            "reason": draw(st.none() | TEXT),
        }
    if kind == "agent.delegation":
        body["delegate"] = {"agent": draw(NAME), "credential_id": draw(NAME), "scopes": draw(scopes())}
    if kind == "task.approval":
        body["approval"] = {"id": draw(NAME), "approved_by": draw(NAME), "scopes": draw(scopes()), "task": draw(TEXT)}
    if kind == "credential.revoked":
        body["revoked_at"] = draw(timestamps())
    optional = {
        "resource": st.fixed_dictionaries({"type": NAME, "id": NAME, "tenant": IDENTIFIER}),
        "outcome": st.sampled_from(["success", "error"]),
        "parent_event_id": st.uuids().map(str),
        "trace_id": NAME,
        "reason": TEXT,
        "attrs": ATTRS,
    }
    for field, strategy in optional.items():
        if draw(st.booleans()):
            body[field] = draw(st.none() | strategy)
    return body


def _instant(value: str | int | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int):
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=value)
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)


def _chain(body: dict[str, Any]) -> list[str] | None:
    names, node = [], body.get("delegation")
    while node:
        names.append(node["sub"])
        node = node.get("act")
    return [names[0], *reversed(names[1:])] if names else None


def expected_row(body: dict[str, Any], token: str) -> dict[str, Any]:
    credential = body.get("credential") or {}
    decision = body.get("decision") or {}
    chain = _chain(body)
    return {
        "tenant": body["tenant"],
        "date": date.fromisoformat(body["occurred_at"][:10]),
        "event_id": body["event_id"],
        "type": body["type"],
        "occurred_at": _instant(body["occurred_at"]),
        "seq": body["seq"],
        "prev_hash": body["prev_hash"],
        "user": chain[0] if chain else None,
        "agent": chain[-1] if chain and len(chain) > 1 else None,
        "delegation_chain": chain,
        "delegation_depth": len(chain) - 1 if chain else None,
        "credential_id": credential.get("id"),
        "credential_scopes": credential.get("scopes"),
        "credential_expires_at": _instant(credential.get("expires_at")),
        "decision_policy": decision.get("policy"),
        "resource_tenant": (body.get("resource") or {}).get("tenant"),
        "approval_task": (body.get("approval") or {}).get("task"),
        "delegate_scopes": (body.get("delegate") or {}).get("scopes"),
        "revoked_at": _instant(body.get("revoked_at")),
        "trace_id": body.get("trace_id"),
        "reason": body.get("reason"),
        "attrs": body.get("attrs"),
        "jws": token,
    }


@pytest.mark.slow
@given(body=events())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_schema_valid_event_is_accepted_and_round_trips_through_the_lake(
    tmp_path_factory: Any, body: dict[str, Any]
) -> None:
    keys = KeyRing()
    keys.load_specs([("k1", "gw-1", body["tenant"], public_jwk(KEY, "k1"), None)], 1)
    token = sign(body, KEY, "k1")
    checked = check_event(token, keys, now=NOW, max_event_bytes=16 * 1024 * 1024, max_skew=timedelta(minutes=5))
    assert isinstance(checked, Verified), checked
    assert row_problem(row_values(Signed(body, token, "k1", checked.event_hash, 0))) is None  # the writer's check

    root: Path = tmp_path_factory.mktemp("lake")
    record = WalRecord(checked.event_id, "gw-1", checked.seq, checked.event_hash, 1_700_000_000_000_000, "k1", token)
    result = Lake(root / "lake").write_segment(1, [record])
    assert (result.written, result.quarantined) == (1, [])

    columns = list(expected_row(body, token))
    selected = ", ".join(f'"{column}"' for column in columns)
    with duckdb.connect() as db:
        db.execute("SET TimeZone = 'UTC'")
        cursor = db.execute(
            f"SELECT {selected} FROM read_parquet(?, {HIVE_OPTIONS})",
            [str(root / "lake" / "events" / "**" / "*.parquet")],
        )
        [row] = cursor.fetchall()
    stored = dict(zip(columns, row, strict=True))
    stored["attrs"] = None if stored["attrs"] is None else json.loads(stored["attrs"])
    assert stored == expected_row(body, token)


def test_docs_lake_md_describes_every_column_as_the_files_do(tmp_path: Path) -> None:
    """docs/lake.md and the Parquet field metadata say the same of every column, and nothing else."""
    import pyarrow.parquet as pq

    from store.rows import COLUMN_SOURCES, LAKE_COLUMNS
    from tests.conftest import REPO

    documented = {}
    for line in (REPO / "docs" / "lake.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[2] in ("signed", "derived", "server"):
            documented[cells[0].strip("`")] = (cells[2], cells[3])
    assert documented == COLUMN_SOURCES
    assert list(documented) == [name for name, _ in LAKE_COLUMNS]
    token = sign(
        {
            "v": 1,
            "event_id": "00000000-0000-4000-8000-000000000001",
            "type": "task.approval",
            "occurred_at": "2026-01-01T00:00:00Z",
            "emitter": "gw-1",
            "tenant": "acme",
            "seq": 1,
            "prev_hash": "0" * 64,
            "approval": {"id": "a", "approved_by": "b", "scopes": [], "task": ""},
        },
        KEY,
        "k1",
    )
    record = WalRecord("00000000-0000-4000-8000-000000000001", "gw-1", 1, "0" * 64, 0, "k1", token)
    Lake(tmp_path / "lake").write_segment(1, [record])
    [path] = (tmp_path / "lake" / "events").glob("**/*.parquet")
    schema = pq.read_schema(path)
    for name, (origin, source) in COLUMN_SOURCES.items():
        metadata = schema.field(name).metadata
        assert (metadata[b"custody.origin"].decode(), metadata[b"custody.source"].decode()) == (origin, source)
