"""Per-event error codes of ``POST /v1/events`` (pinned by the protocol; see docs/protocol.md)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode", "Status"]


class Status(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class ErrorCode(StrEnum):
    MALFORMED_JWS = "malformed_jws"
    UNSUPPORTED_ALG = "unsupported_alg"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    KEY_REVOKED = "key_revoked"
    EMITTER_MISMATCH = "emitter_mismatch"
    TENANT_MISMATCH = "tenant_mismatch"
    INVALID_PAYLOAD = "invalid_payload"
    CHAIN_GAP = "chain_gap"
    CHAIN_CONFLICT = "chain_conflict"
    AFTER_REJECTED = "after_rejected"
    EVENT_ID_CONFLICT = "event_id_conflict"
    CLOCK_SKEW = "clock_skew"
