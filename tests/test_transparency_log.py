"""The transparency log in a running server: log indexes in acks and in the lake, signed receipts, checkpoints,
tiles and proofs over HTTP, recovery after a restart or lost tiles, and refusal of a lake that lost an event."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from custody.cli import main
from query.api import create_query_app
from query.tokens import TokenStore
from query.verify.log import LogCheck, _rebuild, log_key_of
from store.engine import Store
from store.ground.errors import CorruptState
from store.ground.jws import decode_payload, parse_compact, verify_signature
from store.ground.layout import DataDir
from store.ground.tlog import NoteKey, leaf_hash, open_checkpoint, verify_consistency, verify_inclusion
from store.merkle_log import LogReader, MerkleLog
from tests.conftest import Harness, open_harness, read_lake
from tests.signing import chain
from tests.test_tlog_math import naive_root

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL


def log_key(data: Path) -> NoteKey:
    return log_key_of(data)


def post_chain(harness: Harness, emitter: str, count: int) -> dict[str, Any]:
    """A new emitter's first ``count`` events, posted ``max_events`` at a time; the results of them all."""
    key, kid = harness.register(emitter)
    tokens, _ = chain(emitter, count, key, kid)
    results: list[dict[str, Any]] = []
    body: dict[str, Any] = {}
    for start in range(0, count, 50):
        body = harness.post(tokens[start : start + 50])
        results += body["results"]
    return {**body, "results": results}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_acks_number_events_and_sign_a_receipt(harness: Harness) -> None:
    body = post_chain(harness, "gw-1", 5)
    assert all(result["status"] == "accepted" for result in body["results"])
    indexes = [result["log_index"] for result in body["results"]]
    first = indexes[0]
    assert indexes == list(range(first, first + 5))  # after the server's own admin events
    again = harness.post([])
    assert again["receipt"] is None
    receipt = parse_compact(body["receipt"])
    server_key = DataDir(harness.data_dir).server_key().public_key()
    assert verify_signature(receipt, server_key)
    claims = decode_payload(body["receipt"])
    assert claims["log"] == log_key(harness.data_dir).name
    assert [(e["event_id"], e["log_index"]) for e in claims["events"]] == [
        (r["event_id"], r["log_index"]) for r in body["results"]
    ]
    harness.flush()
    rows = read_lake(harness.data_dir, "event_id, log_index")
    assert {row[0]: row[1] for row in rows if row[0] in claims["events"][0].values()} == {
        claims["events"][0]["event_id"]: first
    }
    assert sorted(row[1] for row in rows) == list(range(len(rows)))  # every event, admin ones too, numbered once


def test_checkpoints_tiles_and_proofs_over_http(harness: Harness) -> None:
    first = post_chain(harness, "gw-1", 3)
    merkle = harness.server.store.merkle
    merkle.publish()
    old = open_checkpoint(harness.client.get("/checkpoint").text, log_key(harness.data_dir))
    results = post_chain(harness, "gw-2", 300)["results"]  # crosses a full level-0 tile
    merkle.publish()
    response = harness.client.get("/checkpoint")
    assert response.headers["content-type"].startswith("text/plain")
    new = open_checkpoint(response.text, log_key(harness.data_dir))
    assert new.size == merkle.size >= old.size + 300  # and the admin events that registered gw-2

    proof = harness.client.get("/v1/log/consistency", params={"from": old.size, "to": new.size}).json()
    verify_consistency(old.size, new.size, [base64.b64decode(h) for h in proof["proof"]], old.root, new.root)

    event = first["results"][1]
    rows = {row[0]: row[1] for row in _hashes(harness)}
    leaf = leaf_hash(bytes.fromhex(rows[event["event_id"]]))
    path = merkle.inclusion(event["log_index"], new.size)
    verify_inclusion(leaf, event["log_index"], new.size, path, new.root)

    full = harness.client.get("/tile/0/000")
    assert full.status_code == 200
    assert len(full.content) == 8192
    assert full.content[32 * event["log_index"] : 32 * event["log_index"] + 32] == leaf
    entries = harness.client.get("/tile/entries/000").content
    assert entries[34 * event["log_index"] : 34 * event["log_index"] + 34] == b"\x00\x20" + bytes.fromhex(
        rows[event["event_id"]]
    )
    width = new.size % 256
    partial = harness.client.get(f"/tile/0/001.p/{width}")
    assert len(partial.content) == 32 * width
    last = results[-1]
    assert partial.content[-32:] == leaf_hash(bytes.fromhex(rows[last["event_id"]]))

    for bad in ("0/1", "0/000.p/256", "64/000", "0/x1/000", "../state/server_key.pem", "0/000.p/0"):
        answer = harness.client.get(f"/tile/{bad}")
        assert answer.status_code == 404, bad
        assert answer.json()["error"]["code"] == "not_found"
    beyond = harness.client.get("/v1/log/consistency", params={"from": 1, "to": new.size + 1})
    assert beyond.status_code == 400
    assert "beyond the log's newest checkpoint" in beyond.json()["error"]["message"]


