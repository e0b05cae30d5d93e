"""RFC 8785 canonical JSON for events (integers only, as the protocol requires) and the event hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["ZERO_HASH", "canonicalize", "event_hash"]

ZERO_HASH = "0" * 64
_MAX_SAFE = 2**53


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 bytes of a JSON value of dicts, lists, strings, integers within +/-2**53, booleans and None.

    The value is walked once for what JCS refuses or orders differently (numbers, keys); then, unless a key holds
    a character beyond the BMP (where UTF-16 order differs from code-point order), the standard library's C
    encoder writes it: its escaping with ``ensure_ascii=False`` is JCS's."""
    try:
        if _needs_utf16_order(value):
            return _text(value).encode("utf-8")
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a string holds a lone surrogate at index {exc.start}") from exc


def _needs_utf16_order(value: Any) -> bool:
    """Walk ``value`` (without recursion) for numbers and keys JCS cannot take; True when a key needs UTF-16 order."""
    utf16 = False
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:  # most values: one type test each
            continue
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise ValueError(f"object key {key!r} is not a string")
                if not key.isascii() and any(ord(char) > 0xFFFF for char in key):
                    utf16 = True
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif item is None or isinstance(item, (bool, str)):
            continue
        elif isinstance(item, int):
            if not -_MAX_SAFE <= item <= _MAX_SAFE:
                raise ValueError(f"integer {item} is outside +/-2**53")
        else:
            raise ValueError(f"{type(item).__name__} is not a JSON value of the protocol (integers only)")
    return utf16


def event_hash(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def _text(value: Any) -> str:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
        items = sorted(value.items(), key=lambda item: item[0].encode("utf-16-be"))
        return "{" + ",".join(json.dumps(key, ensure_ascii=False) + ":" + _text(item) for key, item in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(item) for item in value) + "]"
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        if not -_MAX_SAFE <= value <= _MAX_SAFE:
            raise ValueError(f"integer {value} is outside +/-2**53")
        return str(value)
    raise ValueError(f"{type(value).__name__} is not a JSON value of the protocol (integers only)")
