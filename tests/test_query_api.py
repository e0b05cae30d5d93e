"""The read API: every token kind against every endpoint, and nothing of another tenant, ever."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from query.api import create_query_app
from query.lake import LakeReader
from query.tokens import TokenStore
from store.ground.errors import InvalidInput, Unauthorized
from store.object_lake import home_of
from tests import scenario
from tests.conftest import Harness

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL + S3


@pytest.fixture
def api(harness: Harness, tmp_path: Path, backend: str):
    s = scenario.build(harness)
    if backend != "embedded":  # the lake lives on object storage: the API reads it from there, with no copy yet
        harness.flush()
        shutil.rmtree(harness.data_dir / "lake")
    store = TokenStore(tmp_path / "tokens.json")
    tokens = {
        "admin": store.issue("root", "admin", None),
        "analyst-acme": store.issue("ann", "analyst", "acme"),
        "auditor-acme": store.issue("aud", "auditor", "acme"),
        "analyst-globex": store.issue("gil", "analyst", "globex"),
        "auditor-globex": store.issue("gab", "auditor", "globex"),
    }
    with TestClient(create_query_app(harness.data_dir, store)) as client:
        yield client, tokens, s, harness


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def event_ids_of_tenant(harness: Harness, tenant: str) -> set[str]:
    from tests.conftest import read_lake

    return {row[0] for row in read_lake(harness.data_dir, "event_id, tenant") if row[1] == tenant}


ENDPOINTS = [
    ("GET", "/v1/events", {}),
    ("GET", "/v1/events", {"agent": "support-agent"}),
    ("GET", "/v1/events/{export}/path", {}),
    ("GET", "/v1/blast-radius", {"agent": "support-agent"}),
    ("GET", "/v1/blast-radius", {"credential": "tok-sales"}),
    ("GET", "/v1/taint", {"credential": "tok-support", "since": scenario.at(0)}),
    ("GET", "/v1/taint", {"agent": "sales-agent", "since": scenario.at(0), "format": "csv"}),
    ("GET", "/v1/findings", {}),
    ("POST", "/v1/verify", {}),
]


@pytest.mark.parametrize("who", ["admin", "analyst-acme", "auditor-acme", "analyst-globex", "auditor-globex"])
@pytest.mark.parametrize(("method", "path", "params"), ENDPOINTS)
def test_tenant_isolation_matrix(api, who: str, method: str, path: str, params: dict[str, str]) -> None:
    client, tokens, s, harness = api
    response = client.request(method, path.format(export=s.id("export")), params=params, headers=as_(tokens[who]))
    tenant = None if who == "admin" else who.split("-")[1]
    if path == "/v1/verify" and who.startswith("analyst"):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        return
    if path.endswith("/path") and tenant == "globex":
        assert response.status_code == 404  # the acme event is not revealed to exist
        return
    assert response.status_code == 200, response.text
    if tenant is None:
        return
    other = "globex" if tenant == "acme" else "acme"
    leaked = [event_id for event_id in event_ids_of_tenant(harness, other) if event_id in response.text]
    assert leaked == [], f"{who} saw {len(leaked)} events of {other} on {path}"
    body = response.json() if "json" in response.headers["content-type"] else None
    if path == "/v1/events":
        assert {e["tenant"] for e in body["events"]} <= {tenant}
    if path == "/v1/verify":
        assert set(body["emitters"]) == ({"gw-help", "gw-bill"} if tenant == "acme" else {"gw-globex"})


def test_what_each_tenant_sees(api) -> None:
    client, tokens, s, _ = api
    acme = client.get("/v1/events", headers=as_(tokens["analyst-acme"])).json()
    globex = client.get("/v1/events", headers=as_(tokens["analyst-globex"])).json()
    everything = client.get("/v1/events", headers=as_(tokens["admin"])).json()
    assert (acme["total"], globex["total"], everything["total"]) == (22, 2, 24)
    reach = client.get("/v1/blast-radius", params={"agent": "support-agent"}, headers=as_(tokens["analyst-globex"]))
    assert reach.json()["events"] == 0
    findings = client.get("/v1/findings", headers=as_(tokens["analyst-globex"])).json()
    assert [(f["kind"], f["subject"]) for f in findings] == [("cross_tenant", "sales-agent (globex -> acme)")]
    path = client.get(f"/v1/events/{s.id('export')}/path", headers=as_(tokens["analyst-acme"])).json()
    assert [node["label"] for node in path["chain"]][:3] == ["alice@acme.example", "support-agent", "export-subagent"]


def test_asking_for_another_tenant_is_refused(api) -> None:
    client, tokens, _, _ = api
    for path, params in (
        ("/v1/events", {"tenant": "globex"}),
        ("/v1/findings", {"tenant": "globex"}),
        ("/v1/blast-radius", {"agent": "sales-agent", "tenant": "globex"}),
    ):
        response = client.get(path, params=params, headers=as_(tokens["analyst-acme"]))
        assert response.status_code == 403, path
        assert "bound to tenant 'acme'" in response.json()["error"]["message"]


def test_verify_for_a_tenant_shows_only_its_problems(api) -> None:
    client, tokens, _, harness = api
    victim = next(p for p in LakeReader(harness.data_dir).files() if "tenant=globex" in str(p))
    home = home_of(harness.data_dir)
    if home is not None:  # the lake is the object store's: the file is deleted there
        home.delete(str(victim.relative_to(harness.data_dir / "lake")))
        home.refresh(harness.data_dir / "lake", force=True)
    victim.unlink(missing_ok=True)
    acme = client.post("/v1/verify", headers=as_(tokens["auditor-acme"])).json()
    globex = client.post("/v1/verify", headers=as_(tokens["auditor-globex"])).json()
    admin = client.post("/v1/verify", headers=as_(tokens["admin"])).json()
    assert acme["ok"] is True
    assert globex["ok"] is False
    assert {p["emitter"] for p in globex["problems"]} == {"gw-globex"}
    assert admin["ok"] is False


def test_a_row_moved_into_another_tenants_partition_is_its_emitters_tenants_problem(api) -> None:
    client, tokens, _, harness = api
    lake = harness.data_dir / "lake"
    home = home_of(harness.data_dir)
    source = next(p for p in LakeReader(harness.data_dir).files() if "tenant=acme" in str(p))
    moved = lake / "events" / "tenant=globex" / source.parent.name / "seg-999999999999.parquet"
    if home is None:
        moved.parent.mkdir(parents=True, exist_ok=True)
        source.rename(moved)
    else:  # the lake is the object store's: the row is moved there, and readers see it in their copy
        home.fs.move(home.key(str(source.relative_to(lake))), home.key(str(moved.relative_to(lake))))
        home.refresh(lake, force=True)
    acme = client.post("/v1/verify", headers=as_(tokens["auditor-acme"])).json()
    globex = client.post("/v1/verify", headers=as_(tokens["auditor-globex"])).json()
    moved_ids = {
        row[0] for row in pq.read_table(moved, columns=["event_id"]).to_pylist() for row in [tuple(row.values())]
    }
    assert acme["ok"] is False
    assert {p["check"] for p in acme["problems"]} >= {"partition"}
    assert {p["event_id"] for p in acme["problems"] if p["check"] == "partition"} == moved_ids
    assert globex["ok"] is True, globex["problems"]  # none of acme's events is shown to globex's auditor
    assert not moved_ids & {p["event_id"] for p in globex["problems"]}


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic Zm9vOmJhcg=="])
def test_no_token_or_a_wrong_one_is_401_everywhere(api, header: str | None) -> None:
    client, _, s, _ = api
    headers = {} if header is None else {"Authorization": header}
    for method, path, params in ENDPOINTS:
        response = client.request(method, path.format(export=s.id("export")), params=params, headers=headers)
        assert response.status_code == 401, path
        assert set(response.json()["error"]) == {"code", "message", "details"}


def test_tokens_are_stored_hashed_and_can_be_revoked(api, tmp_path: Path) -> None:
    client, tokens, _, _ = api
    stored = (tmp_path / "tokens.json").read_text()
    assert tokens["admin"] not in stored
    assert oct((tmp_path / "tokens.json").stat().st_mode & 0o777) == "0o600"
    TokenStore(tmp_path / "tokens.json").revoke("gil")
    assert client.get("/v1/events", headers=as_(tokens["analyst-globex"])).status_code == 401


@pytest.mark.parametrize("tenant", ["", "ACME", "acme\n", "../acme"])
def test_a_token_is_never_issued_for_a_tenant_that_is_not_one(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(InvalidInput, match="tenant must match"):
        TokenStore(tmp_path / "tokens.json").issue("ann", "analyst", tenant)  # "" used to mean every tenant


def test_a_stored_empty_tenant_is_not_read_as_every_tenant(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    secret = TokenStore(path).issue("ann", "analyst", "acme")
    entries = orjson.loads(path.read_bytes())
    entries[0]["tenant"] = ""  # as an older version wrote `custody token issue --tenant ""`
    path.write_bytes(orjson.dumps(entries))
    with pytest.raises(Unauthorized):
        TokenStore(path).authenticate(secret)


def test_a_recert_download_is_named_from_a_checked_tenant_only(api) -> None:
    client, tokens, _, _ = api
    for tenant in ("acme\r\nSet-Cookie: x=1", 'acme"; filename="evil.exe', "Acme"):
        response = client.get("/v1/recert", params={"tenant": tenant}, headers=as_(tokens["admin"]))
        assert response.status_code == 400, response.text
        assert "tenant must match" in response.json()["error"]["message"]
    good = client.get("/v1/recert", params={"tenant": "acme", "format": "csv"}, headers=as_(tokens["admin"]))
    assert good.status_code == 200
    assert re.fullmatch(r'attachment; filename="recert-acme-[0-9TZ:-]+\.csv"', good.headers["content-disposition"])


def test_bad_parameters_use_the_envelope(api) -> None:
    client, tokens, _, _ = api
    for path, params in (
        ("/v1/events", {"limit": 0}),
        ("/v1/events", {"decision": "maybe"}),
        ("/v1/events", {"cursor": "garbage"}),
        ("/v1/blast-radius", {}),
        ("/v1/taint", {"agent": "x"}),
        ("/v1/findings", {"kind": "nonsense"}),
    ):
        response = client.get(path, params=params, headers=as_(tokens["admin"]))
        assert response.status_code == 400, (path, params, response.text)
        assert response.json()["error"]["code"] in ("invalid_request",)


@pytest.mark.slow
def test_the_read_api_as_a_real_process(harness: Harness, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import REPO, free_port

    scenario.build(harness)
    tokens = tmp_path / "tokens.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "custody.cli", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )

    issued = cli("token", "issue", "--file", str(tokens), "--name", "ann", "--role", "analyst", "--tenant", "globex")
    assert issued.returncode == 0, issued.stderr
    secret = issued.stdout.strip().splitlines()[-1]
    assert "ann\tanalyst\tglobex" in cli("token", "list", "--file", str(tokens)).stdout
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "CUSTODY_READ_TOKENS"}
    refused = subprocess.run(
        [sys.executable, "-m", "custody.cli", "serve-query", "--data-dir", str(harness.data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env,
        check=False,
    )
    assert refused.returncode == 1
    assert "no open mode" in refused.stderr
    with (tmp_path / "api.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "custody.cli",
                "serve-query",
                "--data-dir",
                str(harness.data_dir),
                "--tokens",
                str(tokens),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.1)
        body = httpx.get(f"{url}/v1/events", headers={"Authorization": f"Bearer {secret}"}).json()
        assert body["total"] == 2
        assert {event["tenant"] for event in body["events"]} == {"globex"}
        assert cli("token", "revoke", "--file", str(tokens), "--name", "ann").returncode == 0
        assert httpx.get(f"{url}/v1/events", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_blast_radius_lists_the_most_used_resources_and_counts_them_all(api) -> None:
    client, tokens, _, _ = api
    params = {"agent": "support-agent"}
    whole = client.get("/v1/blast-radius", params={**params, "resource_limit": 0}, headers=as_(tokens["admin"]))
    top = client.get("/v1/blast-radius", params={**params, "resource_limit": 1}, headers=as_(tokens["admin"]))
    assert (whole.json()["resources_total"], whole.json()["resources_truncated"], len(whole.json()["resources"])) == (
        2,
        False,
        2,
    )
    assert (top.json()["resources_total"], top.json()["resources_truncated"]) == (2, True)
    assert top.json()["resources"] == whole.json()["resources"][:1]
    refused = client.get("/v1/blast-radius", params={**params, "resource_limit": -1}, headers=as_(tokens["admin"]))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_request"
