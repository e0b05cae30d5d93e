"""The one error tree of Custody.

Every error the libraries raise on purpose derives from :class:`CustodyError`; the CLI catches only that root,
and the HTTP layer turns it into the single error envelope (see ``docs/protocol.md``)::

    CustodyError
    ├── InvalidInput                  bad input from a caller (HTTP 400); carries a list of problems
    │   └── CanonicalizationError     a JSON value RFC 8785 cannot represent as Custody requires (floats, ...)
    ├── NotFound                      an emitter or key that does not exist (HTTP 404)
    ├── Conflict                      a change that would silently replace state, e.g. another key under a kid (409)
    ├── Unauthorized                  missing or wrong credentials (HTTP 401 / 403)
    ├── StorageUnavailable            the data dir cannot persist right now: full, read-only, I/O error (HTTP 503)
    └── CorruptState                  a file in the data dir is not what Custody wrote; names the file and offset

Per-event rejections during ingest are not exceptions: they are results with an error code
(:class:`ingest.codes.ErrorCode`), because one bad event must not fail its whole batch.
"""

from __future__ import annotations

__all__ = [
    "CanonicalizationError",
    "Conflict",
    "CorruptState",
    "CustodyError",
    "InvalidInput",
    "NotFound",
    "StorageUnavailable",
    "Unauthorized",
]


class CustodyError(Exception):
    """Root of every error Custody raises on purpose."""

    code = "custody_error"
    http_status = 500

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidInput(CustodyError):
    code = "invalid_request"
    http_status = 400


class CanonicalizationError(InvalidInput):
    code = "invalid_payload"


class NotFound(CustodyError):
    code = "not_found"
    http_status = 404


class Conflict(CustodyError):
    code = "conflict"
    http_status = 409


class Unauthorized(CustodyError):
    code = "unauthorized"
    http_status = 401


class StorageUnavailable(CustodyError):
    code = "storage_unavailable"
    http_status = 503


class CorruptState(CustodyError):
    code = "corrupt_state"
    http_status = 500
