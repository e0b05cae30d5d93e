"""Emitter public keys: JWK validation on registration, and the in-memory key ring ingest verifies against.

A registered key is a public JWK, Ed25519 (``kty`` OKP) or P-256 (``kty`` EC), with a ``kid`` unique across all
emitters (the JWS header names only the kid, so the kid alone must say which emitter signed). A JWK carrying a
private part (``d``) is refused: it means the caller's secret has already leaked into an admin request.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from jwt.exceptions import InvalidKeyError
from nacl.bindings import crypto_core_ed25519_is_valid_point

from store.ground.errors import InvalidInput
from store.ground.jws import ALG_FOR_KTY, PublicKey

__all__ = ["KeyEntry", "KeyRing", "KeySpec", "public_jwk", "validate_jwk"]

_KID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch only
_ALLOWED_MEMBERS = {
    "OKP": {"kty", "crv", "x", "kid", "alg", "use"},
    "EC": {"kty", "crv", "x", "y", "kid", "alg", "use"},
}
_CURVE = {"OKP": "Ed25519", "EC": "P-256"}


def validate_jwk(jwk: object, where: str) -> tuple[dict[str, Any], PublicKey]:
    """Check a JWK from an admin request; return its normalized public form and the key object."""
    if not isinstance(jwk, dict):
        raise InvalidInput(f"{where}: a JWK must be an object, got {type(jwk).__name__}")
    kty = jwk.get("kty")
    if kty not in _CURVE:
        raise InvalidInput(f"{where}: kty must be OKP (Ed25519) or EC (P-256), got {kty!r}")
    if "d" in jwk:
        raise InvalidInput(f"{where}: the JWK holds a private key (member d); send only the public key")
    unknown = set(jwk) - _ALLOWED_MEMBERS[kty]
    if unknown:
        raise InvalidInput(f"{where}: unexpected JWK members {sorted(unknown)}")
    if jwk.get("crv") != _CURVE[kty]:
        raise InvalidInput(f"{where}: crv must be {_CURVE[kty]} for kty {kty}, got {jwk.get('crv')!r}")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise InvalidInput(f"{where}: kid must match {_KID.pattern}, got {kid!r}")
    alg = jwk.get("alg")
    if alg is not None and alg != ALG_FOR_KTY[kty]:
        raise InvalidInput(f"{where}: alg must be {ALG_FOR_KTY[kty]} for kty {kty}, got {alg!r}")
    if jwk.get("use", "sig") != "sig":
        raise InvalidInput(f"{where}: use must be sig, got {jwk.get('use')!r}")
    normalized = public_jwk(jwk)
    try:
        key = _load(normalized)
    except (InvalidKeyError, ValueError, TypeError) as exc:
        raise InvalidInput(f"{where}: not a valid {_CURVE[kty]} public key: {exc}") from exc
    if isinstance(key, Ed25519PublicKey) and not crypto_core_ed25519_is_valid_point(key.public_bytes_raw()):
        # A small-order or non-canonical point: no signature under it would ever verify (store/ground/jws.py), and
        # under the identity point a fixed 'signature' fits every message in verifiers that accept it.
        raise InvalidInput(f"{where}: x is not a usable Ed25519 public key (a small-order or non-canonical point)")
    return normalized, key


def public_jwk(jwk: dict[str, Any]) -> dict[str, Any]:
    """The members that identify a public key, in a fixed form (used to compare two registrations)."""
    members = ("kty", "crv", "x", "y", "kid")
    return {name: jwk[name] for name in members if name in jwk}


def _load(jwk: dict[str, Any]) -> PublicKey:
    key: Any = OKPAlgorithm.from_jwk(jwk) if jwk["kty"] == "OKP" else ECAlgorithm.from_jwk(jwk)
    if not isinstance(key, PublicKey):  # from_jwk returns a private key when d is present
        raise ValueError("expected a public key")
    return key


@dataclass(frozen=True, slots=True)
class KeyEntry:
    kid: str
    emitter: str
    tenant: str
    alg: str
    key: PublicKey
    revoked_at: str | None


KeySpec = tuple[str, str, str, dict[str, Any], str | None]  # kid, emitter, tenant, public JWK, revoked_at


class KeyRing:
    """kid -> key entry, rebuilt from the registry; lookups are lock-free dict reads.

    ``version`` changes on every load and ``specs`` is the picklable form, so verifier processes can hold a copy
    and rebuild it only when it changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, KeyEntry] = {}
        self.version = 0
        self.specs: list[KeySpec] = []

    def load_specs(self, specs: list[KeySpec], version: int) -> None:
        entries = {
            kid: KeyEntry(kid, emitter, tenant, ALG_FOR_KTY[jwk["kty"]], _load(jwk), revoked_at)
            for kid, emitter, tenant, jwk, revoked_at in specs
        }
        with self._lock:
            self._entries = entries
            self.specs = specs
            self.version = version

    def snapshot(self) -> tuple[int, list[KeySpec]]:
        """(version, specs), read together."""
        with self._lock:
            return self.version, self.specs

    def get(self, kid: str) -> KeyEntry | None:
        return self._entries.get(kid)
