"""Read-API tokens: roles ``admin``, ``analyst``, ``auditor``, each optionally bound to one tenant.

Tokens live in a JSON file (``custody token issue --file F``) or in ``CUSTODY_READ_TOKENS`` (the same JSON), and
only their SHA-256 is stored: ``[{"name", "role", "tenant" | null, "sha256", "issued_at"}]``. A token is shown
once, when issued. Rotate by issuing a new one under another name, handing it over, then ``custody token revoke``
the old name; the server re-reads the file on every request, so no restart is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson

from store.ground.errors import Conflict, InvalidInput, NotFound, Unauthorized

__all__ = ["ROLES", "Principal", "TokenStore"]

Role = Literal["admin", "analyst", "auditor"]
ROLES: tuple[Role, ...] = ("admin", "analyst", "auditor")
ENV = "CUSTODY_READ_TOKENS"
TENANT = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")  # the protocol's tenant ids (docs/protocol.md)


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    tenant: str | None

    def scope(self, requested: str | None) -> str | None:
        """The tenant a request may see: its own when bound (asking for another is refused), else as asked. A
        tenant that is not a tenant id is refused here, before it reaches a query, a file name or a header."""
        if requested is not None and not TENANT.fullmatch(requested):
            raise InvalidInput(f"tenant must match {TENANT.pattern}, got {requested!r}")
        if self.tenant is None:
            return requested
        if requested not in (None, self.tenant):
            raise Forbidden(f"token {self.name!r} is bound to tenant {self.tenant!r}")
        return self.tenant


class Forbidden(Unauthorized):
    code = "forbidden"
    http_status = 403


class TokenStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def _entries(self) -> list[dict[str, object]]:
        raw: bytes | None = None
        if self.path is not None and self.path.exists():
            raw = self.path.read_bytes()
        elif os.environ.get(ENV):
            raw = os.environ[ENV].encode()
        if not raw:
            return []
        entries = orjson.loads(raw)
        if not isinstance(entries, list):
            raise InvalidInput(f"{self.path or ENV} must hold a JSON list of tokens")
        return entries

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("this API needs Authorization: Bearer <token>")
        digest = hashlib.sha256(token.encode()).hexdigest()
        for entry in self._entries():
            if hmac.compare_digest(str(entry.get("sha256", "")), digest):
                role = entry.get("role")
                if role not in ROLES:
                    break
                tenant = entry.get("tenant")
                if tenant is not None and not (isinstance(tenant, str) and TENANT.fullmatch(tenant)):
                    break  # never read a tenant that is not one (such as "") as "all tenants"
                return Principal(str(entry["name"]), role, tenant)
        raise Unauthorized("unknown or revoked token")

    def issue(self, name: str, role: str, tenant: str | None) -> str:
        if self.path is None:
            raise InvalidInput("issuing needs a token file (--file)")
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if tenant is not None and not TENANT.fullmatch(tenant):
            # An empty tenant was stored as "" and read back as no tenant: a token for every tenant.
            raise InvalidInput(f"tenant must match {TENANT.pattern}, got {tenant!r}; omit --tenant for all tenants")
        entries = self._entries()
        if any(entry.get("name") == name for entry in entries):
            raise Conflict(f"a token named {name!r} exists; revoke it first or choose another name")
        token = secrets.token_urlsafe(32)
        entries.append(
            {
                "name": name,
                "role": role,
                "tenant": tenant,
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        self._write(entries)
        return token

    def revoke(self, name: str) -> None:
        entries = self._entries()
        kept = [entry for entry in entries if entry.get("name") != name]
        if len(kept) == len(entries):
            raise NotFound(f"no token named {name!r}")
        self._write(kept)

    def listing(self) -> list[dict[str, object]]:
        return [{key: value for key, value in entry.items() if key != "sha256"} for entry in self._entries()]

    def _write(self, entries: list[dict[str, object]]) -> None:
        assert self.path is not None
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(entries, option=orjson.OPT_INDENT_2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
