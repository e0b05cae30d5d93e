"""Who is calling: an agent's bearer token, a JWT from the configured issuer, becomes a ``Principal``.

The claims used (RFC 9068 access tokens, RFC 8693 delegation): ``sub`` is the user the agents act for; ``act`` is the
chain of agents, the outermost the one calling now, each ``{"sub", "iss"?, "client_id"?, "act"?}``; ``client_id``
(or ``azp``) the OAuth client; ``scope`` (space-separated) or ``scp`` (a list) the scopes; ``jti`` names the
credential in the log (without it, a digest of the token does: the token itself is never written anywhere).
Every claim is checked against the limits of the Custody protocol before it can reach an event, so a token the
gateway accepts always yields an event Custody accepts.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
import jwt
from mcp.server.auth.provider import AccessToken

from custody.gateway.config import AuthConfig

__all__ = ["InvalidToken", "JwtVerifier", "Principal"]

MAX_AGENTS = 32  # the protocol's limit on a delegation chain
MAX_SCOPES = 512
MAX_NAME = 512
_ACT_KEYS = ("sub", "iss", "client_id")


class InvalidToken(Exception):
    """The bearer token is not one this gateway accepts; the message says why (never the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    agents: tuple[str, ...]  # the acting agent first, then whoever delegated to it, back to the first agent
    client_id: str
    scopes: frozenset[str]
    delegation: dict[str, Any]  # the event's delegation object
    credential: dict[str, Any]  # the event's credential object


class JwtVerifier:
    """The gateway's ``TokenVerifier`` (the ``mcp`` SDK's bearer-auth hook): a verified token is cached until it
    expires, so a session's calls pay for one signature check."""

    def __init__(self, config: AuthConfig, *, cache_size: int = 4096) -> None:
        self.config = config
        self._cache: OrderedDict[str, tuple[AccessToken, Principal]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._keys: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if config.jwks_file is not None:
            try:
                self._keys = jwt.PyJWKSet.from_json(config.jwks_file.read_text())
            except (OSError, jwt.PyJWKSetError, json.JSONDecodeError) as exc:
                raise ValueError(f"auth.jwks_file {config.jwks_file}: {exc}") from exc
        else:
            assert config.jwks_url is not None
            self._client = jwt.PyJWKClient(config.jwks_url, cache_keys=True, lifespan=300, timeout=10)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            access, _ = await self.authenticate(token)
        except InvalidToken:
            return None
        return access

    async def authenticate(self, token: str) -> tuple[AccessToken, Principal]:
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None:
                self._cache.move_to_end(token)
        if cached is not None and (cached[0].expires_at or 0) + self.config.leeway_seconds > time.time():
            return cached
        if self._client is not None:  # a JWKS fetch is blocking network I/O
            principal, expires_at = await anyio.to_thread.run_sync(self.principal, token)
        else:
            principal, expires_at = self.principal(token)
        access = AccessToken(
            token=token,
            client_id=principal.client_id,
            scopes=sorted(principal.scopes),
            expires_at=expires_at,
            subject=principal.user,
            claims={"iss": self.config.issuer},
        )
        with self._lock:
            self._cache[token] = (access, principal)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return access, principal

    def principal(self, token: str) -> tuple[Principal, int]:
        """Verify ``token`` and read its principal; InvalidToken says what is wrong."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from exc
        algorithm = header.get("alg")
        if algorithm not in self.config.algorithms:
            raise InvalidToken(f"alg {algorithm!r} is not one of {self.config.algorithms}")
        key = self._signing_key(token, header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_seconds,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(str(exc)) from exc
        return _principal(claims, token, self.config.issuer)

    def _signing_key(self, token: str, header: dict[str, Any]) -> jwt.PyJWK:
        kid = header.get("kid")
        if self._client is not None:
            try:
                return self._client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientError as exc:
                raise InvalidToken(f"no key for kid {kid!r} at the issuer's JWKS: {exc}") from exc
        assert self._keys is not None
        if kid is None:
            if len(self._keys.keys) != 1:
                raise InvalidToken("the token names no kid and the JWKS holds several keys")
            return self._keys.keys[0]
        try:
            key = self._keys[str(kid)]
        except KeyError:
            raise InvalidToken(f"no key with kid {kid!r} in the issuer's JWKS") from None
        if key.algorithm_name and key.algorithm_name != header.get("alg"):
            raise InvalidToken(f"kid {kid!r} is a {key.algorithm_name} key; the token says {header.get('alg')}")
        return key


def _principal(claims: dict[str, Any], token: str, issuer: str) -> tuple[Principal, int]:
    user = _name(claims.get("sub"), "sub")
    client_id = claims.get("client_id", claims.get("azp"))
    if client_id is None:
        raise InvalidToken("the token has no client_id (or azp) claim")
    client_id = _name(client_id, "client_id")
    scopes = _scopes(claims)
    agents: list[str] = []
    act = _actor(claims.get("act"), agents, "act") if "act" in claims else None
    expires_at = claims["exp"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or not 0 <= expires_at <= 253402300799:
        raise InvalidToken("exp must be whole epoch seconds")
    jti = claims.get("jti")
    if isinstance(jti, str) and 0 < len(jti) <= MAX_NAME:
        credential_id = jti
    else:  # never the token itself: it is a live bearer credential
        credential_id = "jwt-sha256:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    delegation: dict[str, Any] = {"sub": user, "iss": issuer, "client_id": client_id}
    if act is not None:
        delegation["act"] = act
    credential = {
        "id": credential_id,
        "kind": "agent_token",
        "client_id": client_id,
        "scopes": sorted(scopes),
        "expires_at": expires_at,
    }
    principal = Principal(user, tuple(agents), client_id, frozenset(scopes), delegation, credential)
    return principal, expires_at


def _actor(value: object, agents: list[str], place: str) -> dict[str, Any]:
    """RFC 8693 ``act``, kept to the members the protocol carries; other members of an actor are left out (they
    are claims about the actor, not part of the chain)."""
    if not isinstance(value, dict):
        raise InvalidToken(f"{place} must be an object")
    if len(agents) >= MAX_AGENTS:
        raise InvalidToken(f"the delegation chain is deeper than {MAX_AGENTS} agents")
    actor: dict[str, Any] = {key: _name(value[key], f"{place}.{key}") for key in _ACT_KEYS if key in value}
    if "sub" not in actor:
        raise InvalidToken(f"{place}.sub is missing")
    agents.append(actor["sub"])
    if "act" in value:
        actor["act"] = _actor(value["act"], agents, f"{place}.act")
    return actor


def _scopes(claims: dict[str, Any]) -> set[str]:
    if "scope" in claims:
        raw = claims["scope"]
        if not isinstance(raw, str):
            raise InvalidToken("scope must be a space-separated string")
        scopes = raw.split()
    elif "scp" in claims:
        raw = claims["scp"]
        if not isinstance(raw, list):
            raise InvalidToken("scp must be a list of strings")
        scopes = [_name(scope, "scp[]") for scope in raw]
    else:
        scopes = []
    if len(scopes) > MAX_SCOPES:
        raise InvalidToken(f"more than {MAX_SCOPES} scopes")
    for scope in scopes:
        _name(scope, "scope")
    return set(scopes)


def _name(value: object, claim: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise InvalidToken(f"{claim} must be a string of 1 to {MAX_NAME} characters")
    if any(0xD800 <= ord(char) <= 0xDFFF for char in value):
        raise InvalidToken(f"{claim} holds a lone surrogate")
    return value
