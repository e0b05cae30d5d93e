"""What the gateway tests share: an OAuth issuer (its key, JWKS file and tokens with RFC 8693 act chains), the two
files of a gateway, a real ``custody gateway`` process, and a real MCP client session through it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import _STARTED, ADMIN, REPO, free_port

ISSUER = "https://idp.acme.test"
AUDIENCE = "custody-gateway"
GATEWAY_ID = "gw-acme"
TENANT = "acme"

POLICY = (REPO / "sample_data" / "mcp" / "policy.toml").read_text()  # the demo's


class Issuer:
    def __init__(self, directory: Path, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer, self.audience, self.kid = issuer, audience, "idp-key-1"
        self.key = Ed25519PrivateKey.generate()
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}))

    def token(
        self,
        user: str,
        agents: Sequence[str],
        scopes: Sequence[str],
        *,
        client_id: str = "acme-agent-platform",
        ttl: int = 600,
        **claims: Any,
    ) -> str:
        """A token for ``user`` carried by ``agents`` (the first agent first, the one calling last)."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + ttl,
        }
        act: dict[str, Any] | None = None
        for agent in agents:
            act = {"sub": agent, **({"act": act} if act else {})}
        if act:
            body["act"] = act
        body.update(claims)
        return jwt.encode(body, self.key, algorithm="EdDSA", headers={"kid": self.kid})


def write_gateway(
    directory: Path,
    custody_url: str,
    issuer: Issuer,
    *,
    failure_mode: str = "closed",
    max_spool_bytes: int = 1 << 30,
    upstreams: str | None = None,
    port: int | None = None,
    call_log: Path | None = None,
    log_key: str | None = None,
) -> Path:
    """The gateway's config and policy files in ``directory``; returns the config's path."""
    (directory / "policy.toml").write_text(POLICY)
    if upstreams is None:
        upstreams = "\n".join(
            f'[[upstreams]]\nname = "{name}"\n'
            f"command = {json.dumps([sys.executable, '-m', 'sample_data.mcp.servers', name])}\n"
            f"cwd = {json.dumps(str(REPO))}\n"
            + (f"env = {{ CUSTODY_MCP_CALL_LOG = {json.dumps(str(call_log))} }}\n" if call_log else "")
            for name in ("helpdesk-mcp", "billing-mcp")
        )
    config = f"""\
policy_file = "policy.toml"
failure_mode = "{failure_mode}"

[listen]
host = "127.0.0.1"
port = {port or free_port()}

[custody]
url = "{custody_url}"
emitter = "{GATEWAY_ID}"
tenant = "{TENANT}"
key_file = "gateway-key.pem"
kid = "{GATEWAY_ID}-k1"
spool = "spool"
max_spool_bytes = {max_spool_bytes}
{f'log_key = "{log_key}"' if log_key else ""}

[auth]
issuer = "{issuer.issuer}"
audience = "{issuer.audience}"
jwks_file = "{issuer.jwks_file}"

{upstreams}"""
    path = directory / "gateway.toml"
    path.write_text(config)
    return path


def register_gateway(config: Path, custody_url: str) -> None:
    """``custody gateway --print-registration``, then the admin PUT it prints the body of."""
    out = subprocess.run(
        [sys.executable, "-m", "custody.cli", "gateway", "--config", str(config), "--print-registration"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    response = httpx.put(f"{custody_url}/v1/emitters/{GATEWAY_ID}", json=json.loads(out), headers=ADMIN, timeout=30)
    assert response.status_code in (200, 201), response.text


class GatewayProcess:
    def __init__(self, config: Path, log_path: Path) -> None:
        self.config, self.log_path = config, log_path
        text = config.read_text()
        self.port = int(text.split("port = ", 1)[1].split("\n", 1)[0])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        command = [sys.executable, "-m", "custody.cli", "gateway", "--config", str(self.config)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _STARTED.append(self.process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not healthy in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=10).json()
        return answer

    def wait_drained(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health["spool"]["pending"] == 0:
                return health
            time.sleep(0.1)
        raise AssertionError(f"the gateway's spool did not drain: {self.health()}")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        return self.process.returncode


@asynccontextmanager
async def mcp_client(url: str, token: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
    ):
        yield client


def calls_received(call_log: Path) -> list[dict[str, Any]]:
    if not call_log.exists():
        return []
    return [json.loads(line) for line in call_log.read_text().splitlines() if line]
