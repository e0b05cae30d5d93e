"""``custody demo``: the ingest server, the read API and the dashboard on one data dir, with the demo organisation
posted through the real HTTP API by the SDK (signed, chained), and the MCP gateway in front of the demo's MCP servers
with a live agent session through it (sample_data.mcp.live), until Ctrl-C.

Emitter keys are derived from the seed, so the same seed signs the same events into the same hashes. A data dir
that already holds the organisation is reused as it is (``--reset`` starts empty); the run says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from custody_sdk import Emitter as SpoolingEmitter
from tqdm import tqdm

from ingest.sdk import Emitter, public_jwk
from query.detect.loop import findings_store_path
from query.detect.records import FindingStore
from query.tokens import TokenStore
from sample_data.generate import Generated, generate
from sample_data.mcp.live import (
    DEMO_GATEWAY,
    DEMO_ISSUER,
    LiveSession,
    issuer_emitter,
    run_live_session,
    use_again,
    write_demo_gateway,
)
from sample_data.org import GATEWAYS, IDPS
from store.ground.errors import CustodyError, NotFound
from store.orphans import child_environment, stop_on_signals

__all__ = ["DemoSettings", "emitter_key", "post_generated", "run_demo", "wait_healthy"]


@dataclass(frozen=True)
class DemoSettings:
    data_dir: Path
    port: int = 8700
    query_port: int = 8701
    dashboard_port: int = 8501
    gateway_port: int = 8702
    alerts: Path | None = None
    seed: int = 7
    days: int = 30
    tasks_per_day: int = 1850
    reset: bool = False
    stay: bool = True


def emitter_key(seed: int, emitter: str) -> tuple[Ed25519PrivateKey, str]:
    """The demo's key for an emitter: derived from the seed, so a rerun signs identical bytes."""
    secret = hashlib.sha256(f"custody-demo/{seed}/{emitter}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(secret), f"{emitter}-demo-{seed}"


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CustodyError(f"{url}: the process exited with code {process.returncode} before it was healthy")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise CustodyError(f"{url} was not healthy after {timeout:.0f} s")


def post_generated(
    url: str,
    admin_token: str,
    generated: Generated,
    *,
    progress: Callable[[int], None] | None = None,
    client: httpx.Client | None = None,
) -> int:
    """Register every emitter of the organisation (its seed-derived key) and post its events in order, emitters in
    parallel. Returns the number of events accepted; raises if any event is rejected. ``client``: an HTTP client to
    use instead of new connections to ``url`` (the tests pass an in-process one)."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    http = client or httpx.Client(base_url=url, timeout=30)
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for emitter_id, fields in generated.events:
        streams[emitter_id].append(fields)
    emitters = {}
    for gateway in (*GATEWAYS, *IDPS):
        key, kid = emitter_key(generated.seed, gateway.emitter)
        response = http.put(
            f"/v1/emitters/{gateway.emitter}",
            json={"tenant": gateway.tenant, "kind": gateway.kind, "keys": [public_jwk(key, kid)]},
            headers=admin,
        )
        if response.status_code != 200:
            raise CustodyError(f"registering {gateway.emitter}: HTTP {response.status_code}: {response.text}")
        emitters[gateway.emitter] = Emitter(
            url, gateway.emitter, gateway.tenant, key, kid, batch_size=250, client=client
        )
    lock, done = threading.Lock(), [0]

    def post(emitter_id: str) -> int:
        emitter = emitters[emitter_id]
        with emitter:
            emitter.recover_head()
            for index, fields in enumerate(streams[emitter_id], 1):
                emitter.emit(**fields)
                if index % 250 == 0 and progress is not None:
                    with lock:
                        done[0] += 250
                        progress(done[0])
            emitter.flush()
        with lock:
            done[0] += len(streams[emitter_id]) % 250
            if progress is not None:
                progress(done[0])
        return len(streams[emitter_id])

    try:
        with ThreadPoolExecutor(max_workers=4 if client is None else 1) as pool:
            return sum(pool.map(post, sorted(streams)))
    finally:
        if client is None:
            http.close()


def run_demo(settings: DemoSettings) -> int:
    admin_token = os.environ.get("CUSTODY_ADMIN_TOKEN")
    if not admin_token:
        raise CustodyError("CUSTODY_ADMIN_TOKEN is not set")
    data_dir = settings.data_dir.resolve()
    if settings.reset and data_dir.exists():
        shutil.rmtree(data_dir)
        print(f"reset: deleted {data_dir}")
    elif data_dir.exists():
        print(f"reusing {data_dir} (./demo --reset starts empty)")
    data_dir.mkdir(parents=True, exist_ok=True)
    stop_on_signals()  # SIGTERM and SIGHUP stop the demo as Ctrl-C does: its servers are stopped below
    children: list[subprocess.Popen[bytes]] = []
    cli = [sys.executable, "-m", "custody.cli"]
    ingest_url = f"http://127.0.0.1:{settings.port}"
    try:
        serve = [*cli, "serve", "--data-dir", str(data_dir), "--port", str(settings.port)]
        if settings.alerts is not None:
            serve += ["--alerts", str(settings.alerts.resolve())]
        children.append(_start(serve))
        wait_healthy(f"{ingest_url}/healthz", children[-1])
        key_path = data_dir / "answer-key.json"
        existing = _posted(ingest_url, admin_token)
        if existing:
            print(f"the data dir already holds {existing:,} events of the demo organisation; not posting them again")
            answer_key = orjson.loads(key_path.read_bytes()) if key_path.exists() else None
        else:
            answer_key = _generate_and_post(settings, ingest_url, admin_token, key_path)
        tokens = data_dir / "tokens.json"
        analyst = _fresh_token(tokens, "demo-analyst", "analyst")
        auditor = _fresh_token(tokens, "demo-auditor", "auditor")
        # The gateway reads revocations from the read API with a token of its own tenant.
        (data_dir / "gateway").mkdir(parents=True, exist_ok=True)
        gateway_token = data_dir / "gateway" / "read.token"
        gateway_token.write_text(_fresh_token(tokens, "demo-gateway", "analyst", tenant="acme") + "\n")
        gateway_token.chmod(0o600)
        query = [*cli, "serve-query", "--data-dir", str(data_dir), "--tokens", str(tokens)]
        children.append(_start([*query, "--port", str(settings.query_port)]))
        wait_healthy(f"http://127.0.0.1:{settings.query_port}/healthz", children[-1])
        live = _live_session(settings, data_dir, ingest_url, admin_token, children, cli)
        dashboard = [*cli, "dashboard", "--data-dir", str(data_dir), "--tokens", str(tokens)]
        children.append(_start([*dashboard, "--port", str(settings.dashboard_port)]))
        dashboard_url = f"http://127.0.0.1:{settings.dashboard_port}"
        wait_healthy(f"{dashboard_url}/_stcore/health", children[-1])
        _print_tour(settings, admin_token, analyst, auditor, answer_key, data_dir, live)
        if settings.stay:
            print("\nServing until Ctrl-C.", flush=True)
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            raise CustodyError("a demo process exited on its own; stopping the others")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        _stop(children)
    return 0


def _live_session(
    settings: DemoSettings,
    data_dir: Path,
    ingest_url: str,
    admin_token: str,
    children: list[subprocess.Popen[bytes]],
    cli: list[str],
) -> LiveSession:
    """Start ``custody gateway`` in front of the demo's MCP servers, drive the live session through it, and wait
    until Custody has acknowledged every event of it."""
    config, registration = write_demo_gateway(
        data_dir / "gateway",
        settings.seed,
        ingest_url,
        settings.gateway_port,
        revocations=(f"http://127.0.0.1:{settings.query_port}", "read.token"),
    )
    admin = {"Authorization": f"Bearer {admin_token}"}
    response = httpx.put(f"{ingest_url}/v1/emitters/{DEMO_GATEWAY}", json=registration, headers=admin, timeout=30)
    if response.status_code != 200:
        raise CustodyError(f"registering {DEMO_GATEWAY}: HTTP {response.status_code}: {response.text}")
    children.append(_start([*cli, "gateway", "--config", str(config)]))
    gateway_url = f"http://127.0.0.1:{settings.gateway_port}"
    wait_healthy(f"{gateway_url}/healthz", children[-1])
    live = asyncio.run(run_live_session(gateway_url, settings.seed))
    # The security team revokes the sub-agent's token at its issuer; the agent uses it once more.
    key, kid, registration = issuer_emitter(settings.seed)
    response = httpx.put(f"{ingest_url}/v1/emitters/{DEMO_ISSUER}", json=registration, headers=admin, timeout=30)
    if response.status_code != 200:
        raise CustodyError(f"registering {DEMO_ISSUER}: HTTP {response.status_code}: {response.text}")
    spool = data_dir / "gateway" / "issuer-spool"
    with SpoolingEmitter(ingest_url, DEMO_ISSUER, "acme", key, kid, spool=spool) as idp:
        idp.emit(
            type="credential.revoked",
            credential={
                "id": live.credential,
                "kind": "agent_token",
                "client_id": "acme-agent-platform",
                "scopes": ["tickets:read", "tickets:write"],
            },
            revoked_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            reason="triage-subagent obeyed a prompt injection in ticket T-1002",
        )
        idp.flush()
    _await_revocation(settings, data_dir, gateway_url, live.credential)
    live.reused = asyncio.run(use_again(gateway_url, live))
    deadline = time.monotonic() + 60
    while httpx.get(f"{gateway_url}/healthz", timeout=10).json()["spool"]["pending"]:
        if time.monotonic() > deadline:
            raise CustodyError("the gateway's events were not acknowledged within 60 s")
        time.sleep(0.2)
    print(
        f"live session through the MCP gateway ({gateway_url}/mcp): {len(live.allowed)} calls allowed,"
        f" {len(live.denied)} denied; its token revoked, then used once more: {live.reuse_decision}"
    )
    live.critical = _detected(data_dir, live.credential)
    return live


def _await_revocation(settings: DemoSettings, data_dir: Path, gateway_url: str, credential: str) -> None:
    """Wait (30 s at most) until the revocation is in the lake, as the read API shows it, and the gateway has
    polled the read API since."""
    token = (data_dir / "gateway" / "read.token").read_text().strip()
    read_api = f"http://127.0.0.1:{settings.query_port}/v1/events"
    params = {"type": "credential.revoked", "credential": credential}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = httpx.get(read_api, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if answer.status_code == 200 and answer.json()["events"]:
            break
        time.sleep(0.2)
    visible = time.time()
    while time.monotonic() < deadline:
        revocations = httpx.get(f"{gateway_url}/healthz", timeout=10).json().get("revocations") or {}
        if (revocations.get("refreshed_at") or 0) > visible + 1.0:  # a poll that began after it was visible
            return
        time.sleep(0.2)


def _detected(data_dir: Path, credential: str, timeout: float = 30.0) -> int | None:
    """The id of the critical finding continuous detection opens for the revoked token's use (None if it does not
    within ``timeout``: the tour then points at the findings page)."""
    path = findings_store_path(data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            records = FindingStore(path)
            try:
                for record in records.queue(tenant="acme", kinds=("action_after_revocation",)):
                    if record.subject == credential:
                        return record.id
            finally:
                records.close()
        time.sleep(0.2)
    return None


def _posted(url: str, admin_token: str) -> int:
    response = httpx.get(f"{url}/v1/emitters", headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
    response.raise_for_status()
    generated = [e for e in response.json() if e["emitter"] not in ("custody.server", DEMO_GATEWAY, DEMO_ISSUER)]
    return sum(int(e["head"]["seq"]) for e in generated)


def _generate_and_post(settings: DemoSettings, url: str, admin_token: str, key_path: Path) -> dict[str, Any]:
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    print(f"generating {settings.days} days of the demo organisation (seed {settings.seed})...", flush=True)
    generated = generate(settings.seed, end=end, days=settings.days, tasks_per_day=settings.tasks_per_day)
    with tqdm(total=len(generated.events), desc="posting through the SDK", unit="event") as bar:
        posted = post_generated(url, admin_token, generated, progress=lambda done: bar.update(done - bar.n))
    print(f"posted {posted:,} signed, chained events from {len(GATEWAYS)} gateways and {len(IDPS)} IdPs")
    temporary = key_path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps(generated.answer_key, option=orjson.OPT_INDENT_2))
    temporary.replace(key_path)
    return generated.answer_key


def _fresh_token(path: Path, name: str, role: str, *, tenant: str | None = None) -> str:
    """A new token under a fixed name (a token is shown only when issued, so a rerun issues it again)."""
    store = TokenStore(path)
    with contextlib.suppress(NotFound):
        store.revoke(name)
    return store.issue(name, role, tenant)


def _print_tour(
    settings: DemoSettings,
    admin_token: str,
    analyst: str,
    auditor: str,
    answer_key: dict[str, Any] | None,
    data_dir: Path,
    live: LiveSession,
) -> None:
    dashboard = f"http://127.0.0.1:{settings.dashboard_port}"
    print(f"\nDashboard:   {dashboard}")
    print(f"  sign in as analyst: {analyst}")
    print(f"  sign in as auditor: {auditor}")
    print(f"Ingest API:  http://127.0.0.1:{settings.port}  (admin token {admin_token}; OpenAPI at /docs)")
    print(f"Read API:    http://127.0.0.1:{settings.query_port}  (Bearer the analyst token; OpenAPI at /docs)")
    print(f"MCP gateway: http://127.0.0.1:{settings.gateway_port}/mcp  (config and policy: {data_dir / 'gateway'})")
    print(f"Data dir:    {data_dir}  (answer key of the planted incidents: answer-key.json)")
    print("\nThe newest incident, live through the MCP gateway: triage-subagent read ticket T-1002, whose note is a")
    print(f"prompt injection, and tried to act on it; the gateway denied {len(live.denied)} calls before they reached")
    print(f"billing-mcp. The denied refund and the chain behind it: {dashboard}/path?event={live.first_denied_refund}")
    print(f"  the burst of denials as a finding: {dashboard}/findings?window=all")
    if live.critical is not None:
        print(
            f"  its token, revoked and used again: critical finding #{live.critical}:"
            f" {dashboard}/findings?finding={live.critical}"
        )
    if answer_key is None:
        return
    injection = next(i for i in answer_key["incidents"] if i["name"] == "prompt_injection")
    refund, start = injection["refund_events"][0], injection["time"][:19]
    print("\nA short tour (a prompt injection was planted at " + injection["time"][:16].replace("T", " ") + " UTC):")
    print(f"  1. The first refund after the malicious ticket, and who authorised it: {dashboard}/path?event={refund}")
    blast = f"{dashboard}/blast?kind=agent&subject=support-agent&start={start}"
    print(f"  2. Everything support-agent reached from then on: {blast}")
    print(f"  3. The other planted incidents (borrowed session, shared key, ...): {dashboard}/findings?window=all")
    print(f"  4. Prove the log was not altered (sign in as auditor): {dashboard}/integrity")
    print(f"  5. Access review for auditors: .venv/bin/custody recert write --data-dir {data_dir} --tenant acme")


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    """A demo server: a custody command that stops by itself once this process is gone (CUSTODY_PARENT_PID)."""
    return subprocess.Popen(command, env=child_environment())


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    """Stop the servers in the reverse order of their start (the dashboard and the gateway before the read API,
    the ingest server last, so that what the others send it is in), each cleanly (SIGTERM), killed after 15 s."""
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
