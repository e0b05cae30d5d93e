"""The server's Ed25519 signing key: it signs the server's own stream, verification checkpoints and reports.

Only ``custody serve`` creates it (``ServerKey.load_or_create``, on first start); every reader opens it through
``store.ground.layout.DataDir.server_key``, which never creates one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from store.ground.canonical import canonicalize
from store.ground.errors import CorruptState
from store.ground.keys import public_jwk

__all__ = ["ServerKey", "jwk_thumbprint"]


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint (base64url SHA-256 of the required members, canonical JSON)."""
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    digest = hashlib.sha256(canonicalize({name: jwk[name] for name in required})).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class ServerKey:
    """The server's signing key, created on first start in ``state/server_key.pem`` (mode 0600)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        jwk = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.kid = f"custody-server-{jwk_thumbprint(jwk)[:16]}"
        self.jwk = public_jwk({**jwk, "kid": self.kid})

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[ServerKey, bool]:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise CorruptState(f"{path} does not hold an Ed25519 private key")
            return cls(loaded), False
        private_key = Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
        return cls(private_key), True
