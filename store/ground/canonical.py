"""RFC 8785 (JCS) canonical JSON for Custody events, and the event hash.

Custody payloads carry integers only, so the JCS number rules reduce to "print the integer": a float anywhere is
refused, and so is an integer JCS cannot carry exactly (beyond +/-2**53). Strings must be valid Unicode (no lone
surrogates). Object keys are ordered by their UTF-16 code units, as RFC 8785 section 3.2.3 requires.

``orjson`` writes the bytes: its escaping is exactly JCS's (short escapes for \\b \\t \\n \\f \\r, lowercase
``\\u00xx`` for other control characters, nothing else escaped). Its key order is by code point, which equals
UTF-16 order unless a key holds a character beyond the BMP; only then are objects re-ordered here first.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from store.ground.errors import CanonicalizationError

__all__ = [
    "MAX_SAFE_INTEGER",
    "ZERO_HASH",
    "canonicalize",
    "canonicalize_checked",
    "canonicalize_parsed",
    "event_hash",
    "needs_utf16_order",
]

MAX_SAFE_INTEGER = 2**53
ZERO_HASH = "0" * 64


def canonicalize(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of a JSON value built from dict/list/str/int/bool/None."""
    needs_utf16_order = _check(value, "$")
    if needs_utf16_order:
        value = _utf16_ordered(value)
        return orjson.dumps(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def canonicalize_parsed(value: Any) -> bytes:
    """``canonicalize`` for a value orjson parsed, whose strings are valid Unicode already (orjson refuses lone
    surrogates) and whose keys are strings: only numbers and keys are looked at, without recursion. A value that
    is not canonicalizable gets ``canonicalize``'s error, with its path."""
    if type(value) not in (dict, list):
        return canonicalize(value)
    utf16_order = False
    pending = [value]
    while pending:
        item = pending.pop()
        children = item.values() if type(item) is dict else item
        if type(item) is dict and not utf16_order:
            utf16_order = needs_utf16_order(key for key in item if not key.isascii())
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                pending.append(child)
            elif kind is float or (kind is int and not -MAX_SAFE_INTEGER <= child <= MAX_SAFE_INTEGER):
                return canonicalize(value)  # raises, naming where
    return canonicalize_checked(value, utf16_order=utf16_order)


def canonicalize_checked(value: Any, *, utf16_order: bool) -> bytes:
    """Canonical bytes of a value whose numbers and strings were already checked (by a strict schema that admits
    only integers within +/-2**53 and valid strings). ``utf16_order`` must be True when any key holds a character
    beyond the BMP (see ``needs_utf16_order``). This is the ingest hot path: it skips the walk over every value."""
    if utf16_order:
        return orjson.dumps(_utf16_ordered(value))
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def needs_utf16_order(keys: Any) -> bool:
    """True when one of ``keys`` has a character beyond the BMP, where code point and UTF-16 order differ."""
    return any(not key.isascii() and any(ord(char) > 0xFFFF for char in key) for key in keys)


def event_hash(canonical_bytes: bytes) -> str:
    """Lowercase hex SHA-256 of canonical bytes: the ``event_hash`` of the protocol."""
    return hashlib.sha256(canonical_bytes).hexdigest()


def _check(value: Any, path: str) -> bool:
    """Validate ``value`` for JCS; return True when some key needs UTF-16 ordering (a non-BMP character)."""
    kind = type(value)
    if kind is str:
        _check_string(value, path)
        return False
    if kind is bool or value is None:
        return False
    if kind is int:
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise CanonicalizationError(
                f"{path}: integer {value} is outside +/-2**53 and cannot be represented exactly"
            )
        return False
    if kind is float:
        raise CanonicalizationError(f"{path}: numbers must be integers, got {value!r}")
    if kind is list:
        needs = False
        for index, item in enumerate(value):
            needs = _check(item, f"{path}[{index}]") or needs
        return needs
    if kind is dict:
        needs = False
        for key, item in value.items():
            if type(key) is not str:
                raise CanonicalizationError(f"{path}: object key {key!r} is not a string")
            _check_string(key, path)
            needs = needs or needs_utf16_order((key,))
            needs = _check(item, f"{path}.{key}") or needs
        return needs
    raise CanonicalizationError(f"{path}: {kind.__name__} is not a JSON value")


def _check_string(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalizationError(f"{path}: string holds a lone surrogate at index {exc.start}") from exc


def _utf16_ordered(value: Any) -> Any:
    if type(value) is dict:
        return {key: _utf16_ordered(value[key]) for key in sorted(value, key=lambda key: key.encode("utf-16-be"))}
    if type(value) is list:
        return [_utf16_ordered(item) for item in value]
    return value
