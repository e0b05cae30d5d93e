"""The emitter: sign, chain and spool each event before ``emit`` returns; a sender thread delivers the spool.

    with Emitter(url, "gw-1", "acme", key, "gw-1-k1", spool="/var/lib/gw/spool") as gateway:
        gateway.emit(type="tool.invocation", delegation=..., credential=..., tool=..., decision=...)

Guarantees (docs/sdk.md): an event ``emit`` returned for is on disk; it is sent until Custody acknowledges it
(``accepted`` or ``duplicate``), always as the very same JWS, so it is stored once under one hash; after a restart
on the same spool the chain continues at the next ``seq``; a transport error, a timeout or a 5xx is retried with
backoff for as long as it takes (Custody down for hours: the spool grows, up to ``max_spool_bytes``). A rejection
of a spooled event cannot be fixed by the SDK (the chain diverged from the server's): delivery stops there, and
``delivery.blocked`` says why; nothing is dropped.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from custody_sdk._tlog import Checkpoint, LogError, NoteKey, open_checkpoint, verify_consistency
from custody_sdk.canonical import ZERO_HASH, canonicalize, event_hash
from custody_sdk.keys import PrivateKey, sign_compact
from custody_sdk.spool import Spool, SpooledEvent

__all__ = ["Delivery", "Emitter", "LogMisbehaved", "Reservation", "SignedEvent"]

HEAD_AUDIENCE = "custody:head"
# Room reserved for one event: more than any event Custody accepts takes in the spool (a 64 KiB payload is
# 88 KiB of base64url, plus the header, the signature and the frame).
EVENT_ROOM = 96 << 10
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True, slots=True)
class SignedEvent:
    event_id: str
    seq: int
    event_hash: str
    jws: str


class LogMisbehaved(Exception):
    """The log signed something it cannot stand behind: a receipt that does not verify or leaves out an accepted
    event, a checkpoint that does not verify, or one that does not extend the last one this emitter saw (a fork
    or a rewritten history). Keep ``emitter.checkpoint``, ``emitter.delivery.receipts`` and this message."""


@dataclass
class Delivery:
    """What the sender has done: events acknowledged, the last error it is retrying after, and the rejection it
    stopped at, if any."""

    acknowledged: int = 0
    last_error: str | None = None
    blocked: str | None = None
    misbehaved: str | None = None  # a receipt that did not check out (with a pinned log key); flush raises it
    receipts: list[str] = field(default_factory=list)


class Emitter:
    def __init__(
        self,
        base_url: str,
        emitter_id: str,
        tenant: str,
        key: PrivateKey,
        kid: str,
        *,
        spool: Path | str,
        batch_size: int = 500,
        max_spool_bytes: int = 1 << 30,
        when_full: str = "raise",
        timeout: float = 10.0,
        max_backoff: float = 30.0,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        send: bool = True,
        log_key: str | None = None,
        linger: float = 0.0,
    ) -> None:
        """``linger``: seconds the sender waits for more events before it posts a batch smaller than
        ``batch_size`` (delivery, not ``emit``, waits: an event is durable in the spool when ``emit`` returns)."""
        self.emitter_id, self.tenant, self.key, self.kid = emitter_id, tenant, key, kid
        self.batch_size, self.max_backoff, self.clock, self.linger = batch_size, max_backoff, clock, linger
        self.spool = Spool(spool, max_bytes=max_spool_bytes, when_full=when_full)
        self._client = client or httpx.Client(base_url=base_url, timeout=timeout)
        self._owns_client = client is None
        self.delivery = Delivery()
        self.log_key = None if log_key is None else NoteKey.from_vkey(log_key)
        self.checkpoint: Checkpoint | None = None  # the newest checkpoint seen and checked (check_log)
        self._emitting = threading.Lock()  # seq and prev_hash are taken and spooled in one step
        self._stop = threading.Event()
        self._head = self.spool.head
        self._sender: threading.Thread | None = None
        if send:
            self._sender = threading.Thread(target=self._send_loop, name=f"custody-sender-{emitter_id}", daemon=True)
            self._sender.start()

    # -- emitting -----------------------------------------------------------------------------------------------

    def emit(self, **fields: Any) -> SignedEvent:
        """Sign the event after the chain's head and append it to the spool; return once it is on disk."""
        return self._emit(fields, reserved=0)

    def reserve(self) -> Reservation:
        """Room in the spool for one event, taken now: SpoolFull (or a wait, with ``when_full="block"``) if there is
        none. For "no audit, no action": reserve, act, then ``reservation.emit(...)`` the record of what happened,
        which cannot fail for want of room. Use it as a context manager; room not used is given back."""
        self.spool.reserve(EVENT_ROOM)
        return Reservation(self)

    def _emit(self, fields: dict[str, Any], *, reserved: int) -> SignedEvent:
        with self._emitting:
            seq, previous = self._chain_head()
            payload = {
                "v": 1,
                "event_id": str(uuid.uuid4()),
                "occurred_at": self.clock().astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                **fields,
                "emitter": self.emitter_id,
                "tenant": self.tenant,
                "seq": seq + 1,
                "prev_hash": previous,
            }
            canonical = canonicalize(payload)
            digest = event_hash(canonical)
            jws = sign_compact(canonical, self.key, self.kid)
            place = self.spool.write(SpooledEvent(seq + 1, payload["event_id"], digest, jws), reserved=reserved)
            self._head = (seq + 1, digest)
        self.spool.wait_durable(place)  # outside the chain's lock: threads emitting at once share one fdatasync
        return SignedEvent(payload["event_id"], seq + 1, digest, jws)

    def chain_head(self) -> tuple[int, str]:
        """(seq, event hash) the next event chains after: the spool's last event, or, for a new empty spool, the
        server's head, asked once with a head proof (an ``httpx.HTTPError`` if Custody cannot be asked). A gateway
        calls it at start, so that Custody being away later does not stop its first event."""
        with self._emitting:
            return self._chain_head()

    @property
    def resumed(self) -> bool:
        """Whether the chain head is known (``chain_head`` will not ask Custody)."""
        return self._head is not None

    def _chain_head(self) -> tuple[int, str]:
        if self._head is None:
            self._head = self._server_head()
        return self._head

    def _server_head(self) -> tuple[int, str]:
        now = int(time.time())
        claims = {"sub": self.emitter_id, "aud": HEAD_AUDIENCE, "iat": now, "exp": now + 120}
        proof = sign_compact(json.dumps(claims).encode(), self.key, self.kid, {"typ": "JWT"})
        response = self._client.get(
            f"/v1/emitters/{self.emitter_id}/head", headers={"Authorization": f"Bearer {proof}"}
        )
        if response.status_code == 404:
            return 0, ZERO_HASH
        response.raise_for_status()
        head = response.json()
        return int(head["seq"]), str(head["hash"])

    # -- delivering ---------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            if not self.spool.wait_for_events(0.5) or self.delivery.blocked:
                if self.delivery.blocked:
                    self._stop.wait(self.max_backoff)
                continue
            if self.linger and self.spool.pending < self.batch_size:
                self._stop.wait(self.linger)  # let a batch gather: one request for many events
            if self._send_once():
                backoff = 0.1
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _send_once(self) -> bool:
        """Post one batch of the spool; True when it was answered (acknowledged or rejected), False to retry."""
        batch = self.spool.unsent(self.batch_size)
        if not batch:
            return True
        try:
            response = self._client.post("/v1/events", json={"events": [event.jws for event in batch]})
        except httpx.HTTPError as exc:
            self.delivery.last_error = f"{type(exc).__name__}: {exc}"
            return False
        if response.status_code in _RETRY_STATUSES or response.status_code >= 500:
            self.delivery.last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            return False
        if response.status_code != 200:
            self.delivery.blocked = f"HTTP {response.status_code}: {response.text[:500]}"
            return True
        body = response.json()
        done = 0
        for result in body["results"]:
            if result["status"] not in ("accepted", "duplicate"):
                self.delivery.blocked = (
                    f"event {result['event_id']} was rejected: {result['error']}: {result['detail']};"
                    " the spool keeps it and every event after it"
                )
                break
            done += 1
        self._check_receipt(batch, body)
        self.spool.mark_sent(done)
        self.delivery.acknowledged += done
        self.delivery.last_error = None
        if body.get("receipt"):
            self.delivery.receipts.append(body["receipt"])
        return True

    def _check_receipt(self, batch: list[SpooledEvent], body: dict[str, Any]) -> None:
        """With a pinned log key: the receipt must verify and name every accepted event with its hash and index."""
        if self.log_key is None:
            return
        accepted = {r["event_id"]: r.get("log_index") for r in body["results"] if r["status"] == "accepted"}
        if not accepted:
            return
        receipt = body.get("receipt")
        claims = _verified_claims(receipt, self.log_key) if isinstance(receipt, str) else None
        if claims is None:
            self.delivery.misbehaved = f"the ack's receipt does not verify with the log key {self.log_key.vkey}"
            return
        hashes = {event.event_id: event.event_hash for event in batch}
        named = {e.get("event_id"): (e.get("log_index"), e.get("event_hash")) for e in claims.get("events", [])}
        for event_id, index in accepted.items():
            if named.get(event_id) != (index, hashes.get(event_id)):
                self.delivery.misbehaved = f"the receipt does not name accepted event {event_id} at log index {index}"
                return

    def check_log(self) -> Checkpoint:
        """Fetch the newest checkpoint, verify it with the log key and that it extends the last one seen (RFC 6962
        consistency proof); raise LogMisbehaved if not. Returns it, kept as the last seen."""
        if self.log_key is None:
            raise ValueError("check_log needs the log's verifier key: Emitter(..., log_key=...)")
        response = self._client.get("/checkpoint")
        response.raise_for_status()
        try:
            checkpoint = open_checkpoint(response.text, self.log_key)
        except LogError as exc:
            raise LogMisbehaved(f"the log's checkpoint: {exc}") from exc
        previous = self.checkpoint
        if previous is not None and previous.size > 0:
            if checkpoint.size < previous.size:
                raise LogMisbehaved(f"the log went back from size {previous.size} to {checkpoint.size}")
            params = {"from": previous.size, "to": checkpoint.size}
            answer = self._client.get("/v1/log/consistency", params=params)
            answer.raise_for_status()
            proof = [base64.b64decode(item) for item in answer.json()["proof"]]
            try:
                verify_consistency(previous.size, checkpoint.size, proof, previous.root, checkpoint.root)
            except LogError as exc:
                raise LogMisbehaved(
                    f"checkpoint {checkpoint.size} does not extend checkpoint {previous.size} this emitter saw: {exc}"
                ) from exc
        self.checkpoint = checkpoint
        return checkpoint

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until Custody has acknowledged everything spooled; TimeoutError (the events stay spooled)."""
        if self._sender is None:
            while self.spool.pending and not self.delivery.blocked:
                if not self._send_once():
                    raise TimeoutError(f"Custody is not reachable: {self.delivery.last_error}")
        elif not self.spool.wait_until_empty(timeout):
            error = self.delivery.last_error or "no error"
            raise TimeoutError(
                f"{self.spool.pending} events not acknowledged after {timeout} s ({error}); they stay in the spool"
            )
        if self.delivery.misbehaved:
            raise LogMisbehaved(self.delivery.misbehaved)
        if self.delivery.blocked:
            raise RuntimeError(self.delivery.blocked)

    def close(self) -> None:
        self._stop.set()
        if self._sender is not None:
            self._sender.join()
        if self._owns_client:
            self._client.close()
        self.spool.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reservation:
    """Room for one event in an emitter's spool (``Emitter.reserve``)."""

    def __init__(self, emitter: Emitter) -> None:
        self._emitter: Emitter | None = emitter

    def emit(self, **fields: Any) -> SignedEvent:
        """``Emitter.emit`` into the reserved room; once only."""
        emitter, self._emitter = self._emitter, None
        if emitter is None:
            raise RuntimeError("this reservation was used or released already")
        return emitter._emit(fields, reserved=EVENT_ROOM)

    def release(self) -> None:
        emitter, self._emitter = self._emitter, None
        if emitter is not None:
            emitter.spool.release(EVENT_ROOM)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _verified_claims(receipt: str, key: NoteKey) -> dict[str, Any] | None:
    """The payload of a compact JWS signed (EdDSA) by the log's key, or None."""
    parts = receipt.split(".")
    if len(parts) != 3:
        return None
    try:
        signature = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        Ed25519PublicKey.from_public_bytes(key.public).verify(signature, f"{parts[0]}.{parts[1]}".encode())
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (InvalidSignature, ValueError):
        return None
    return claims if isinstance(claims, dict) else None
