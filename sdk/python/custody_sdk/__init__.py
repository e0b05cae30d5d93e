"""custody-sdk: emit signed, hash-chained events to Custody through a durable local spool.

The public surface is ``__all__``, pinned by a test; everything else is private.
"""

from custody_sdk.canonical import canonicalize, event_hash
from custody_sdk.emitter import Delivery, Emitter, LogMisbehaved, Reservation, SignedEvent
from custody_sdk.keys import generate_key, public_jwk
from custody_sdk.spool import Spool, SpooledEvent, SpoolFull

__all__ = [
    "Delivery",
    "Emitter",
    "LogMisbehaved",
    "Reservation",
    "SignedEvent",
    "Spool",
    "SpoolFull",
    "SpooledEvent",
    "canonicalize",
    "event_hash",
    "generate_key",
    "public_jwk",
]
