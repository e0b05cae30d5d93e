"""The stateless half of ingest: everything about one event that needs only the key ring and the clock.

``check_event`` turns a JWS string into a ``Verified`` event or a ``Rejected`` one, in this order: JWS shape,
algorithm, key, signature, revocation, payload JSON, canonical form, emitter and tenant, the payload schema, the
clock, and last the lake row the event becomes (what is acknowledged, the lake can always store). Chain checks
(seq, prev_hash, duplicates) need the emitter's head and happen later, under its lock.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from ingest.codes import ErrorCode
from ingest.event import describe_validation_error, occurred_at_datetime, validate_event
from store.ground.canonical import canonicalize, canonicalize_checked, event_hash, needs_utf16_order
from store.ground.errors import CanonicalizationError
from store.ground.jws import JwsError, parse_compact, verify_signature
from store.ground.keys import KeyRing
from store.rows import typed_problem

__all__ = ["MAX_NESTING", "Rejected", "Verified", "check_event"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verified:
    event_id: str
    emitter: str
    seq: int
    prev_hash: str
    event_hash: str
    kid: str
    jws: str


@dataclass(frozen=True, slots=True)
class Rejected:
    code: ErrorCode
    detail: str
    event_id: str | None = None
    emitter: str | None = None  # the key owner, when known: later events of that emitter are then after_rejected


# How deep a payload may nest: the event itself, delegation and 32 nested act objects, with room to spare. Deeper
# input is refused before the two walks that recurse in Python and C without a guard see it: the canonicalizer
# (explaining a rejection) and the duplicate-key parse. pydantic's own recursion guard answers a ValidationError,
# and the schema admits nothing deeper, so an event that passes it needs no depth check (it would cost every
# event 0.6 us).
MAX_NESTING = 40


def check_event(
    token: object,
    keys: KeyRing,
    *,
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
    max_age: timedelta | None = None,
) -> Verified | Rejected:
    """Every stateless check of one event. Whatever the input, this returns: an exception while checking one
    event is that event's ``invalid_payload``, never a failed batch or a dead verifier process."""
    try:
        return _check(token, keys, now=now, max_event_bytes=max_event_bytes, max_skew=max_skew, max_age=max_age)
    except Exception as exc:
        log.exception("an event could not be checked; it is refused as invalid_payload")
        return Rejected(ErrorCode.INVALID_PAYLOAD, f"payload could not be checked ({type(exc).__name__})")


