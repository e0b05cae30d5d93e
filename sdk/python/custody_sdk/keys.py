"""Keys and compact JWS signatures (EdDSA with Ed25519, ES256 with P-256), with ``cryptography`` only."""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = ["PrivateKey", "generate_key", "public_jwk", "sign_compact"]

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def generate_key(alg: str = "EdDSA") -> PrivateKey:
    if alg == "EdDSA":
        return Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"alg must be EdDSA or ES256, not {alg!r}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(key: PrivateKey, kid: str) -> dict[str, str]:
    """The public JWK to register for ``key`` under ``kid``."""
    if isinstance(key, Ed25519PrivateKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": kid, "alg": "EdDSA"}
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
        "kid": kid,
        "alg": "ES256",
    }


@functools.lru_cache(maxsize=64)
def _header(alg: str, kid: str) -> str:
    """An event's protected header, encoded: the same for every event an emitter signs."""
    return _b64(json.dumps({"alg": alg, "kid": kid}, separators=(",", ":")).encode())


def sign_compact(payload: bytes, key: PrivateKey, kid: str, extra: dict[str, Any] | None = None) -> str:
    """``payload`` signed as a compact JWS with ``kid`` (and ``extra`` header fields) in the protected header."""
    alg = "EdDSA" if isinstance(key, Ed25519PrivateKey) else "ES256"
    header = (
        _header(alg, kid)
        if extra is None
        else _b64(json.dumps({"alg": alg, "kid": kid, **extra}, separators=(",", ":")).encode())
    )
    signing_input = f"{header}.{_b64(payload)}".encode()
    if isinstance(key, Ed25519PrivateKey):
        signature = key.sign(signing_input)
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{_b64(signature)}"