def _hashes(harness: Harness) -> list[tuple[str, str]]:
    harness.flush()
    return [(row[0], row[1]) for row in read_lake(harness.data_dir, "event_id, event_hash")]


def test_the_tree_survives_a_restart_and_lost_tiles(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_harness(data) as harness:
        post_chain(harness, "gw-1", 40)
        harness.server.store.merkle.publish()
        before = open_checkpoint(harness.client.get("/checkpoint").text, log_key(data))
    with open_harness(data) as harness:  # right edge from the tiles; same tree, numbering goes on
        assert harness.server.store.merkle.root(before.size) == before.root
        key, kid = harness.register("gw-9")
        tokens, _ = chain("gw-9", 1, key, kid)
        [result] = harness.post(tokens)["results"]
        harness.server.store.merkle.publish()
        assert result["log_index"] == harness.server.store.merkle.size - 1
        size_after = harness.server.store.merkle.size
    shutil.rmtree(DataDir(data).log_tiles)
    with open_harness(data) as harness:  # every tile rebuilt from the lake
        merkle = harness.server.store.merkle
        assert merkle.size == size_after
        assert merkle.root(before.size) == before.root
        history = [orjson.loads(line) for line in DataDir(data).checkpoint_history.read_bytes().splitlines()]
        assert [record["size"] for record in history] == sorted({record["size"] for record in history})


def test_a_lake_that_lost_an_acknowledged_event_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_harness(data) as harness:
        post_chain(harness, "gw-1", 10)
        harness.flush()
    layout = DataDir(data)
    shutil.rmtree(layout.log_tiles)  # force a rebuild from the lake
    [path] = [p for p in layout.events.rglob("*.parquet") if "tenant=acme" in str(p)]
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.not_equal(table["seq"], 4)), path)  # one acknowledged event gone
    with pytest.raises(CorruptState, match=r"no event at log index \d+"), open_harness(data):
        pass


# -- custody verify against the log ---------------------------------------------------------------------------


def served(data: Path, emitters: int = 2, events: int = 30) -> tuple[str, str]:
    """A data dir with ``emitters`` streams, flushed; the newest checkpoint and the log's verifier key."""
    with open_harness(data) as harness:
        for n in range(emitters):
            post_chain(harness, f"gw-{n}", events)
        harness.flush()
        harness.server.store.merkle.publish()
        note = harness.client.get("/checkpoint").text
    return note, log_key(data).vkey


def drop_rows(data: Path, emitter: str, seqs: set[int]) -> None:
    for path in DataDir(data).events.rglob("*.parquet"):
        table = pq.read_table(path)
        keep = pc.invert(pc.and_(pc.equal(table["emitter"], emitter), pc.is_in(table["seq"], pa.array(sorted(seqs)))))
        if table.filter(keep).num_rows != table.num_rows:
            pq.write_table(table.filter(keep), path)


def verify(data: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["verify", "--data-dir", str(data), "--no-progress", *extra])
    return code, out.getvalue()


def test_a_clean_lake_verifies_against_its_checkpoint(tmp_path: Path) -> None:
    served(tmp_path / "data")
    code, out = verify(tmp_path / "data")
    assert code == 0, out
    assert "transparency log: 6" in out
    assert "leaves rebuilt, checkpoint " in out


def test_deleting_state_and_the_newest_event_of_a_stream_is_detected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    note, vkey = served(data)
    (tmp_path / "checkpoint").write_text(note)
    shutil.rmtree(DataDir(data).state)  # the heads, the registry and the server key: all gone
    drop_rows(data, "gw-1", {30})
    for extra in ([], ["--hash-chain-only"], ["--incremental"]):
        code, out = verify(data, "--log-key", vkey, "--checkpoint", str(tmp_path / "checkpoint"), *extra)
        assert code == 1, (extra, out)
        assert "log_root: expected " in out, out
        assert "acknowledged events are missing at the end" in out
    # the operator also rewrote log/ to match: the checkpoint the auditor kept still catches it
    shutil.rmtree(DataDir(data).log)
    code, out = verify(data, "--log-key", vkey, "--checkpoint", str(tmp_path / "checkpoint"), "--hash-chain-only")
    assert code == 1
    assert "acknowledged events are missing at the end" in out