def _check(
    token: object,
    keys: KeyRing,
    *,
    now: datetime,
    max_event_bytes: int,
    max_skew: timedelta,
    max_age: timedelta | None,
) -> Verified | Rejected:
    try:
        parsed = parse_compact(token)
    except JwsError as exc:
        return Rejected(ErrorCode(exc.code), exc.detail)
    entry = keys.get(parsed.kid)
    if entry is None:
        return Rejected(ErrorCode.UNKNOWN_KEY, f"no registered key has kid {parsed.kid!r}")
    owner = entry.emitter
    if parsed.alg != entry.alg:
        return Rejected(
            ErrorCode.UNSUPPORTED_ALG,
            f"key {parsed.kid!r} is {entry.alg}, but the header says alg {parsed.alg!r}",
            emitter=owner,
        )
    if not verify_signature(parsed, entry.key):
        return Rejected(ErrorCode.BAD_SIGNATURE, f"signature does not verify with key {parsed.kid!r}", emitter=owner)
    if entry.revoked_at is not None:
        return Rejected(
            ErrorCode.KEY_REVOKED, f"key {parsed.kid!r} of {owner} was revoked at {entry.revoked_at}", emitter=owner
        )
    if len(parsed.payload) > max_event_bytes:
        return Rejected(
            ErrorCode.INVALID_PAYLOAD,
            f"payload is {len(parsed.payload)} bytes, more than {max_event_bytes}",
            emitter=owner,
        )
    try:
        payload = orjson.loads(parsed.payload)
    except orjson.JSONDecodeError as exc:
        return Rejected(ErrorCode.INVALID_PAYLOAD, f"payload is not JSON: {exc}", emitter=owner)
    if not isinstance(payload, dict):
        return Rejected(ErrorCode.INVALID_PAYLOAD, "payload is not a JSON object", emitter=owner)
    event_id = payload.get("event_id") if isinstance(payload.get("event_id"), str) else None
    if payload.get("emitter") != owner:
        return Rejected(
            ErrorCode.EMITTER_MISMATCH,
            f"payload emitter is {payload.get('emitter')!r}, but key {parsed.kid!r} belongs to {owner!r}",
            event_id,
            owner,
        )
    if payload.get("tenant") != entry.tenant:
        return Rejected(
            ErrorCode.TENANT_MISMATCH,
            f"payload tenant is {payload.get('tenant')!r}, but emitter {owner!r} is registered to {entry.tenant!r}",
            event_id,
            owner,
        )
    try:
        event = validate_event(payload)
    except ValidationError as exc:
        if _too_deep(parsed.payload):
            return Rejected(ErrorCode.INVALID_PAYLOAD, _TOO_DEEP, event_id, owner)
        return Rejected(ErrorCode.INVALID_PAYLOAD, _explain(payload, exc), event_id, owner)
    # The strict schema admitted only integers within +/-(2**53 - 1) and valid strings, and every key is a fixed ASCII
    # field name except those of attrs: the canonical form needs no walk over the values.
    canonical = canonicalize_checked(payload, utf16_order=needs_utf16_order(event.get("attrs") or ()))
    if canonical != parsed.payload:
        if _too_deep(parsed.payload):  # a repeated key can hide a deeper value than the one the parser kept
            return Rejected(ErrorCode.INVALID_PAYLOAD, _TOO_DEEP, event_id, owner)
        if _has_duplicate_keys(parsed.payload):
            return Rejected(ErrorCode.INVALID_PAYLOAD, "payload repeats an object key", event_id, owner)
    occurred_at = occurred_at_datetime(event)
    if occurred_at > now + max_skew:
        return Rejected(
            ErrorCode.CLOCK_SKEW,
            f"occurred_at {event['occurred_at']} is {(occurred_at - now).total_seconds():.0f} s ahead of the server"
            f" clock ({now.strftime('%Y-%m-%dT%H:%M:%SZ')}); at most {max_skew.total_seconds():.0f} s allowed",
            event["event_id"],
            owner,
        )
    if max_age is not None and occurred_at < now - max_age:
        return Rejected(
            ErrorCode.CLOCK_SKEW,
            f"occurred_at {event['occurred_at']} is {(now - occurred_at).total_seconds():.0f} s before the server"
            f" clock ({now.strftime('%Y-%m-%dT%H:%M:%SZ')}); this server accepts events at most"
            f" {max_age.total_seconds():.0f} s old (--max-event-age)",
            event["event_id"],
            owner,
        )
    digest = event_hash(canonical)
    problem = typed_problem(payload)
    if problem is not None:
        return Rejected(ErrorCode.INVALID_PAYLOAD, f"the lake cannot store this event: {problem}", event_id, owner)
    return Verified(
        event_id=event["event_id"],
        emitter=owner,
        seq=event["seq"],
        prev_hash=event["prev_hash"],
        event_hash=digest,
        kid=parsed.kid,
        jws=str(token),
    )


_TOO_DEEP = f"payload nests more than {MAX_NESTING} objects and arrays deep"


def _too_deep(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` nests deeper than ``MAX_NESTING``, read without recursion. The raw text, not
    the parsed object: of a repeated key the parser keeps the last value, and the duplicate-key parse reads all."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_NESTING:
        return False
    depth, in_string = 0, False
    for token in _STRUCTURE.finditer(raw):
        char = token.group()
        if in_string:
            in_string = char != b'"'  # an escaped quote is matched whole as \\. and never ends the string
        elif char == b'"':
            in_string = True
        elif char in (b"{", b"["):
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif char in (b"}", b"]"):
            depth -= 1
    return False


_STRUCTURE = re.compile(rb'\\.|["{}\[\]]', re.DOTALL)


def _explain(payload: dict[str, Any], error: ValidationError) -> str:
    """The JCS reason when there is one (a float, an integer beyond 2**53: clearer than a type error), else the
    schema's problems."""
    try:
        canonicalize(payload)
    except CanonicalizationError as exc:
        return exc.message
    return describe_validation_error(error)


def _has_duplicate_keys(raw: bytes) -> bool:
    duplicate = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicate
        result = dict(items)
        duplicate = duplicate or len(result) != len(items)
        return result

    json.loads(raw, object_pairs_hook=pairs)
    return duplicate
