"""What ingest acknowledges, the lake can store; and should one record still be refused, it stops nothing.

A record the lake cannot hold (here one signed before ingest checked rows, with an epoch-seconds expiry of
2**53 - 1 that no int64 microsecond column holds) is quarantined whole with its reason, every other record is
written, the server starts with it in its WAL, /healthz and /metrics count it, and `custody quarantine` lists and
re-ingests it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from custody.cli import main
from ingest.sdk import generate_key
from store.engine import Store, reingest_quarantined
from store.lake import Lake
from store.quarantine import Quarantine
from store.wal import WalRecord, WriteAheadLog
from tests.conftest import open_harness, read_lake
from tests.signing import hash_of, payload, sign

KEY = generate_key()


def record(seq: int, prev_hash: str, **credential: object) -> tuple[WalRecord, str]:
    body = payload("gw-1", seq, prev_hash, "acme")
    body["credential"].update(credential)
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    return WalRecord(body["event_id"], "gw-1", seq, hash_of(body), now_us, "k1", sign(body, KEY, "k1")), hash_of(body)


def segment_with_one_bad_record() -> tuple[list[WalRecord], WalRecord]:
    """Four chained records; the third expires at 2**53 - 1 epoch seconds."""
    records, prev = [], "0" * 64
    for seq in range(1, 5):
        expiry: dict[str, object] = {"expires_at": 2**53 - 1} if seq == 3 else {}
        made, prev = record(seq, prev, **expiry)
        records.append(made)
    return records, records[2]


def test_a_record_the_lake_cannot_hold_is_quarantined_and_every_other_written(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    records, bad = segment_with_one_bad_record()
    garbage = WalRecord("not-an-event", "gw-9", 1, "0" * 64, 0, "k9", "not.a.jws")
    escaping = payload("gw-8", 1, "0" * 64, "../../outside")
    traversal = WalRecord(escaping["event_id"], "gw-8", 1, hash_of(escaping), 0, "k1", sign(escaping, KEY, "k1"))
    result = lake.write_segment(7, [*records, garbage, traversal])
    assert result.written == 3
    assert [event_id for event_id, _ in result.quarantined] == [bad.event_id, "not-an-event", traversal.event_id]
    assert "credential_expires_at" in result.quarantined[0][1]
    assert "cannot read the event" in result.quarantined[1][1]
    assert "cannot name a partition directory" in result.quarantined[2][1]
    assert not (tmp_path / "outside").exists()
    assert [row[0] for row in read_lake(tmp_path, "seq")] == [1, 2, 4]
    kept = Quarantine(tmp_path / "quarantine").events()
    assert [(event.segment, event.record) for event in kept] == [(7, bad), (7, garbage), (7, traversal)]
    # Writing the same segment again (a crash before the WAL deleted it) keeps one copy of each.
    again = lake.write_segment(7, [*records, garbage, traversal])
    assert again.written == 0
    assert len(Quarantine(tmp_path / "quarantine").events()) == 3


def test_a_server_starts_with_such_a_record_in_its_wal_and_reports_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    records, bad = segment_with_one_bad_record()
    wal = WriteAheadLog(data / "wal")
    wal.append(records)
    wal.close()
    with open_harness(data) as harness:  # recovery replays the WAL: this used to raise OverflowError
        health = harness.client.get("/healthz").json()
        assert health["quarantined_events"] == 1
        assert "custody_quarantined_events 1.0" in harness.client.get("/metrics").text
    assert [row[1] for row in read_lake(data, "emitter, seq") if row[0] == "gw-1"] == [1, 2, 4]
    assert not (data / "wal" / "000000000001.wal").exists()  # its events are all in the lake or the quarantine
    assert [event.record for event in Quarantine(data / "quarantine").events()] == [bad]


def test_the_flusher_quarantines_and_names_the_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "data", writer_process=False)
    store.open()
    records, bad = segment_with_one_bad_record()
    store.append(records)
    store.flush()
    assert store.flush_stats.quarantined_events == 1
    assert store.flush_stats.last_error is None
    assert f"acknowledged event {bad.event_id} cannot be stored in the lake and is quarantined" in caplog.text
    more, _ = record(5, records[-1].event_hash)
    store.append([more])  # later events of every tenant still reach the lake
    store.flush()
    store.close()
    assert [row[0] for row in read_lake(tmp_path / "data", "seq")] == [1, 2, 4, 5]


def test_quarantine_list_and_reingest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    lake = Lake(data / "lake")
    records, bad = segment_with_one_bad_record()
    lake.write_segment(3, records)
    # An event an older version refused although the lake can hold it, as after an upgrade.
    storable, _ = record(9, "0" * 64)
    lake.quarantine.put(4, [(storable, "refused by an older version")])

    assert main(["quarantine", "list", "--data-dir", str(data)]) == 0
    listed = capsys.readouterr().out
    assert f"segment 3: event {bad.event_id} (gw-1 seq 3): credential_expires_at" in listed
    assert f"segment 4: event {storable.event_id} (gw-1 seq 9): refused by an older version" in listed
    assert "2 quarantined events" in listed
    assert main(["quarantine", "list", "--data-dir", str(data), "--tenant", "acme", "--json"]) == 0
    assert [orjson.loads(line)["tenant"] for line in capsys.readouterr().out.splitlines()] == ["acme", "acme"]
    assert main(["quarantine", "list", "--data-dir", str(data), "--tenant", "globex"]) == 0
    assert capsys.readouterr().out == "0 quarantined events\n"

    assert main(["quarantine", "reingest", "--data-dir", str(data)]) == 1  # one is still refused
    out = capsys.readouterr().out
    assert f"FAIL: event {bad.event_id} is still refused and stays quarantined" in out
    assert "1 events written to the lake" in out
    assert sorted(row[0] for row in read_lake(data, "seq")) == [1, 2, 4, 9]
    [left] = Quarantine(data / "quarantine").events()
    assert left.record == bad
    assert left.segment == 5  # numbered above everything the lake held; the WAL starts above it
    assert not list((data / "quarantine").glob("reingest-*"))

    store = Store(data, writer_process=False)
    store.open()
    assert store.wal.active_segment > 5
    store.close()


def test_an_interrupted_reingest_is_finished_without_writing_an_event_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lake = Lake(data / "lake")
    storable, _ = record(1, "0" * 64)
    lake.quarantine.put(2, [(storable, "refused by an older version")])
    number, records = lake.quarantine.begin_reingest(3)  # the manifest is durable ...
    assert records == [storable]
    lake.write_segment(number, records)  # ... the lake got the event, then the process died
    assert reingest_quarantined(data).written == 0
    assert [row[0] for row in read_lake(data, "event_id")] == [storable.event_id]
    assert not list((data / "quarantine").glob("*.jsonl"))


@pytest.mark.parametrize(
    ("field", "value", "column"),
    [
        (
            "credential",
            {"id": "t", "kind": "api_key", "client_id": "c", "scopes": [], "expires_at": 2**53 - 1},
            "credential_expires_at",
        ),
        ("seq", 2**63, "seq"),
        ("occurred_at", "2026-01-01T00:00:00", "occurred_at"),
    ],
)
def test_the_verifiers_check_and_the_writers_agree(field: str, value: object, column: str) -> None:
    from store.rows import Signed, row_problem, row_values, typed_problem

    body = payload("gw-1", 1, "0" * 64, "acme")
    assert typed_problem(body) is None
    assert row_problem(row_values(Signed(body, "x.y.z", "k1", "0" * 64, 0))) is None
    body[field] = value
    verifier = typed_problem(body)
    writer = row_problem(row_values(Signed(body, "x.y.z", "k1", "0" * 64, 0)))
    assert verifier == writer
    assert verifier is not None
    assert verifier.startswith(f"{column}:")
