"""The gateway's two files: its configuration (where Custody is, how agents authenticate, which upstream MCP servers
it fronts) and its policy (which scope each tool needs). Both TOML, both validated whole before the gateway starts:
every problem is reported with its place in the file, and anything unknown is refused (a misspelt key would
otherwise silently mean "no rule"). docs/gateway.md is the reference.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["ConfigError", "GatewayConfig", "Policy", "ToolRule", "load_config", "load_policy"]

_ID = r"^[a-z0-9][a-z0-9._-]{0,127}$"
Id = Annotated[str, Field(pattern=_ID)]
Name = Annotated[str, Field(min_length=1, max_length=512)]
_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration or policy file the gateway will not start with; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8800, ge=0, le=65535)
    path: str = Field("/mcp", pattern=r"^/[A-Za-z0-9._/-]*$")
    # The URL agents reach the gateway at: the resource of RFC 9728 metadata, and the default JWT audience.
    public_url: str | None = None


class CustodyConfig(_Strict):
    url: str
    emitter: Id
    tenant: Id
    key_file: Path  # the emitter's Ed25519 private key, PKCS#8 PEM (custody gateway key writes one)
    kid: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
    spool: Path
    max_spool_bytes: int = Field(1 << 30, ge=1 << 18)
    log_key: str | None = None  # the log's verifier key: receipts are checked when given


class AuthConfig(_Strict):
    issuer: Name
    audience: Name
    jwks_file: Path | None = None
    jwks_url: str | None = None
    algorithms: list[Literal["EdDSA", "ES256", "ES384", "RS256", "PS256"]] = ["EdDSA", "ES256", "RS256"]
    leeway_seconds: int = Field(30, ge=0, le=300)

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file and jwks_url")
        return self


class RevocationsConfig(_Strict):
    """Where the gateway learns which credentials were revoked: Custody's read API, with a read token bound to the
    gateway's tenant. Calls with a revoked credential are denied."""

    url: str  # the read API, e.g. http://127.0.0.1:8701
    token_file: Path
    poll_seconds: float = Field(5.0, ge=0.5, le=3600)


class UpstreamConfig(_Strict):
    name: Id
    command: list[str] | None = Field(None, min_length=1)  # a stdio server: the program and its arguments
    env: dict[str, str] = {}
    cwd: Path | None = None
    url: str | None = None  # a streamable HTTP server
    headers: dict[str, str] = {}  # sent to a streamable HTTP upstream (its own credential, never the agent's)
    timeout_seconds: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (stdio) and url (streamable HTTP)")
        return self


class GatewayConfig(_Strict):
    listen: ListenConfig = ListenConfig()
    custody: CustodyConfig
    auth: AuthConfig
    policy_file: Path
    # "closed": a call is refused unless the spool has room for its event (no audit, no action); "open": calls
    # proceed and events that cannot be spooled are counted and logged, not kept.
    failure_mode: Literal["closed", "open"] = "closed"
    revocations: RevocationsConfig | None = None
    upstreams: list[UpstreamConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_upstreams(self) -> GatewayConfig:
        names = [upstream.name for upstream in self.upstreams]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"upstream names must be unique: {', '.join(repeated)}")
        return self


class ResourceRule(_Strict):
    type: Name
    argument: Annotated[str, Field(min_length=1, max_length=256)]


class ToolRule(_Strict):
    scope: Name
    server: Id | None = None  # the upstream that must offer the tool; any upstream when left out
    resource: ResourceRule | None = None


class _PolicyFile(_Strict):
    version: Literal[1]
    name: Id
    tools: dict[Annotated[str, Field(min_length=1, max_length=512)], ToolRule] = {}


class Policy:
    """Tool name -> rule; a tool with no rule is denied. ``label`` names this exact policy (its name and the
    SHA-256 of the file) in every decision, so an auditor can tell which version decided."""

    def __init__(self, name: str, tools: dict[str, ToolRule], digest: str) -> None:
        self.name, self.tools, self.digest = name, tools, digest
        self.label = f"{name}@sha256:{digest[:16]}"

    def rule(self, tool: str) -> ToolRule | None:
        return self.tools.get(tool)


def load_config(path: Path) -> GatewayConfig:
    document = _read_toml(path)
    config = _validated(GatewayConfig, document, path)
    base = path.parent
    custody = config.custody.model_copy(
        update={"key_file": base / config.custody.key_file, "spool": base / config.custody.spool}
    )
    auth = config.auth
    if auth.jwks_file is not None:
        auth = auth.model_copy(update={"jwks_file": base / auth.jwks_file})
    revocations = config.revocations
    if revocations is not None:
        revocations = revocations.model_copy(update={"token_file": base / revocations.token_file})
    return config.model_copy(
        update={"custody": custody, "auth": auth, "policy_file": base / config.policy_file, "revocations": revocations}
    )


def load_policy(path: Path) -> Policy:
    raw = _read_bytes(path)
    document = _parse_toml(raw, path)
    parsed = _validated(_PolicyFile, document, path)
    return Policy(parsed.name, dict(parsed.tools), hashlib.sha256(raw).hexdigest())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from exc


def _read_toml(path: Path) -> dict[str, object]:
    return _parse_toml(_read_bytes(path), path)


def _parse_toml(raw: bytes, path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _validated(model: type[_M], document: dict[str, object], path: Path) -> _M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            place = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = re.sub(r"^Value error, ", "", error["msg"])
            problems.append(f"  {place}: {message}")
        raise ConfigError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems)) from exc
