"""JWS compact serialization for Custody events: parsing, verification and signing.

Only ``EdDSA`` (Ed25519) and ``ES256`` (P-256) are accepted, and the header's ``alg`` must match the registered
key's type, so neither ``none`` nor an HMAC keyed with a public key can ever verify. Parsing is done here rather
than through ``jwt.decode`` because the payload is an event, not a JWT claim set, and because PyJWT's claim
handling costs ~60 us per token on the hottest path of the server; PyJWT's key and algorithm classes do the
cryptography (JWK import, the raw <-> DER conversion of ECDSA signatures), except Ed25519 verification.

Ed25519 signatures are verified by libsodium (PyNaCl): 112 us a verify here against 177 us through OpenSSL, and
verification is most of the ingest server's work. libsodium accepts a subset of what OpenSSL accepts: the same
cofactorless equation, and it also refuses small-order public keys and ``R``, and non-canonical encodings, which
honest signers never produce. Every verification in Custody (ingest, ``custody verify``, checkpoints, reports)
goes through ``verify_signature``, so what ingest accepts, verification accepts.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from jwt.utils import base64url_encode
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

__all__ = [
    "ALG_FOR_KTY",
    "JwsError",
    "ParsedJws",
    "PrivateKey",
    "PublicKey",
    "decode_payload",
    "parse_compact",
    "public_jwk",
    "sign_compact",
    "verify_signature",
]

PublicKey = Ed25519PublicKey | EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | EllipticCurvePrivateKey

ALG_FOR_KTY = {"OKP": "EdDSA", "EC": "ES256"}
_SUPPORTED_ALGS = frozenset(ALG_FOR_KTY.values())
_MAX_COMPACT_LENGTH = 128 * 1024
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_HEADERS: dict[str, tuple[str, str]] = {}  # protected header (base64url) -> (alg, kid), for headers that passed
_MAX_HEADERS = 4096
_ED25519 = OKPAlgorithm()
_ES256 = ECAlgorithm(ECAlgorithm.SHA256)


class JwsError(Exception):
    """A token that is not a usable JWS; ``code`` is the protocol error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ParsedJws:
    alg: str
    kid: str
    signing_input: bytes
    payload: bytes
    signature: bytes


def parse_compact(token: object) -> ParsedJws:
    """Split and decode a compact JWS; check the header only (the signature is checked by ``verify_signature``)."""
    if not isinstance(token, str):
        raise JwsError("malformed_jws", f"expected a JWS compact string, got {type(token).__name__}")
    if len(token) > _MAX_COMPACT_LENGTH:
        raise JwsError("malformed_jws", f"JWS is {len(token)} characters, more than {_MAX_COMPACT_LENGTH}")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwsError("malformed_jws", f"expected 3 dot-separated parts, got {len(parts)}")
    header_b64, payload_b64, signature_b64 = parts
    if not token.isascii():
        raise JwsError("malformed_jws", "JWS holds non-ASCII characters")
    alg, kid = _header(header_b64)
    payload = _b64decode(payload_b64, "payload")
    signature = _b64decode(signature_b64, "signature")
    return ParsedJws(
        alg=alg,
        kid=kid,
        signing_input=token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii"),
        payload=payload,
        signature=signature,
    )


def _header(header_b64: str) -> tuple[str, str]:
    """``alg`` and ``kid`` of a protected header. An emitter sends the same header on every event, so good headers
    are remembered (a bounded cache: decoding and checking one costs more than the dict lookup)."""
    known = _HEADERS.get(header_b64)
    if known is not None:
        return known
    try:
        header = orjson.loads(_b64decode(header_b64, "header"))
    except orjson.JSONDecodeError as exc:
        raise JwsError("malformed_jws", f"protected header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise JwsError("malformed_jws", "protected header is not a JSON object")
    alg = header.get("alg")
    if alg not in _SUPPORTED_ALGS:
        raise JwsError("unsupported_alg", f"alg must be EdDSA or ES256, got {alg!r}")
    if "crit" in header:
        raise JwsError("malformed_jws", "crit header parameters are not supported")
    if header.get("b64", True) is not True:
        raise JwsError("malformed_jws", "unencoded payloads (b64: false) are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwsError("malformed_jws", "protected header has no kid string")
    if len(_HEADERS) >= _MAX_HEADERS:
        _HEADERS.clear()
    _HEADERS[header_b64] = (alg, kid)
    return alg, kid


def verify_signature(parsed: ParsedJws, key: PublicKey) -> bool:
    """True when the signature is valid for ``key``; the caller has matched ``alg`` to the key type."""
    if isinstance(key, Ed25519PublicKey):
        return parsed.alg == "EdDSA" and _verify_ed25519(parsed.signing_input, key, parsed.signature)
    if isinstance(key, EllipticCurvePublicKey):
        return parsed.alg == "ES256" and _ES256.verify(parsed.signing_input, key, parsed.signature)
    return False


def _verify_ed25519(message: bytes, key: Ed25519PublicKey, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + message, key.public_bytes_raw())
    except BadSignatureError:
        return False
    return True


def public_jwk(key: PrivateKey, kid: str) -> dict[str, str]:
    """The public JWK of a signing key, with ``kid``: what an emitter registers."""
    if isinstance(key, Ed25519PrivateKey):
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**{name: str(value) for name, value in jwk.items()}, "kid": kid}


def sign_compact(payload: bytes, key: PrivateKey, kid: str) -> str:
    """Sign ``payload`` bytes as a compact JWS with ``kid`` in the protected header."""
    alg = "EdDSA" if isinstance(key, Ed25519PrivateKey) else "ES256"
    header = base64url_encode(orjson.dumps({"alg": alg, "kid": kid}))
    body = base64url_encode(payload)
    signing_input = header + b"." + body
    signer: Any = _ED25519 if alg == "EdDSA" else _ES256
    signature = base64url_encode(signer.sign(signing_input, key))
    return (signing_input + b"." + signature).decode("ascii")


def _b64decode(part: str, name: str) -> bytes:
    """Unpadded base64url, strictly: the standard alphabet's ``+``, ``/`` and ``=`` are refused before the URL-safe
    characters are mapped onto them, and the strict decoder refuses anything else outside the alphabet."""
    if len(part) % 4 == 1 or "+" in part or "/" in part or "=" in part:
        raise JwsError("malformed_jws", f"{name} is not unpadded base64url")
    try:
        return binascii.a2b_base64(
            part.encode("ascii").translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(part) % 4), strict_mode=True
        )
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise JwsError("malformed_jws", f"{name} is not unpadded base64url: {exc}") from exc


def decode_payload(jws: str) -> dict[str, Any]:
    """The JSON payload of a compact JWS (no verification: the caller trusts or re-verifies it)."""
    payload_b64 = jws.split(".")[1]
    payload: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    return payload
