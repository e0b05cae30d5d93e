"""``custody gateway``: an enforcing MCP gateway that records every tool call in Custody (docs/gateway.md).

It depends on the ``mcp`` SDK, custody-sdk, pyjwt and uvicorn, and on nothing of the Custody server (a contract
in pyproject.toml), so it deploys next to an MCP server without the lake, DuckDB or the dashboard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from custody_sdk import Emitter, public_jwk

from custody.gateway.app import Gateway, build_app
from custody.gateway.auth import JwtVerifier
from custody.gateway.config import ConfigError, GatewayConfig, load_config, load_policy
from custody.gateway.revocations import Revocations
from custody.gateway.upstream import Upstream
from custody.stopping import GRACE, Server

__all__ = ["ConfigError", "load_config", "load_key", "open_gateway", "serve_gateway", "write_key"]

log = logging.getLogger("custody.gateway")


def write_key(path: Path, kid: str) -> dict[str, str]:
    """Create an Ed25519 emitter key at ``path`` (mode 0600; an existing file is kept) and return its public JWK,
    the body's key to register with ``PUT /v1/emitters/{id}``."""
    if path.exists():
        return public_jwk(load_key(path), kid)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with path.open("xb") as handle:
        path.chmod(0o600)
        handle.write(pem)
    return public_jwk(key, kid)


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"custody.key_file {path}: not an unencrypted PKCS#8 PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"custody.key_file {path}: an Ed25519 key is needed, not {type(key).__name__}")
    return key


def open_gateway(config: GatewayConfig) -> Gateway:
    """The gateway for ``config``, its emitter's sender running; ``close_gateway`` stops it."""
    policy = load_policy(config.policy_file)
    try:
        verifier = JwtVerifier(config.auth)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    custody = config.custody
    emitter = Emitter(
        custody.url,
        custody.emitter,
        custody.tenant,
        load_key(custody.key_file),
        custody.kid,
        spool=custody.spool,
        max_spool_bytes=custody.max_spool_bytes,
        log_key=custody.log_key,
        linger=0.05,  # under load, one request to Custody per ~10 calls rather than per call
    )
    unknown = sorted(
        {rule.server for rule in policy.tools.values() if rule.server} - {u.name for u in config.upstreams}
    )
    if unknown:
        emitter.close()
        raise ConfigError(f"{config.policy_file}: the policy names servers no upstream is called: {', '.join(unknown)}")
    revocations = None
    if config.revocations is not None:
        if not config.revocations.token_file.is_file():
            emitter.close()
            raise ConfigError(f"revocations.token_file {config.revocations.token_file} is not a file")
        revocations = Revocations(config.revocations)
    upstreams = [Upstream(upstream) for upstream in config.upstreams]
    return Gateway(config, policy, verifier, emitter, upstreams, revocations)


def serve_gateway(config_path: Path) -> None:
    """Run the gateway until SIGTERM, SIGHUP or Ctrl-C; then stop taking calls, finish those in flight, and close the
    spool (what Custody has not acknowledged stays in it for the next start)."""
    config = load_config(config_path)
    gateway = open_gateway(config)
    try:
        server = Server(
            uvicorn.Config(
                build_app(gateway),
                host=config.listen.host,
                port=config.listen.port,
                log_level="info",
                access_log=False,
                proxy_headers=False,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=GRACE,
                limit_concurrency=1000,
            )
        )
        log.info(
            "custody gateway on http://%s:%d%s for %s, policy %s, failure mode %s",
            config.listen.host,
            config.listen.port,
            config.listen.path,
            ", ".join(u.name for u in config.upstreams),
            gateway.policy.label,
            config.failure_mode,
        )
        server.run()  # SIGTERM, SIGINT and SIGHUP: finish the calls in flight, exit 0
    finally:
        gateway.emitter.close()
