"""Build and sign raw events by hand, including broken ones, for tests that must control every byte."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from typing import Any

import orjson

from store.ground.canonical import ZERO_HASH, canonicalize, event_hash
from store.ground.errors import CanonicalizationError
from store.ground.jws import PrivateKey, sign_compact
from tests.conftest import invocation, now_rfc3339


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def payload(
    emitter: str, seq: int = 1, prev_hash: str = ZERO_HASH, tenant: str = "acme", **fields: Any
) -> dict[str, Any]:
    body = {
        "v": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": now_rfc3339(),
        "emitter": emitter,
        "tenant": tenant,
        "seq": seq,
        "prev_hash": prev_hash,
        **invocation(),
    }
    body.update(fields)
    return body


def sign(body: dict[str, Any], key: PrivateKey, kid: str) -> str:
    """Sign the canonical form; bodies JCS refuses (floats, huge integers) are signed as orjson writes them."""
    try:
        raw = canonicalize(body)
    except CanonicalizationError:
        raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return sign_compact(raw, key, kid)


def sign_raw(raw_payload: bytes, key: PrivateKey, kid: str) -> str:
    """Sign bytes that need not be canonical (or even valid) JSON."""
    return sign_compact(raw_payload, key, kid)


def hash_of(body: dict[str, Any]) -> str:
    return event_hash(canonicalize(body))


def chain(
    emitter: str,
    count: int,
    key: PrivateKey,
    kid: str,
    tenant: str = "acme",
    start: int = 1,
    prev_hash: str = ZERO_HASH,
) -> tuple[list[str], list[dict[str, Any]]]:
    """``count`` correctly chained events from seq ``start``."""
    tokens, bodies = [], []
    for seq in range(start, start + count):
        body = payload(emitter, seq, prev_hash, tenant)
        tokens.append(sign(body, key, kid))
        bodies.append(body)
        prev_hash = hash_of(body)
    return tokens, bodies


class GrowingChain:
    """One emitter's chain, signed as it is read: a load never runs out of events, however fast the machine."""

    def __init__(self, emitter: str, key: PrivateKey, kid: str, tenant: str = "acme") -> None:
        self.emitter, self.key, self.kid, self.tenant = emitter, key, kid, tenant
        self.tokens: list[str] = []
        self._prev_hash = ZERO_HASH

    def batch(self, start: int, size: int) -> list[str]:
        """The tokens of seqs ``start + 1`` to ``start + size``."""
        while len(self.tokens) < start + size:
            body = payload(self.emitter, len(self.tokens) + 1, self._prev_hash, self.tenant)
            self.tokens.append(sign(body, self.key, self.kid))
            self._prev_hash = hash_of(body)
        return self.tokens[start : start + size]


def unsigned_token(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(orjson.dumps(header))}.{b64(canonicalize(body))}.{b64(signature)}"


def hs256_token(header: dict[str, Any], body: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64(orjson.dumps(header))}.{b64(canonicalize(body))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"
