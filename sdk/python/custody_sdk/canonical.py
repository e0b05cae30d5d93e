"""RFC 8785 canonical JSON for events (integers only, as the protocol requires) and the event hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["ZERO_HASH", "canonicalize", "event_hash"]

ZERO_HASH = "0" * 64
_MAX_SAFE = 2**53


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 bytes of a JSON value of dicts, lists, strings, integers within +/-2**53, booleans and None."""
    try:
        return _text(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a string holds a lone surrogate at index {exc.start}") from exc


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