def test_deleting_state_sqlite_and_the_newest_events_is_detected_from_the_data_dirs_own_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served(data)
    DataDir(data).state_db.unlink()
    drop_rows(data, "gw-0", {29, 30})
    code, out = verify(data)
    assert code == 1
    assert "FAIL: lake: log_root" in out


def test_deleting_any_single_event_is_detected_and_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served(data)
    rows = read_lake(data, "emitter, seq, log_index")
    [(index,)] = [(row[2],) for row in rows if row[0] == "gw-0" and row[1] == 12]
    drop_rows(data, "gw-0", {12})
    code, out = verify(data, "--hash-chain-only")
    assert code == 1
    assert f"log_missing: expected an event at log index {index}, found none in the lake" in out


def test_a_log_without_its_checkpoints_is_a_failure_not_an_ok(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served(data)
    shutil.rmtree(DataDir(data).log)
    code, out = verify(data, "--hash-chain-only")
    assert code == 1
    assert "checkpoint_missing" in out


def test_a_forged_checkpoint_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    note, _ = served(data)
    lines = note.split("\n")
    lines[1] = str(int(lines[1]) - 1)
    (tmp_path / "forged").write_text("\n".join(lines))
    code, out = verify(data, "--checkpoint", str(tmp_path / "forged"), "--hash-chain-only")
    assert code == 1
    assert "checkpoint_signature" in out
    assert "does not verify" in out


# -- the read API ---------------------------------------------------------------------------------------------


def test_the_read_api_proves_inclusion_within_the_callers_tenant(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_harness(data) as harness:
        acme = post_chain(harness, "gw-acme", 20)["results"]
        key, kid = harness.register("gw-globex", tenant="globex")
        tokens, _ = chain("gw-globex", 3, key, kid, tenant="globex")
        harness.post(tokens)
        harness.flush()
        harness.server.store.merkle.publish()
    store = TokenStore(tmp_path / "tokens.json")
    everyone, globex = store.issue("aud", "auditor", None), store.issue("gab", "auditor", "globex")
    with TestClient(create_query_app(data, store)) as api:
        event = acme[7]
        answer = api.get("/v1/log/inclusion", params={"event_id": event["event_id"]}, headers=_bearer(everyone))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        checkpoint = open_checkpoint(body["checkpoint"], log_key(data))
        assert (body["log_index"], body["tree_size"]) == (event["log_index"], checkpoint.size)
        proof = [base64.b64decode(item) for item in body["proof"]]
        verify_inclusion(
            leaf_hash(bytes.fromhex(body["event_hash"])), body["log_index"], checkpoint.size, proof, checkpoint.root
        )
        smaller = api.get(
            "/v1/log/inclusion",
            params={"event_id": event["event_id"], "tree_size": event["log_index"] + 1},
            headers=_bearer(everyone),
        ).json()
        assert smaller["checkpoint"] is None
        assert smaller["tree_size"] == event["log_index"] + 1
        too_small = api.get(
            "/v1/log/inclusion",
            params={"event_id": event["event_id"], "tree_size": event["log_index"]},
            headers=_bearer(everyone),
        )
        assert too_small.status_code == 400
        assert "not in the tree of size" in too_small.json()["error"]["message"]
        hidden = api.get("/v1/log/inclusion", params={"event_id": event["event_id"]}, headers=_bearer(globex))
        assert hidden.status_code == 404  # another tenant's event does not exist for this token
        proof_body = api.get(
            "/v1/log/consistency", params={"from": 5, "to": checkpoint.size}, headers=_bearer(globex)
        ).json()
        old_root = LogReader(DataDir(data)).root(5)
        verify_consistency(
            5, checkpoint.size, [base64.b64decode(h) for h in proof_body["proof"]], old_root, checkpoint.root
        )
        assert api.get("/v1/log/checkpoint", headers=_bearer(globex)).text == body["checkpoint"]
        assert api.get("/v1/log/checkpoint").status_code == 401


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_custody_log_key_prints_the_verifier_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    served(tmp_path / "data", emitters=1, events=1)
    assert main(["log", "key", "--data-dir", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == log_key(tmp_path / "data").vkey
    assert NoteKey.from_vkey(printed).name.startswith("custody/")


def test_an_access_review_names_the_checkpoint_it_was_computed_at(tmp_path: Path) -> None:
    data = tmp_path / "data"
    note, _ = served(data, emitters=1, events=3)
    target = tmp_path / "review.json"
    write = ["recert", "write", "--data-dir", str(data), "--tenant", "acme", "--format", "json"]
    assert main([*write, "--output", str(target)]) == 0
    position = orjson.loads(target.read_bytes())["report"]["log_position"]
    checkpoint = open_checkpoint(note, log_key(data))
    assert position["checkpoint"] == {
        "origin": checkpoint.origin,
        "size": checkpoint.size,
        "root": base64.b64encode(checkpoint.root).decode(),
    }
    assert main(["recert", "verify", str(target), "--data-dir", str(data)]) == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2100), st.data())
def test_the_verifiers_tree_rebuild_equals_the_naive_tree(size: int, data: st.DataObject) -> None:
    """verify's fold (whole aligned blocks of 256 leaves at once, single leaves between) gives RFC 6962 roots at
    every size asked for, sizes inside a block included; a hole stops it and is named."""
    leaves = [hashlib.sha256(n.to_bytes(4, "big")).digest() for n in range(size)]
    sizes = sorted(set(data.draw(st.lists(st.integers(0, size), max_size=4))) | {size})
    check = LogCheck()
    roots = _rebuild(pa.array(range(size), pa.int64()), pa.array([leaf.hex() for leaf in leaves]), sizes, check, None)
    assert (check.tree_size, check.problems) == (size, [])
    assert all(roots[n] == naive_root(leaves[:n]) for n in sizes)
    if size > 2:
        hole = data.draw(st.integers(1, size - 2))
        kept = [n for n in range(size) if n != hole]
        check = LogCheck()
        _rebuild(pa.array(kept, pa.int64()), pa.array([leaves[n].hex() for n in kept]), [size], check, None)
        assert check.tree_size == hole
        assert [problem.check for problem in check.problems] == ["log_missing"]
        assert f"an event at log index {hole}" in check.problems[0].expected


def test_tiles_written_after_the_last_sync_are_rebuilt_after_a_crash(tmp_path: Path) -> None:
    """Tiles reach the disk in batches (one syncfs every sync_interval): after a crash, recovery starts from the
    last synced checkpoint's edge, and tiles written after it, torn or lost, are written again from the lake."""
    data = tmp_path / "data"
    layout = DataDir(data)
    with open_harness(data) as harness:
        post_chain(harness, "gw-1", 100)
        merkle = harness.server.store.merkle
        merkle.publish()
        merkle.sync()
        synced = layout.tiles_durable.read_bytes()
        before = {path: path.read_bytes() for path in layout.log_tiles.rglob("*") if path.is_file()}
        post_chain(harness, "gw-2", 300)  # completes the first level-0 tile and more, after the sync
        merkle.publish()
        final = open_checkpoint(harness.client.get("/checkpoint").text, log_key(data))
        harness.flush()
    layout.tiles_durable.write_bytes(synced)  # as if the crash came before the next sync:
    for path, content in before.items():  # the synced tiles are there (the full tile had replaced them)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    torn = [path for path in layout.log_tiles.rglob("*") if path.is_file() and path not in before]
    assert torn
    for path in torn:
        path.write_bytes(b"\0" * 7)  # written, never synced: torn
    messages: list[str] = []
    recovered = MerkleLog(layout)
    recovered.recover(Store(data, writer_process=False)._leaves_from, messages.append)
    assert not any("rebuilding" in message for message in messages), messages  # from the synced edge
    assert recovered.root(final.size) == final.root
    assert len(recovered.tiles.hashes(0, 0, 256) or b"") == 8192
    with open_harness(data) as harness:
        assert harness.server.store.merkle.root(final.size) == final.root


def test_hostile_tile_paths_and_proof_sizes_are_clean_errors(harness: Harness) -> None:
    post_chain(harness, "gw-1", 3)
    harness.server.store.merkle.publish()
    for path in ("0/" + "x001/" * 10_000 + "000", "0/" + "9" * 5000, "entries/000.p/" + "9" * 5000):
        answer = harness.client.get(f"/tile/{path}")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
    huge = harness.client.get("/v1/log/consistency", params={"from": 1, "to": 10**30})
    assert huge.status_code == 400


def test_the_log_check_in_a_process_of_its_own_finds_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a lake big enough for worker processes, the tree is rebuilt in a process beside the lake's checks."""
    monkeypatch.setattr("query.verify.run._WORTH_PROCESSES", 0)
    data = tmp_path / "data"
    served(data)
    rows = read_lake(data, "emitter, seq, log_index")
    [index] = [row[2] for row in rows if row[0] == "gw-1" and row[1] == 7]
    drop_rows(data, "gw-1", {7})
    code, out = verify(data, "--workers", "2")
    assert code == 1
    assert f"log_missing: expected an event at log index {index}" in out
