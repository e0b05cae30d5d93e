"""`custody verify` on a lake written by the real ingest path, then tampered with on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from custody.cli import main
from ingest.sdk import generate_key
from query.verify.integrity import verify_event, verify_lake
from query.verify.report import IntegrityReport
from store.ground.canonical import canonicalize, event_hash
from store.ground.jws import decode_payload
from store.schema import EVENT_SCHEMA, Signed, event_table
from tests.conftest import ADMIN, REPO, Harness, read_lake
from tests.signing import chain, sign


@pytest.fixture
def lake(harness: Harness) -> Harness:
    """gw-1: seq 1-5 in one segment, 6-10 in the next; gw-2: seq 1-3."""
    key, kid = harness.register("gw-1")
    tokens, _ = chain("gw-1", 10, key, kid)
    harness.post(tokens[:5])
    harness.flush()
    harness.post(tokens[5:])
    key2, kid2 = harness.register("gw-2", tenant="globex")
    harness.post(chain("gw-2", 3, key2, kid2, tenant="globex")[0])
    harness.flush()
    return harness


def files_of(harness: Harness, emitter: str) -> list[Path]:
    return [path for path in harness.server.store.lake.files() if emitter in pq.read_table(path)["emitter"].to_pylist()]


def rewrite(path: Path, edit) -> None:
    rows = pq.read_table(path).to_pylist()
    pq.write_table(pa.Table.from_pylist(edit(rows), schema=EVENT_SCHEMA), path)


def problems(report: IntegrityReport) -> list[tuple[str | None, int | None, str]]:
    return [(p.emitter, p.seq, p.check) for p in report.problems]


def test_an_untouched_lake_verifies(lake: Harness) -> None:
    report = verify_lake(lake.data_dir)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.events == 13 + 5  # admin events: the server key, then per emitter: registered, key added
    assert report.emitters == {"custody.server": 5, "gw-1": 10, "gw-2": 3}


def test_an_edited_column_with_an_intact_jws_is_caught(lake: Harness) -> None:
    def edit(rows):
        for row in rows:
            if row["emitter"] == "gw-1" and row["seq"] == 3:
                row["tool_name"] = "delete_all_tickets"
        return rows

    rewrite(files_of(lake, "gw-1")[0], edit)
    report = verify_lake(lake.data_dir)
    assert problems(report) == [("gw-1", 3, "column tool_name")]
    assert "expected 'read_ticket', found 'delete_all_tickets'" in report.problems[0].describe()


def test_an_edited_hash_column_is_caught(lake: Harness) -> None:
    def edit(rows):
        rows[1]["event_hash"] = "f" * 64
        return rows

    rewrite(files_of(lake, "gw-2")[0], edit)
    assert ("gw-2", 2, "event_hash") in problems(verify_lake(lake.data_dir))


def test_a_deleted_row_breaks_the_chain_at_the_next_event(lake: Harness) -> None:
    rewrite(files_of(lake, "gw-1")[0], lambda rows: [r for r in rows if not (r["emitter"] == "gw-1" and r["seq"] == 3)])
    report = verify_lake(lake.data_dir)
    assert problems(report) == [("gw-1", 4, "chain_seq")]
    assert "expected seq 3, found seq 4" in report.problems[0].describe()


def test_swapped_rows_are_caught(lake: Harness) -> None:
    def edit(rows):
        mine = [r for r in rows if r["emitter"] == "gw-1"]
        mine[1]["jws"], mine[2]["jws"] = mine[2]["jws"], mine[1]["jws"]
        return rows

    rewrite(files_of(lake, "gw-1")[0], edit)
    found = problems(verify_lake(lake.data_dir))
    assert ("gw-1", 2, "column seq") in found
    assert ("gw-1", 3, "column seq") in found


def test_dropped_last_events_are_caught_against_the_servers_heads(lake: Harness) -> None:
    rewrite(files_of(lake, "gw-1")[1], lambda rows: [r for r in rows if r["seq"] < 9])
    report = verify_lake(lake.data_dir)
    assert problems(report) == [("gw-1", 9, "stream_end")]
    assert "expected events up to seq 10" in report.problems[0].describe()


def test_a_deleted_file_is_caught(lake: Harness) -> None:
    files_of(lake, "gw-1")[0].unlink()
    report = verify_lake(lake.data_dir)
    assert problems(report) == [("gw-1", 6, "chain_seq")]
    assert "expected seq 1, found seq 6" in report.problems[0].describe()


@pytest.mark.parametrize(("registered_kid", "check"), [(False, "key"), (True, "signature")])
def test_a_file_resigned_with_another_key_is_caught(lake: Harness, registered_kid: bool, check: str) -> None:
    evil = generate_key()
    path = files_of(lake, "gw-1")[1]
    kid = lake.client.get("/v1/emitters/gw-1", headers=ADMIN).json()["keys"][0]["kid"] if registered_kid else "evil"

    def resign(rows):
        previous = None
        out = []
        for row in rows:
            payload = decode_payload(row["jws"])
            payload["outcome"] = "error"
            if previous is not None:
                payload["prev_hash"] = previous
            digest = event_hash(canonicalize(payload))
            jws = sign(payload, evil, kid)
            received_us = int(row["received_at"].timestamp()) * 1_000_000 + row["received_at"].microsecond
            out.append(event_table([Signed(payload, jws, kid, digest, received_us)]).to_pylist()[0])
            previous = digest
        return out

    rewrite(path, resign)
    # A consistent forgery: hashes, columns and the chain all agree; only the signatures give it away.
    assert problems(verify_lake(lake.data_dir)) == [("gw-1", seq, check) for seq in range(6, 11)]


def test_a_file_moved_to_another_tenant_is_caught(lake: Harness) -> None:
    path = files_of(lake, "gw-2")[0]
    target = Path(str(path).replace("tenant=globex", "tenant=acme")).with_name("seg-999999999999.parquet")
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    assert {check for _, _, check in problems(verify_lake(lake.data_dir))} == {"partition"}


def test_the_cli_prints_fail_lines_and_exits_1(lake: Harness) -> None:
    command = [sys.executable, "-m", "custody.cli", "verify", "--data-dir", str(lake.data_dir), "--no-progress"]
    clean = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("OK: 18 events from 3 emitters")
    files_of(lake, "gw-1")[0].unlink()
    broken = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert broken.returncode == 1
    assert "FAIL: gw-1 seq 6" in broken.stdout
    assert "chain_seq: expected seq 1, found seq 6" in broken.stdout


@pytest.mark.parametrize("mode", [[], ["--hash-chain-only"], ["--incremental"]])
def test_the_cli_reports_one_tenant_as_json(lake: Harness, mode: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    files_of(lake, "gw-1")[0].unlink()
    command = ["verify", "--data-dir", str(lake.data_dir), "--no-progress", "--json", *mode]
    assert main([*command, "--tenant", "globex"]) == 0
    globex = orjson.loads(capsys.readouterr().out)
    assert (globex["ok"], globex["events"], globex["emitters"], globex["problems"]) == (True, 3, {"gw-2": 3}, [])
    assert main([*command, "--tenant", "acme"]) == 1
    acme = orjson.loads(capsys.readouterr().out)
    assert acme["ok"] is False
    assert {problem["emitter"] for problem in acme["problems"]} == {"gw-1"}
    assert all(problem["tenant"] == "acme" for problem in acme["problems"])
    assert "chain_seq: expected seq 1, found seq 6" in acme["problems"][0]["description"]


def test_timestamps_in_every_form_land_typed_and_verify(harness: Harness) -> None:
    from datetime import UTC, datetime

    from tests.conftest import invocation, read_lake
    from tests.signing import payload

    key, kid = harness.register("gw-t")
    credential = dict(invocation()["credential"], expires_at=1_900_000_000)  # epoch seconds
    first = payload("gw-t", occurred_at="2026-11-28T23:59:59.123456Z", credential=credential)
    second = payload(
        "gw-t",
        2,
        event_hash(canonicalize(first)),
        occurred_at="2026-11-29T00:00:00Z",
        type="credential.revoked",
        revoked_at="2026-11-29T00:00:00.5Z",
        reason="leaked",
        tool=None,
        decision=None,
    )
    body = harness.post([sign(first, key, kid), sign(second, key, kid)])
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted"], body
    harness.flush()
    rows = read_lake(harness.data_dir, "emitter, date, occurred_at, credential_expires_at, revoked_at")
    mine = [row[1:] for row in rows if row[0] == "gw-t"]
    assert [str(row[0]) for row in mine] == ["2026-11-28", "2026-11-29"]
    assert mine[0][1] == datetime(2026, 11, 28, 23, 59, 59, 123456, tzinfo=UTC)
    assert mine[0][2] == datetime.fromtimestamp(1_900_000_000, tz=UTC)
    assert mine[1][3] == datetime(2026, 11, 29, 0, 0, 0, 500000, tzinfo=UTC)
    assert verify_lake(harness.data_dir).ok


def test_hash_chain_only_mode_catches_the_same_structural_damage(lake: Harness) -> None:
    from query.verify.chains import verify_chains

    assert verify_chains(lake.data_dir).ok
    rewrite(files_of(lake, "gw-1")[0], lambda rows: [r for r in rows if not (r["emitter"] == "gw-1" and r["seq"] == 3)])

    def edit(rows):
        rows[1]["event_hash"] = "f" * 64
        return rows

    rewrite(files_of(lake, "gw-2")[0], edit)
    rewrite(files_of(lake, "gw-1")[1], lambda rows: [r for r in rows if r["seq"] < 10])
    found = problems(verify_chains(lake.data_dir))
    assert ("gw-1", 4, "chain_seq") in found
    assert ("gw-2", 2, "event_hash") in found
    assert ("gw-1", 10, "stream_end") in found


def test_hash_chain_only_is_indifferent_to_row_order_and_row_groups_but_not_to_repeats(lake: Harness) -> None:
    from query.verify.chains import verify_chains

    # Rows stored in reverse, in row groups of 2: the chain is by seq, whatever the layout, and is stitched
    # across row groups and files.
    for path in lake.server.store.lake.files():
        table = pq.read_table(path)
        pq.write_table(table.take(list(reversed(range(table.num_rows)))), path, row_group_size=2)
    report = verify_chains(lake.data_dir)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.events == 18
    assert report.emitters == {"custody.server": 5, "gw-1": 10, "gw-2": 3}
    assert report.tenants["gw-2"] == "globex"

    # A copy of gw-1's seq 7 written again into the first file: one event too many, reported where it is.
    first, second = files_of(lake, "gw-1")
    repeated = [r for r in pq.read_table(second).to_pylist() if r["seq"] == 7]
    rewrite(first, lambda rows: rows + repeated)
    found = [(p.emitter, p.seq, p.check, p.expected, p.actual) for p in verify_chains(lake.data_dir).problems]
    assert found == [("gw-1", 7, "chain_seq", "seq 8", "seq 7")], found


def test_hash_chain_only_reports_an_undecodable_payload_and_an_edited_link(lake: Harness) -> None:
    from query.verify.chains import verify_chains

    def edit(rows):
        for row in rows:
            if row["emitter"] == "gw-1" and row["seq"] == 2:
                header, _, signature = row["jws"].split(".")
                row["jws"] = f"{header}.not*base64.{signature}"
            if row["emitter"] == "gw-1" and row["seq"] == 4:
                row["prev_hash"] = "0" * 64
        return rows

    rewrite(files_of(lake, "gw-1")[0], edit)
    found = {(p.emitter, p.seq, p.check): p for p in verify_chains(lake.data_dir).problems}
    assert set(found) == {("gw-1", 2, "event_hash"), ("gw-1", 4, "chain_link")}
    assert found[("gw-1", 2, "event_hash")].expected == "a base64url JSON payload"
    assert found[("gw-1", 4, "chain_link")].actual == "prev_hash " + "0" * 64
    assert found[("gw-1", 4, "chain_link")].file.startswith("tenant=acme/date=")


def test_hash_chain_only_accepts_non_canonical_payloads(harness: Harness) -> None:
    import orjson

    from query.verify.chains import verify_chains
    from tests.signing import payload, sign_raw

    key, kid = harness.register("gw-nc")
    first = payload("gw-nc")
    second = payload("gw-nc", 2, event_hash(canonicalize(first)))
    tokens = [sign_raw(orjson.dumps(body, option=orjson.OPT_INDENT_2), key, kid) for body in (first, second)]
    assert [r["status"] for r in harness.post(tokens)["results"]] == ["accepted", "accepted"]
    harness.flush()
    report = verify_chains(harness.data_dir)
    assert report.ok, [p.describe() for p in report.problems]
    assert verify_lake(harness.data_dir).ok


def test_incremental_verification_rechecks_only_what_changed_and_trusts_nothing_editable(lake: Harness) -> None:
    from query.verify.checkpoint import verify_since_checkpoint
    from tests.signing import chain as signed_chain

    report, mode = verify_since_checkpoint(lake.data_dir)
    assert report.ok
    assert mode == "full verification (no checkpoint yet)"
    report, mode = verify_since_checkpoint(lake.data_dir)
    assert report.ok
    assert mode.startswith("incremental: signatures and columns of 0 new or changed of ")
    assert report.events == 18  # hashes and chains still cover everything

    key, kid = lake.register("gw-3")
    lake.post(signed_chain("gw-3", 4, key, kid)[0])
    lake.flush()
    report, mode = verify_since_checkpoint(lake.data_dir)
    assert report.ok, [p.describe() for p in report.problems]
    assert mode.startswith("incremental: signatures and columns of 2 new or changed")  # gw-3's file, admin's

    def edit(rows):
        for row in rows:
            if row["emitter"] == "gw-1" and row["seq"] == 2:
                row["decision_result"] = "deny"
        return rows

    rewrite(files_of(lake, "gw-1")[0], edit)  # an old, already verified file
    report, _ = verify_since_checkpoint(lake.data_dir)
    assert problems(report) == [("gw-1", 2, "column decision_result")]


def test_incremental_verification_catches_a_deleted_file_and_a_forged_checkpoint(lake: Harness) -> None:
    from query.verify.checkpoint import verify_since_checkpoint

    assert verify_since_checkpoint(lake.data_dir)[0].ok
    files_of(lake, "gw-1")[0].unlink()
    report, _ = verify_since_checkpoint(lake.data_dir)
    assert ("gw-1", 6, "chain_seq") in problems(report)

    checkpoint = lake.data_dir / "state" / "verify-checkpoint.jws"
    forged = sign({"v": 1, "created_at": "2026-01-01T00:00:00Z", "files": {}}, generate_key(), "x")
    checkpoint.write_text(forged)
    report, mode = verify_since_checkpoint(lake.data_dir)
    assert mode == "full verification (checkpoint signature does not verify with the server key)"
    assert report.problems[0].check == "checkpoint"


@pytest.mark.parametrize("with_day", [False, True])
def test_one_event_check_catches_an_edited_column_and_a_broken_link(lake: Harness, with_day: bool) -> None:
    rows = {(r[0], r[1]): (r[2], r[3]) for r in read_lake(lake.data_dir, "emitter, seq, event_id, date")}
    event_3, day = rows[("gw-1", 3)]
    hint = {"day": day} if with_day else {}
    assert verify_event(lake.data_dir, event_3, **hint) == []
    assert verify_event(lake.data_dir, rows[("gw-1", 6)][0], **hint) == []  # its predecessor is in another file

    def edit(rows):
        for row in rows:
            if row["emitter"] == "gw-1" and row["seq"] == 3:
                row["tool_name"] = "delete_all_tickets"
            if row["emitter"] == "gw-1" and row["seq"] == 2:
                row["event_hash"] = "f" * 64
        return rows

    rewrite(files_of(lake, "gw-1")[0], edit)
    found = verify_event(lake.data_dir, event_3, **hint)
    assert [(p.check, p.expected, p.actual) for p in found] == [
        ("chain_link", f"prev_hash {'f' * 64}", found[0].actual),
        ("column tool_name", "'read_ticket'", "'delete_all_tickets'"),
    ]
    assert verify_event(lake.data_dir, "00000000-0000-4000-8000-000000000000", **hint) is None
    assert verify_event(lake.data_dir, event_3, tenant="globex", **hint) is None  # not visible to another tenant


def test_the_verification_in_processes_finds_what_the_one_in_this_process_finds(lake: Harness) -> None:
    """Signatures and columns checked in worker processes (custody verify's default) give the same report."""

    def edit(rows):
        for row in rows:
            if row["emitter"] == "gw-1" and row["seq"] == 3:
                row["tool_name"] = "delete_all_tickets"
        return [row for row in rows if not (row["emitter"] == "gw-1" and row["seq"] == 5)]

    rewrite(files_of(lake, "gw-1")[0], edit)
    rewrite(files_of(lake, "gw-2")[0], lambda rows: [{**rows[0], "event_hash": "f" * 64}, *rows[1:]])
    alone, parallel = verify_lake(lake.data_dir), verify_lake(lake.data_dir, workers=2)
    assert problems(parallel) == problems(alone)
    assert len(problems(alone)) >= 3
    assert (parallel.events, parallel.emitters) == (alone.events, alone.emitters)
