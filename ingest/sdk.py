"""The in-process emitter the tests' harness and the demo's bulk backfill use: events queued in memory, posted by
``flush``. Gateways and agent runtimes use custody-sdk (``sdk/python``: a durable spool, receipts and checkpoints
checked against the log's key); this one keeps nothing on disk and checks nothing of the log.

    key = generate_key()                                  # Ed25519; generate_key("ES256") for P-256
    admin.register(...)                                   # once: PUT /v1/emitters/gw-1 with public_jwk(key, "gw-1-k1")
    emitter = Emitter("http://127.0.0.1:8700", "gw-1", "acme", key, "gw-1-k1")
    emitter.recover_head()                                # after a restart: continue the chain where the server is
    emitter.emit(type="tool.invocation", delegation=..., credential=..., tool=..., decision=...)
    emitter.flush()                                       # or let batches of ``batch_size`` go out by themselves

``emit`` assigns ``seq`` and ``prev_hash``, fills ``v``, ``event_id``, ``occurred_at``, ``emitter`` and ``tenant``,
canonicalizes (RFC 8785) and signs. ``flush`` posts in order and retries after timeouts, connection errors and 503
with the very same JWS, so a retry of an event that did land comes back ``duplicate``, never twice. Rejections raise
``EventsRejected``; the events after a rejected one are re-chained from the server's head and sent by the next
flush. All methods are thread-safe.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ingest.auth import HEAD_AUDIENCE
from store.ground.canonical import ZERO_HASH, canonicalize, event_hash
from store.ground.jws import PrivateKey, public_jwk, sign_compact

__all__ = [
    "Emitter",
    "EventsRejected",
    "SignedEvent",
    "generate_key",
    "public_jwk",
    "rfc3339",
]


_RECHAINABLE = frozenset({"after_rejected", "chain_gap", "chain_conflict"})


class EventsRejected(Exception):
    """The server rejected events; ``results`` are the rejected results as the server sent them.

    Events rejected only for their place in the chain (after_rejected, chain_gap, chain_conflict) stay queued,
    re-signed after the server's head; the others are dropped (their content was refused)."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        first = results[0]
        super().__init__(
            f"{len(results)} event(s) rejected; first: {first['event_id']}: {first['error']}: {first['detail']}"
        )
        self.results = results


def generate_key(alg: str = "EdDSA") -> PrivateKey:
    if alg == "EdDSA":
        return Ed25519PrivateKey.generate()
    if alg == "ES256":
        return generate_private_key(SECP256R1())
    raise ValueError(f"alg must be EdDSA or ES256, got {alg!r}")


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T08:00:00.123456Z`` (UTC, microseconds)."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


@dataclass(frozen=True, slots=True)
class SignedEvent:
    event_id: str
    seq: int
    event_hash: str
    jws: str
    fields: dict[str, Any]


class Emitter:
    def __init__(
        self,
        base_url: str,
        emitter_id: str,
        tenant: str,
        key: PrivateKey,
        kid: str,
        *,
        batch_size: int = 500,
        timeout: float = 10.0,
        max_attempts: int = 8,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.emitter_id = emitter_id
        self.tenant = tenant
        self.key = key
        self.kid = kid
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.clock = clock
        self._client = client or httpx.Client(base_url=base_url, timeout=timeout)
        self._owns_client = client is None
        self._seq = 0
        self._hash = ZERO_HASH
        self._queue: list[SignedEvent] = []
        self._state = threading.Lock()  # seq, hash, queue
        self._sending = threading.Lock()  # one POST at a time, so batches land in order

    @property
    def head(self) -> tuple[int, str]:
        with self._state:
            return self._seq, self._hash

    def recover_head(self) -> tuple[int, str]:
        """Read this emitter's head from the server (a signed head proof) and continue the chain from it."""
        now = int(time.time())
        proof = jwt.encode(
            {"sub": self.emitter_id, "aud": HEAD_AUDIENCE, "iat": now, "exp": now + 60},
            self.key,
            algorithm="EdDSA" if isinstance(self.key, Ed25519PrivateKey) else "ES256",
            headers={"kid": self.kid},
        )
        response = self._request(
            "GET", f"/v1/emitters/{self.emitter_id}/head", headers={"Authorization": f"Bearer {proof}"}
        )
        head = response.json()
        with self._state:
            if self._queue:
                raise RuntimeError("recover_head with unsent events would fork the chain; flush first")
            self._seq, self._hash = int(head["seq"]), str(head["hash"])
            return self._seq, self._hash

    def emit(self, **fields: Any) -> SignedEvent:
        """Sign one event (fields of the protocol, without seq/prev_hash) and queue it; returns it."""
        with self._state:
            event = self._sign(dict(fields))
            self._queue.append(event)
            full = len(self._queue) >= self.batch_size
        if full:
            self.flush()
        return event

    def _sign(self, fields: dict[str, Any]) -> SignedEvent:
        fields.setdefault("event_id", str(uuid.uuid4()))
        fields.setdefault("occurred_at", rfc3339(self.clock()))
        payload = {
            **fields,
            "v": 1,
            "emitter": self.emitter_id,
            "tenant": self.tenant,
            "seq": self._seq + 1,
            "prev_hash": self._hash,
        }
        canonical = canonicalize(payload)
        digest = event_hash(canonical)
        signed = SignedEvent(
            payload["event_id"], self._seq + 1, digest, sign_compact(canonical, self.key, self.kid), fields
        )
        self._seq, self._hash = signed.seq, digest
        return signed

    def flush(self) -> list[dict[str, Any]]:
        """Send everything queued; return the results. Raises EventsRejected after sending what could be sent."""
        results: list[dict[str, Any]] = []
        with self._sending:
            while True:
                with self._state:
                    batch = self._queue[: self.batch_size]
                if not batch:
                    return results
                body = self._request("POST", "/v1/events", json={"events": [event.jws for event in batch]}).json()
                results.extend(body["results"])
                rejected = [result for result in body["results"] if result["status"] == "rejected"]
                with self._state:
                    del self._queue[: len(batch)]
                    if rejected:
                        self._rechain(batch, body, rejected)
                if rejected:
                    raise EventsRejected(rejected)

    def _rechain(self, batch: list[SignedEvent], body: dict[str, Any], rejected: list[dict[str, Any]]) -> None:
        """Continue from the server's head: faulty events are dropped, the innocent ones re-signed after it."""
        head = body["heads"].get(self.emitter_id, {"seq": 0, "hash": ZERO_HASH})
        innocent_ids = {r["event_id"] for r in rejected if r["error"] in _RECHAINABLE}
        innocent = [event for event in batch if event.event_id in innocent_ids]
        later = self._queue
        self._seq, self._hash = int(head["seq"]), str(head["hash"])
        self._queue = [self._sign(dict(event.fields)) for event in [*innocent, *later]]

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        delay = 0.1
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.max_attempts:
                    raise
            else:
                if response.status_code < 500:
                    response.raise_for_status()
                    return response
                if attempt == self.max_attempts:
                    response.raise_for_status()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
