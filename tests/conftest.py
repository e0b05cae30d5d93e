"""Shared fixtures: in-process apps over tmp_path data dirs, and real `custody serve` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from ingest.app import create_app
from ingest.sdk import Emitter, generate_key, public_jwk, rfc3339
from ingest.server import IngestServer
from ingest.service import Limits
from store.ground.jws import PrivateKey

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors"
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def invocation(**overrides: Any) -> dict[str, Any]:
    """The fields of a valid tool.invocation (without the ones the SDK fills in)."""
    fields: dict[str, Any] = {
        "type": "tool.invocation",
        "delegation": {"sub": "alice@acme.example", "act": {"sub": "triage-agent", "act": {"sub": "support-agent"}}},
        "credential": {
            "id": "tok-1",
            "kind": "agent_token",
            "client_id": "triage-agent",
            "scopes": ["tickets:read"],
            "expires_at": "2030-01-01T00:00:00Z",
        },
        "tool": {"name": "read_ticket", "server": "helpdesk-mcp"},
        "resource": {"type": "ticket", "id": "T-1", "tenant": "acme"},
        "decision": {"result": "allow", "required_scope": "tickets:read", "policy": "p1", "reason": None},
        "outcome": "success",
        "trace_id": "trace-1",
        "attrs": {"region": "eu", "attempt": 1, "cached": False},
    }
    fields.update(overrides)
    return fields


class Harness:
    """An in-process ingest server with helpers to register emitters and sign events."""

    def __init__(self, client: TestClient, server: IngestServer, data_dir: Path) -> None:
        self.client = client
        self.server = server
        self.data_dir = data_dir

    def register(self, emitter_id: str, tenant: str = "acme", alg: str = "EdDSA") -> tuple[PrivateKey, str]:
        key = generate_key(alg)
        kid = f"{emitter_id}-k{uuid.uuid4().hex[:6]}"
        response = self.client.put(
            f"/v1/emitters/{emitter_id}",
            json={"tenant": tenant, "kind": "gateway", "keys": [public_jwk(key, kid)]},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text
        return key, kid

    def emitter(self, emitter_id: str, tenant: str = "acme", alg: str = "EdDSA", **kwargs: Any) -> Emitter:
        key, kid = self.register(emitter_id, tenant, alg)
        return Emitter("http://testserver", emitter_id, tenant, key, kid, client=self.client, **kwargs)

    def post(self, tokens: list[Any]) -> dict[str, Any]:
        response = self.client.post("/v1/events", json={"events": tokens})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def flush(self) -> None:
        """Everything acknowledged into the lake, and into a checkpoint (the publisher would within 0.5 s)."""
        self.server.store.flush()
        self.server.store.merkle.publish()


@contextmanager
def open_harness(data_dir: Path, max_events: int = 50, verify_workers: int = 0, **options: Any) -> Iterator[Harness]:
    # In-process flushes (no lake-writer process): real server processes in test_server_process.py use it.
    server = IngestServer(
        data_dir,
        ADMIN_TOKEN,
        limits=Limits(max_events=max_events),
        flush_interval=3600,
        writer_process=False,
        verify_workers=verify_workers,
        **options,
    )
    with TestClient(create_app(server)) as client:
        yield Harness(client, server, data_dir)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked ``each_backend`` run their ``harness`` tests against the embedded store and against a node
    of a cluster on a real PostgreSQL (store.cluster) whose lake lives on an S3-compatible server
    (store.object_lake)."""
    if "harness" in metafunc.fixturenames and metafunc.definition.get_closest_marker("each_backend"):
        backends = ["embedded", pytest.param("postgresql", id="postgresql+s3", marks=pytest.mark.cluster)]
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "embedded"))


@pytest.fixture
def harness(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Harness]:
    state = None
    if backend == "postgresql":  # a cluster node: PostgreSQL, and the lake on object storage
        from store.object_lake import configure

        state = request.getfixturevalue("postgres").database()
        configure(tmp_path / "data", request.getfixturevalue("s3").bucket())
    with open_harness(tmp_path / "data", state=state) as opened:
        yield opened


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """Whatever a test started and did not stop is killed and reaped when it ends, pass or fail."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.fixture(autouse=True)
def _main_module_kept() -> Iterator[None]:
    """Streamlit's script runner (AppTest) installs the page it runs as ``sys.modules["__main__"]`` and leaves it
    there; a process pool started later with the spawn method would then run the dashboard page in every child."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


class ServerProcess:
    """A real `custody serve` process on 127.0.0.1."""

    def __init__(self, data_dir: Path, log_path: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = {**os.environ, "CUSTODY_ADMIN_TOKEN": ADMIN_TOKEN}
        command = [
            sys.executable,
            "-m",
            "custody.cli",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--flush-interval",
            "0.2",
            *self.extra,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _STARTED.append(self.process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"server not healthy in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        return self.process.returncode


@pytest.fixture
def server_process(tmp_path: Path) -> ServerProcess:
    return ServerProcess(tmp_path / "data", tmp_path / "server.log")


def copy_data_dir(source: Path, target: Path) -> Path:
    """A copy of a shared data dir (the demo organisation's) for a test that writes to it, without its ``index/``:
    derived data that another test's dashboard or read API may be writing meanwhile (a temporary file listed, then
    renamed, fails the copy), and that readers rebuild from the lake."""
    shutil.copytree(source, target, ignore=lambda folder, _: ["index"] if Path(folder) == source else [])
    return target


def read_lake(data_dir: Path, columns: str = "*") -> list[tuple[Any, ...]]:
    """Rows of the lake through plain DuckDB, as a reader outside Custody would do it."""
    import duckdb

    files = list((data_dir / "lake" / "events").glob("**/*.parquet"))
    if not files:
        return []
    pattern = str(data_dir / "lake" / "events" / "**" / "*.parquet")
    query = f"SELECT {columns} FROM read_parquet(?, hive_partitioning = true) ORDER BY emitter, seq"
    return duckdb.execute(query, [pattern]).fetchall()


ORG_END = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)  # in the past: the API refuses events from the future


@pytest.fixture(scope="session")
def org(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo organisation, reduced (30 days, 60 tasks a weekday, ~9k events), posted through the in-process API
    with the SDK; ``key`` is its answer key."""
    from sample_data.demo import post_generated
    from sample_data.generate import generate

    generated = generate(7, end=ORG_END, days=30, tasks_per_day=60)
    data = tmp_path_factory.mktemp("org") / "data"
    with open_harness(data, max_events=1000) as harness:
        posted = post_generated("http://testserver", ADMIN_TOKEN, generated, client=harness.client)
        harness.flush()
    assert posted == len(generated.events)
    return {"data": data, "key": generated.answer_key, "generated": generated}


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (tests/pg_kit.py); ``postgres.database()`` gives a test its own."""
    from tests.pg_kit import PostgresServer

    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An S3-compatible server (moto) for the session (tests/s3_kit.py); ``s3.bucket()`` gives a test its own."""
    from tests.s3_kit import S3Server

    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium, driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    from tests.test_demo_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: ./test installs it (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()
