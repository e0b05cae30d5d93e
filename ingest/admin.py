"""Emitter administration, recorded in the log itself.

Every change (an emitter registered, a key added, a key revoked) is an event of the server's own stream: emitter
``custody.server``, tenant ``_system``, signed with the server's Ed25519 key, hash-chained like any other stream.
The registry in ``state.sqlite`` is just the fold of that stream, so the audit log audits its own configuration:
who could sign as whom, and since when, can be proven from the log. Admin event types are ``admin.server_key``
(seq 1: the server's public key), ``admin.emitter_registered``, ``admin.key_added`` and ``admin.key_revoked``;
the change itself is in the payload's ``admin`` object.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ingest.event import EMITTER_ID
from ingest.service import IngestService
from store.ground.canonical import canonicalize, event_hash
from store.ground.errors import Conflict, CorruptState, InvalidInput, NotFound
from store.ground.jws import sign_compact
from store.ground.keys import KeyRing, public_jwk, validate_jwk
from store.ground.layout import SERVER_EMITTER, SYSTEM_TENANT
from store.ground.server_key import ServerKey
from store.sequencing import ChainView, Decision
from store.state import Head
from store.wal import WalRecord

__all__ = ["EMITTER_KINDS", "Registry"]

EMITTER_KINDS = ("gateway", "agent", "idp")


class Registry:
    """Admin operations. Each is serialized on the server stream's lock and made durable before it returns."""

    def __init__(self, service: IngestService, keys: KeyRing, server_key: ServerKey) -> None:
        self.service = service
        self.store = service.store
        self.keys = keys
        self.server_key = server_key

    def start(self, key_is_new: bool) -> None:
        """Load the key ring; on a new data dir, open the server stream with the server's public key."""
        emitters = self.store.state.emitters()
        server = emitters.get(SERVER_EMITTER)
        if server is None:
            if self.service.head(SERVER_EMITTER).seq:
                raise CorruptState("the server stream exists but registers no server key")
            self._record(
                "admin.server_key",
                [
                    {
                        "action": "server_key",
                        "emitter": SERVER_EMITTER,
                        "tenant": SYSTEM_TENANT,
                        "kind": "server",
                        "kid": self.server_key.kid,
                        "jwk": self.server_key.jwk,
                    }
                ],
            )
        elif self.server_key.kid not in server.kids:
            state = "was just created" if key_is_new else "is not the one the log registered"
            raise CorruptState(
                f"the server key in state/server_key.pem {state} (kid {self.server_key.kid}; the log has"
                f" {', '.join(server.kids)}); restore the original key file"
            )
        self.reload()

    def put_emitter(self, emitter_id: str, body: object, actor: str) -> tuple[dict[str, Any], bool]:
        """Create the emitter or add keys; return its view and whether anything changed."""
        _check_emitter_id(emitter_id)
        if not isinstance(body, dict):
            raise InvalidInput("body must be a JSON object with tenant, kind and keys")
        unknown = set(body) - {"tenant", "kind", "keys"}
        if unknown:
            raise InvalidInput(f"unexpected members {sorted(unknown)}; expected tenant, kind, keys")
        tenant, kind, jwks = body.get("tenant"), body.get("kind"), body.get("keys")
        if not isinstance(tenant, str) or not EMITTER_ID.fullmatch(tenant):
            raise InvalidInput(f"tenant must match {EMITTER_ID.pattern}, got {tenant!r}")
        if kind not in EMITTER_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(EMITTER_KINDS)}, got {kind!r}")
        if not isinstance(jwks, list) or not jwks or len(jwks) > 32:
            raise InvalidInput("keys must be a list of 1 to 32 public JWKs")
        validated = [validate_jwk(jwk, f"keys[{index}]")[0] for index, jwk in enumerate(jwks)]
        kids = [jwk["kid"] for jwk in validated]
        if len(set(kids)) != len(kids):
            raise InvalidInput(f"keys repeat a kid: {kids}")
        with self.service.sequencer.registry_lock():
            emitters = self.store.state.emitters()
            registered = self.store.state.keys()
            existing = emitters.get(emitter_id)
            changes: list[dict[str, Any]] = []
            if existing is None:
                changes.append(
                    {
                        "action": "emitter_registered",
                        "emitter": emitter_id,
                        "tenant": tenant,
                        "kind": kind,
                        "actor": actor,
                    }
                )
            elif (existing.tenant, existing.kind) != (tenant, kind):
                raise Conflict(
                    f"emitter {emitter_id} is registered with tenant {existing.tenant!r} and kind {existing.kind!r};"
                    f" got tenant {tenant!r} and kind {kind!r} (an emitter never moves)"
                )
            for jwk in validated:
                known = registered.get(jwk["kid"])
                if known is None:
                    changes.append(
                        {"action": "key_added", "emitter": emitter_id, "kid": jwk["kid"], "jwk": jwk, "actor": actor}
                    )
                elif known.emitter != emitter_id:
                    raise Conflict(f"kid {jwk['kid']!r} already belongs to emitter {known.emitter}")
                elif public_jwk(known.jwk) != jwk:
                    raise Conflict(
                        f"kid {jwk['kid']!r} of {emitter_id} is registered with another key; keys are never"
                        " replaced: register the new key under a new kid and revoke the old one"
                    )
            if changes:
                self._record_locked([_event_type(change) for change in changes], changes)
        return self.view(emitter_id), bool(changes)

    def revoke_key(self, emitter_id: str, kid: str, reason: str | None, actor: str) -> tuple[dict[str, Any], bool]:
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1024):
            raise InvalidInput("reason must be a string of at most 1024 characters")
        with self.service.sequencer.registry_lock():
            key = self.store.state.keys().get(kid)
            if key is None or key.emitter != emitter_id:
                raise NotFound(f"emitter {emitter_id} has no key {kid!r}")
            if emitter_id == SERVER_EMITTER:
                raise InvalidInput("the server's own key cannot be revoked through the API")
            changed = key.revoked_at is None
            if changed:
                change = {"action": "key_revoked", "emitter": emitter_id, "kid": kid, "reason": reason, "actor": actor}
                self._record_locked(["admin.key_revoked"], [change])
        return self.view(emitter_id), changed

    def view(self, emitter_id: str) -> dict[str, Any]:
        emitter = self.store.state.emitters().get(emitter_id)
        if emitter is None:
            raise NotFound(f"no emitter {emitter_id!r} is registered")
        keys = self.store.state.keys()
        return {
            "emitter": emitter.emitter,
            "tenant": emitter.tenant,
            "kind": emitter.kind,
            "created_at": emitter.created_at,
            "keys": [
                {
                    "kid": kid,
                    "jwk": keys[kid].jwk,
                    "added_at": keys[kid].added_at,
                    "revoked_at": keys[kid].revoked_at,
                    "revoke_reason": keys[kid].revoke_reason,
                }
                for kid in emitter.kids
            ],
            "head": self.service.head(emitter_id).as_json(),
        }

    def list_emitters(self) -> list[dict[str, Any]]:
        return [self.view(emitter_id) for emitter_id in sorted(self.store.state.emitters())]

    def record_findings(self, changes: list[dict[str, Any]]) -> int:
        """Changes of findings (opened, acknowledged, resolved, ...) as ``admin.finding`` events of the server's
        stream; returns the log index of the first."""
        return self._record("admin.finding", changes)

    def _record(self, event_type: str, changes: list[dict[str, Any]]) -> int:
        with self.service.sequencer.registry_lock():
            return self._record_locked([event_type] * len(changes), changes)

    def _record_locked(self, types: Iterable[str], changes: list[dict[str, Any]]) -> int:
        types = list(types)

        def decide(view: ChainView) -> Decision[None]:
            head = view.head(SERVER_EMITTER)
            now = datetime.now(UTC)
            occurred_at = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}Z"
            records = []
            for event_type, change in zip(types, changes, strict=True):
                payload: dict[str, Any] = {
                    "v": 1,
                    "event_id": str(uuid.uuid4()),
                    "type": event_type,
                    "occurred_at": occurred_at,
                    "emitter": SERVER_EMITTER,
                    "tenant": SYSTEM_TENANT,
                    "seq": head.seq + 1,
                    "prev_hash": head.event_hash,
                    "admin": {name: value for name, value in change.items() if value is not None},
                }
                canonical = canonicalize(payload)
                digest = event_hash(canonical)
                jws = sign_compact(canonical, self.server_key.private_key, self.server_key.kid)
                records.append(
                    WalRecord(
                        payload["event_id"],
                        SERVER_EMITTER,
                        head.seq + 1,
                        digest,
                        int(now.timestamp() * 1_000_000),
                        self.server_key.kid,
                        jws,
                    )
                )
                head = Head(head.seq + 1, digest)
            return Decision(records, {SERVER_EMITTER: head}, None)

        first, _ = self.service.sequencer.sequence([SERVER_EMITTER], set(), decide)
        self.reload()
        return first

    def reload(self) -> None:
        """Load the key ring from the registry (after a change here, or one another node made)."""
        emitters = self.store.state.emitters()
        specs = [
            (kid, record.emitter, emitters[record.emitter].tenant, record.jwk, record.revoked_at)
            for kid, record in self.store.state.keys().items()
        ]
        self.keys.load_specs(specs, self.keys.version + 1)


def _check_emitter_id(emitter_id: str) -> None:
    if not EMITTER_ID.fullmatch(emitter_id):
        raise InvalidInput(f"emitter id must match {EMITTER_ID.pattern}, got {emitter_id!r}")
    if emitter_id.startswith("custody."):
        raise InvalidInput(f"emitter ids starting with 'custody.' are reserved for the server, got {emitter_id!r}")


def _event_type(change: dict[str, Any]) -> str:
    return f"admin.{change['action']}"
