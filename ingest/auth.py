"""Who may call what: the admin token, and emitter-signed proofs for reading one's own chain head.

Admin calls carry ``Authorization: Bearer <CUSTODY_ADMIN_TOKEN>``; only its SHA-256 is kept in memory and the
comparison is constant-time. An emitter that restarted reads its head with ``Authorization: Bearer <proof>``,
where the proof is a short JWT signed by one of its own unrevoked keys:
``{"sub": "<emitter id>", "aud": "custody:head", "iat": <now>, "exp": <now + at most 300>}``.
"""

from __future__ import annotations

import hashlib
import hmac

import jwt

from store.ground.envelope import bearer
from store.ground.errors import Unauthorized
from store.ground.keys import KeyRing

__all__ = ["HEAD_AUDIENCE", "MAX_PROOF_LIFETIME", "AdminToken", "verify_head_proof"]

HEAD_AUDIENCE = "custody:head"
MAX_PROOF_LIFETIME = 300
MIN_TOKEN_LENGTH = 16


class AdminToken:
    def __init__(self, token: str) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"CUSTODY_ADMIN_TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
        self._digest = hashlib.sha256(token.encode()).digest()
        self.actor = f"admin:{self._digest.hex()[:12]}"

    def matches(self, presented: str | None) -> bool:
        if presented is None:
            return False
        return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._digest)

    def require(self, authorization: str | None) -> str:
        """The actor name of a valid admin call; raises Unauthorized otherwise."""
        if not self.matches(bearer(authorization)):
            raise Unauthorized("this call needs Authorization: Bearer <admin token>")
        return self.actor


def verify_head_proof(token: str, emitter_id: str, keys: KeyRing) -> None:
    """Accept a JWT signed by an unrevoked key of ``emitter_id`` for the head audience; raise Unauthorized."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"not an admin token and not a head proof: {exc}") from exc
    entry = keys.get(kid) if isinstance(kid, str) else None
    if entry is None or entry.emitter != emitter_id:
        raise Unauthorized(f"the proof's kid {kid!r} is not a key of {emitter_id}")
    if entry.revoked_at is not None:
        raise Unauthorized(f"key {kid!r} was revoked at {entry.revoked_at}")
    try:
        claims = jwt.decode(
            token,
            key=entry.key,
            algorithms=[entry.alg],
            audience=HEAD_AUDIENCE,
            options={"require": ["exp", "iat", "sub", "aud"]},
            leeway=30,
        )
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"head proof rejected: {exc}") from exc
    if claims["sub"] != emitter_id:
        raise Unauthorized(f"the proof is for {claims['sub']!r}, not {emitter_id!r}")
    if not isinstance(claims["iat"], int) or not isinstance(claims["exp"], int):
        raise Unauthorized("iat and exp must be integers")
    if claims["exp"] - claims["iat"] > MAX_PROOF_LIFETIME:
        raise Unauthorized(f"the proof lives {claims['exp'] - claims['iat']} s; at most {MAX_PROOF_LIFETIME} s")
