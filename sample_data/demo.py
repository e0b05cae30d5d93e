"""``custody demo``: a server on a data dir with sample events posted through the SDK, until Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from ingest.sdk import Emitter, generate_key, public_jwk
from sample_data.org import GATEWAYS, sample_events
from store.errors import CustodyError

__all__ = ["run_demo", "wait_healthy"]


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CustodyError(f"the server exited with code {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise CustodyError(f"the server at {url} was not healthy after {timeout:.0f} s")


def run_demo(data_dir: Path, *, port: int, events: int, reset: bool, stay: bool) -> int:
    token = os.environ.get("CUSTODY_ADMIN_TOKEN")
    if not token:
        raise CustodyError("CUSTODY_ADMIN_TOKEN is not set")
    if reset and data_dir.exists():
        shutil.rmtree(data_dir)
        print(f"reset: deleted {data_dir}")
    elif data_dir.exists():
        print(f"reusing {data_dir} (pass --reset to start empty)")
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "custody.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    server = subprocess.Popen(command)
    try:
        wait_healthy(url, server)
        _post_sample(url, token, events)
        print(f"\nIngest API:  {url}   (OpenAPI: {url}/docs, metrics: {url}/metrics)")
        print(f"Admin token: {token}")
        print(f"Lake:        {data_dir / 'lake' / 'events'}")
        print("Query it with DuckDB, e.g.:")
        print(f'  .venv/bin/python -c "import duckdb; print(duckdb.sql(\\"{_example_query(data_dir)}\\"))"')
        if stay:
            print("\nServing until Ctrl-C.")
            server.wait()
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return 0


def _example_query(data_dir: Path) -> str:
    source = f"read_parquet('{data_dir}/lake/events/**/*.parquet', hive_partitioning = true)"
    return (
        "SELECT tenant, agent, tool_name, decision_result, count(*) AS events"  # noqa: S608 (printed, not run)
        f" FROM {source} GROUP BY ALL ORDER BY events DESC LIMIT 10"
    )


def _post_sample(url: str, token: str, count: int) -> None:
    admin = {"Authorization": f"Bearer {token}"}
    existing = httpx.get(f"{url}/v1/emitters", headers=admin)
    existing.raise_for_status()
    posted = sum(e["head"]["seq"] for e in existing.json() if e["emitter"] != "custody.server")
    if posted:
        print(f"the data dir already holds {posted} sample events; not posting them again")
        return
    emitters = {}
    for gateway in GATEWAYS:
        key = generate_key()
        kid = f"{gateway.emitter}-{int(time.time())}"
        response = httpx.put(
            f"{url}/v1/emitters/{gateway.emitter}",
            json={"tenant": gateway.tenant, "kind": "gateway", "keys": [public_jwk(key, kid)]},
            headers=admin,
        )
        response.raise_for_status()
        emitter = Emitter(url, gateway.emitter, gateway.tenant, key, kid)
        emitter.recover_head()
        emitters[gateway.emitter] = emitter
    for emitter_id, fields in tqdm(
        sample_events(count, end=datetime.now(UTC)), total=count, desc="posting sample events", unit="event"
    ):
        emitters[emitter_id].emit(**fields)
    for emitter in emitters.values():
        emitter.flush()
        emitter.close()
