"""The transparency log's formats and checks: RFC 6962 Merkle hashing and proofs, C2SP signed notes, checkpoints
and Ed25519 cosignatures.

This module depends on the standard library and ``cryptography`` only, so that an auditor can read it whole and
run it on a machine with nothing else of Custody: ``verify_bundle`` (and ``python tlog.py BUNDLE VKEY``) checks an
evidence bundle with only this file, the bundle and the log's verifier key.

- RFC 6962 / RFC 9162 section 2.1: leaf hash ``SHA-256(0x00 || data)``, node hash ``SHA-256(0x01 || left ||
  right)``, the empty tree's root ``SHA-256("")``. Inclusion and consistency proofs are generated from any source
  of complete-subtree hashes (``ProofSource``) and verified as transparency-dev/merkle does, including its error
  cases (the conformance vectors in ``tests/vectors/rfc6962-merkle``).
- c2sp.org/signed-note: ``text\\n\\n— name base64(key id || signature)\\n``; Ed25519 key id
  ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``; verifier keys ``name+hex(id)+base64(0x01 || key)``.
- c2sp.org/tlog-checkpoint: the note text ``origin\\nsize\\nbase64(root)\\n``.
- c2sp.org/tlog-cosignature: type 0x04, signature ``u64 timestamp || Ed25519(cosignature/v1\\ntime T\\n ||
  checkpoint text)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "BUNDLE_FORMAT",
    "EMPTY_ROOT",
    "BundleEvent",
    "Checkpoint",
    "LogError",
    "NoteKey",
    "ProofSource",
    "VerifiedBundle",
    "consistency_proof",
    "cosign",
    "inclusion_proof",
    "jcs",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "root_of",
    "sign_note",
    "signed_text",
    "verify_bundle",
    "verify_consistency",
    "verify_cosignature",
    "verify_inclusion",
]

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
MAX_NOTE_BYTES = 1 << 16  # a checkpoint with many cosignatures is under 4 KiB; anything near this is not one
EMPTY_ROOT = hashlib.sha256(b"").digest()


class LogError(ValueError):
    """A proof, note or checkpoint that does not check out; the message says which part and why."""


# -- RFC 6962 hashing ---------------------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two smaller than ``size`` (size >= 2): where RFC 6962 splits a tree."""
    return 1 << ((size - 1).bit_length() - 1)


def root_of(subtrees: Sequence[bytes]) -> bytes:
    """The root of a tree from the roots of its maximal complete subtrees, left to right (largest first)."""
    if not subtrees:
        return EMPTY_ROOT
    root = subtrees[-1]
    for left in reversed(subtrees[:-1]):
        root = node_hash(left, root)
    return root


ProofSource = Callable[[int, int], bytes]
"""``hash_at(level, index)``: the root of the complete subtree of height ``level`` over leaves
``[index * 2**level, (index + 1) * 2**level)``; level 0 is the leaf hash."""


def _range_hash(hash_at: ProofSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range that starts on a multiple of the largest power of two below its size."""
    size = end - start
    if size & (size - 1) == 0:
        level = size.bit_length() - 1
        return hash_at(level, start >> level)
    split = _split(size)
    return node_hash(_range_hash(hash_at, start, start + split), _range_hash(hash_at, start + split, end))


def inclusion_proof(index: int, size: int, hash_at: ProofSource) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size])."""
    if not 0 <= index < size:
        raise LogError(f"no leaf {index} in a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        split = _split(end - start)
        if index < start + split:
            proof.append(_range_hash(hash_at, start + split, end))
            end = start + split
        else:
            proof.append(_range_hash(hash_at, start, start + split))
            start += split
    proof.reverse()
    return proof


def consistency_proof(old_size: int, size: int, hash_at: ProofSource) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:size]); empty when old_size is 0 or equals size."""
    if not 0 <= old_size <= size:
        raise LogError(f"no consistency proof from size {old_size} to size {size}")
    if old_size in (0, size):
        return []
    proof: list[bytes] = []
    start, end, whole = 0, size, True  # SUBPROOF(m, D[start:end], whole), m = old_size - start
    while True:
        if old_size == end:
            if not whole:
                proof.append(_range_hash(hash_at, start, end))
            break
        split = _split(end - start)
        if old_size <= start + split:
            proof.append(_range_hash(hash_at, start + split, end))
            end = start + split
        else:
            proof.append(_range_hash(hash_at, start, start + split))
            start, whole = start + split, False
    proof.reverse()
    return proof


def _hash_list(proof: Sequence[bytes], what: str) -> None:
    for number, item in enumerate(proof):
        if len(item) != 32:
            raise LogError(f"{what} proof: hash {number} is {len(item)} bytes, not 32")


def _one_hash(value: bytes, what: str) -> None:
    if len(value) != 32:
        raise LogError(f"{what} is {len(value)} bytes, not a SHA-256 hash")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Raise LogError unless ``proof`` shows the leaf hash at ``index`` in the tree of ``size`` with ``root``."""
    if not 0 <= index < size:
        raise LogError(f"inclusion proof: leaf index {index} is outside a tree of size {size}")
    _one_hash(leaf, "inclusion proof: the leaf hash")
    _one_hash(root, "inclusion proof: the root hash")
    _hash_list(proof, "inclusion")
    computed = _root_from_inclusion(leaf, index, size, proof)
    if computed != root:
        raise LogError(
            f"inclusion proof: leaf {index} of tree size {size} gives root {_b64(computed)}, expected {_b64(root)}"
        )


def _root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    inner, border = _decompose(index, size)
    if len(proof) != inner + border:
        raise LogError(f"inclusion proof: {len(proof)} hashes, expected {inner + border} for leaf {index} of {size}")
    node = leaf
    for level, sibling in enumerate(proof[:inner]):
        node = node_hash(sibling, node) if (index >> level) & 1 else node_hash(node, sibling)
    for sibling in proof[inner:]:
        node = node_hash(sibling, node)
    return node


def _decompose(index: int, size: int) -> tuple[int, int]:
    """How many hashes of an inclusion proof lie below where the paths of ``index`` and ``size - 1`` join, and
    how many above it (transparency-dev/merkle's decompInclProof)."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def verify_consistency(old_size: int, size: int, proof: Sequence[bytes], old_root: bytes, root: bytes) -> None:
    """Raise LogError unless ``proof`` shows the tree of ``old_size`` with ``old_root`` is a prefix of the tree of
    ``size`` with ``root``."""
    if size < old_size:
        raise LogError(f"consistency proof: tree size {size} is smaller than the old size {old_size}")
    if old_size == size:
        if proof:
            raise LogError("consistency proof: two trees of one size need an empty proof")
        if old_root != root:
            raise LogError(f"consistency proof: two roots for tree size {size}: {_b64(old_root)} and {_b64(root)}")
        if size == 0 and root != EMPTY_ROOT:
            raise LogError(f"consistency proof: {_b64(root)} is not the root of the empty tree")
        return
    _one_hash(old_root, "consistency proof: the old root hash")
    _one_hash(root, "consistency proof: the root hash")
    if old_size == 0:
        raise LogError("consistency proof: nothing to prove from the empty tree (every tree extends it)")
    if not proof:
        raise LogError(f"consistency proof: empty proof from size {old_size} to {size}")
    _hash_list(proof, "consistency")
    inner, border = _decompose(old_size - 1, size)
    shift = (old_size & -old_size).bit_length() - 1  # the old tree's rightmost complete subtree's height
    inner -= shift
    if old_size == 1 << shift:  # the old tree is itself a complete subtree: its root starts both paths
        seed, start = old_root, 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise LogError(f"consistency proof: {len(proof)} hashes, expected {start + inner + border}")
    path = proof[start:]
    mask = (old_size - 1) >> shift
    old_hash, new_hash = seed, seed
    for level, sibling in enumerate(path[:inner]):
        if (mask >> level) & 1:
            old_hash = node_hash(sibling, old_hash)
            new_hash = node_hash(sibling, new_hash)
        else:
            new_hash = node_hash(new_hash, sibling)
    for sibling in path[inner:]:
        old_hash = node_hash(sibling, old_hash)
        new_hash = node_hash(sibling, new_hash)
    if old_hash != old_root:
        raise LogError(
            f"consistency proof: gives old root {_b64(old_hash)} for size {old_size}, expected {_b64(old_root)}"
        )
    if new_hash != root:
        raise LogError(f"consistency proof: gives root {_b64(new_hash)} for size {size}, expected {_b64(root)}")


# -- signed notes ---------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LogError(f"{what} is not standard base64") from exc


def _key_id(name: str, kind: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind]) + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name) or not name.isprintable():
        raise LogError(f"key name {name!r} is empty or holds a space, a plus or a control character")


@dataclass(frozen=True)
class NoteKey:
    """A named Ed25519 public key of a signed note: the log's (type 0x01) or a witness's (type 0x04)."""

    name: str
    public: bytes
    kind: int = ED25519

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.public) != 32:
            raise LogError(f"key {self.name}: an Ed25519 public key is 32 bytes, not {len(self.public)}")
        if self.kind not in (ED25519, COSIGNATURE_V1):
            raise LogError(
                f"key {self.name}: signature type {self.kind:#04x} is not Ed25519 (0x01) or cosignature/v1 (0x04)"
            )

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, self.kind, self.public)

    @property
    def vkey(self) -> str:
        """The verifier key a client pins: ``name+hex(key id)+base64(type || key)``."""
        return f"{self.name}+{self.key_id.hex()}+{_b64(bytes([self.kind]) + self.public)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteKey:
        parts = vkey.strip().split("+", 2)  # a name holds no plus; base64 may
        if len(parts) != 3:
            raise LogError(f"verifier key {vkey!r} is not name+keyid+key")
        name, key_id, encoded = parts
        raw = _unb64(encoded, f"verifier key {name}")
        if len(raw) != 33:
            raise LogError(f"verifier key {name}: expected a type byte and 32 key bytes, got {len(raw)} bytes")
        key = cls(name, raw[1:], raw[0])
        if key.key_id.hex() != key_id.lower():
            raise LogError(f"verifier key {name}: key id {key_id} does not match its key ({key.key_id.hex()})")
        return key

    @classmethod
    def of(cls, name: str, private: Ed25519PrivateKey, kind: int = ED25519) -> NoteKey:
        return cls(name, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), kind)


def sign_note(text: str, name: str, private: Ed25519PrivateKey) -> str:
    """The signature line ``— name base64(key id || Ed25519(text))\\n`` of a note text."""
    key = NoteKey.of(name, private)
    return f"\u2014 {name} {_b64(key.key_id + private.sign(text.encode()))}\n"


def cosign(checkpoint_text: str, name: str, private: Ed25519PrivateKey, timestamp: int) -> str:
    """A cosignature/v1 line over a checkpoint's note text at ``timestamp`` (POSIX seconds)."""
    key = NoteKey.of(name, private, COSIGNATURE_V1)
    message = f"cosignature/v1\ntime {timestamp}\n{checkpoint_text}".encode()
    return f"\u2014 {name} {_b64(key.key_id + struct.pack('>Q', timestamp) + private.sign(message))}\n"


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note's text (with its final newline) and its signature lines as (key name, raw bytes)."""
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise LogError(f"note is over {MAX_NOTE_BYTES} bytes")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise LogError("note holds a control character other than newline")
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise LogError("note has no blank line before its signatures, or does not end in a newline")
    text, block = note[: cut + 1], note[cut + 2 :]
    signatures = []
    for line in block.splitlines():
        if not line.startswith("\u2014 "):
            raise LogError(f"note signature line {line[:40]!r} does not start with an em dash and a space")
        fields = line[2:].split(" ")
        if len(fields) != 2:
            raise LogError(f"note signature line {line[:40]!r} is not '— name signature'")
        raw = _unb64(fields[1], f"signature of {fields[0]}")
        if len(raw) < 5:
            raise LogError(f"signature of {fields[0]} is too short to hold a key id")
        signatures.append((fields[0], raw))
    if not signatures:
        raise LogError("note has no signature")
    return text, signatures


def _ed25519_ok(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def signed_text(note: str, key: NoteKey) -> str:
    """The text of a signed note that ``key`` signed (Ed25519, type 0x01); raise LogError otherwise."""
    text, signatures = split_note(note)
    for name, raw in signatures:
        if name == key.name and raw[:4] == key.key_id:
            if not _ed25519_ok(key.public, raw[4:], text.encode()):
                raise LogError(f"note signature by {name} does not verify")
            return text
    raise LogError(f"note carries no signature by {key.name}+{key.key_id.hex()}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose log signature checked out, with the cosignatures that checked out (witness name ->
    timestamp)."""

    origin: str
    size: int
    root: bytes
    text: str
    note: str
    cosigned: dict[str, int]

    def as_json(self) -> dict[str, object]:
        return {"origin": self.origin, "size": self.size, "root": _b64(self.root), "cosigned_by": self.cosigned}


def parse_checkpoint_text(text: str) -> tuple[str, int, bytes]:
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "" or not all(lines[:-1]):
        raise LogError("checkpoint text is not origin, size and root hash lines (and non-empty extension lines)")
    origin, size_line, root_line = lines[0], lines[1], lines[2]
    if (
        not size_line.isdigit()
        or not size_line.isascii()
        or len(size_line) > 19  # within an int64, as every log's size is
        or (size_line != "0" and size_line.startswith("0"))
    ):
        raise LogError(f"checkpoint size {size_line[:30]!r} is not a decimal without leading zeroes")
    root = _unb64(root_line, "checkpoint root hash")
    if len(root) != 32:
        raise LogError(f"checkpoint root hash is {len(root)} bytes, not 32")
    return origin, int(size_line), root


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{_b64(root)}\n"


def open_checkpoint(note: str, log_key: NoteKey, witnesses: Sequence[NoteKey] = ()) -> Checkpoint:
    """Check a checkpoint note against the log's key (and the witnesses' cosignature keys): its log signature
    must verify, its origin must be the key's name; a known witness's cosignature that fails is an error, an
    unknown signature is ignored (signed-note)."""
    text = signed_text(note, log_key)
    origin, size, root = parse_checkpoint_text(text)
    if origin != log_key.name:
        raise LogError(f"checkpoint origin {origin!r} is not the log's key name {log_key.name!r}")
    cosigned: dict[str, int] = {}
    for name, raw in split_note(note)[1]:
        for witness in witnesses:
            if name == witness.name and raw[:4] == witness.key_id:
                cosigned[name] = verify_cosignature(text, witness, raw[4:])
    return Checkpoint(origin, size, root, text, note, cosigned)


def verify_cosignature(text: str, witness: NoteKey, body: bytes) -> int:
    """Check a cosignature/v1 body (timestamp || signature) over a checkpoint text; return its timestamp."""
    if len(body) != 72:
        raise LogError(f"cosignature by {witness.name} is {len(body)} bytes, not 8 + 64")
    (timestamp,) = struct.unpack(">Q", body[:8])
    message = f"cosignature/v1\ntime {timestamp}\n{text}".encode()
    if timestamp >= 1 << 63 or not _ed25519_ok(witness.public, body[8:], message):
        raise LogError(f"cosignature by {witness.name} does not verify")
    return int(timestamp)


# -- evidence bundles ---------------------------------------------------------------------------------------------

BUNDLE_FORMAT = "custody-evidence/v1"


@dataclass(frozen=True)
class BundleEvent:
    """An event of a bundle that checked out: signed by a key the log registered, included in the checkpoint."""

    log_index: int
    event_id: str
    emitter: str
    seq: int
    kid: str
    event_hash: str


@dataclass(frozen=True)
class VerifiedBundle:
    checkpoint: Checkpoint
    selection: dict[str, object]
    events: list[BundleEvent]
    registry: list[BundleEvent]


def _b64url(part: str, what: str) -> bytes:
    if not part or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in part):
        raise LogError(f"{what} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except binascii.Error as exc:
        raise LogError(f"{what} is not unpadded base64url ({exc})") from exc


def jcs(value: object) -> bytes:
    """RFC 8785 canonical bytes of a JSON value of the protocol (integers, strings, booleans, null, arrays,
    objects): keys in UTF-16 code-unit order, no whitespace, strings as ECMAScript serializes them."""
    try:
        return _jcs(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LogError(f"a string holds a lone surrogate at index {exc.start}") from exc
    except RecursionError as exc:
        raise LogError("a value nested too deep to be an event") from exc


def _jcs(value: object) -> str:
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: item[0].encode("utf-16-be"))
        return "{" + ",".join(json.dumps(key, ensure_ascii=False) + ":" + _jcs(item) for key, item in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_jcs(item) for item in value) + "]"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int) and -(2**53) <= value <= 2**53:
        return str(value)
    raise LogError(f"{value!r} is not a JSON value of the protocol (integers within +/-2**53, no fractions)")


def _jws_parts(jws: object, what: str) -> tuple[dict[str, object], bytes, bytes, bytes]:
    """(protected header, payload bytes, signing input, signature) of a compact JWS."""
    if not isinstance(jws, str) or jws.count(".") != 2:
        raise LogError(f"{what}: not a compact JWS")
    header_b64, payload_b64, signature_b64 = jws.split(".")
    try:
        header = json.loads(_b64url(header_b64, f"{what}: header"))
    except (ValueError, RecursionError) as exc:
        raise LogError(f"{what}: header is not JSON") from exc
    if not isinstance(header, dict):
        raise LogError(f"{what}: header is not a JSON object")
    payload = _b64url(payload_b64, f"{what}: payload")
    return header, payload, f"{header_b64}.{payload_b64}".encode(), _b64url(signature_b64, f"{what}: signature")


def _jwk_verifies(jwk: dict[str, object], alg: object, signature: bytes, message: bytes) -> bool:
    """An Ed25519 (OKP) or P-256 (EC, ES256) JWK's signature over ``message``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and alg == "EdDSA":
            return _ed25519_ok(_b64url(str(jwk.get("x")), "jwk x"), signature, message)
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and alg == "ES256" and len(signature) == 64:
            x = int.from_bytes(_b64url(str(jwk.get("x")), "jwk x"), "big")
            y = int.from_bytes(_b64url(str(jwk.get("y")), "jwk y"), "big")
            public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            public.verify(der, message, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, ValueError, LogError):
        return False
    return False


def _logged_event(
    entry: object, what: str, checkpoint: Checkpoint
) -> tuple[BundleEvent, dict[str, object], tuple[dict[str, object], bytes, bytes]]:
    """Check one bundle entry's inclusion proof; return it, its payload and its JWS parts for the signature."""
    if not isinstance(entry, dict) or set(entry) != {"log_index", "jws", "proof"}:
        raise LogError(f"{what}: expected an object with log_index, jws and proof")
    index, proof = entry["log_index"], entry["proof"]
    if not isinstance(index, int) or isinstance(index, bool) or not isinstance(proof, list):
        raise LogError(f"{what}: log_index must be an integer and proof a list")
    header, payload_bytes, signing_input, signature = _jws_parts(entry["jws"], what)
    try:
        payload = json.loads(payload_bytes)
    except (ValueError, RecursionError) as exc:
        raise LogError(f"{what}: payload is not JSON") from exc
    if not isinstance(payload, dict):
        raise LogError(f"{what}: payload is not a JSON object")
    if not isinstance(payload.get("seq"), int) or not isinstance(payload.get("emitter"), str):
        raise LogError(f"{what}: payload has no integer seq and string emitter")
    digest = hashlib.sha256(jcs(payload)).hexdigest()  # the event_hash: of the canonical form, as ingest computes it
    hashes_ = [_unb64(str(item), f"{what}: proof hash") for item in proof]
    try:
        verify_inclusion(leaf_hash(bytes.fromhex(digest)), index, checkpoint.size, hashes_, checkpoint.root)
    except LogError as exc:
        raise LogError(f"{what} (event {payload.get('event_id')}, log index {index}): {exc}") from exc
    event = BundleEvent(
        index,
        str(payload.get("event_id")),
        str(payload.get("emitter")),
        int(payload.get("seq") or 0),
        str(header.get("kid")),
        digest,
    )
    return event, payload, (header, signing_input, signature)


def verify_bundle(
    bundle: bytes, log_key: NoteKey, witnesses: Sequence[NoteKey] = (), quorum: int = 0
) -> VerifiedBundle:
    """Check an evidence bundle offline (docs/transparency.md). The bundle is a signed note by the log key whose
    text is the bundle's JSON. Its checkpoint verifies with the log key (and ``quorum`` of the ``witnesses``
    cosigned it); every event and every registry event is included in that checkpoint's tree; the registry events
    are signed by the log's key and register (and revoke) the emitter keys; every event is signed by a key its
    emitter had registered, logged before it, and not revoked before it was logged; last, the note's signature
    covers the rest (the selection), so a changed proof, event or checkpoint is named precisely above. Raises
    LogError naming what failed."""
    try:
        note = bundle.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LogError(f"bundle is not UTF-8 (byte {exc.start})") from exc
    try:
        text, _ = split_note(note)
        body = json.loads(text)
    except LogError as exc:
        raise LogError(f"bundle: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise LogError(f"bundle text is not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("bundle") != BUNDLE_FORMAT:
        raise LogError(f"not a {BUNDLE_FORMAT} bundle")
    try:
        checkpoint = open_checkpoint(str(body.get("checkpoint")), log_key, witnesses)
    except LogError as exc:
        raise LogError(f"bundle checkpoint: {exc}") from exc
    if len(checkpoint.cosigned) < quorum:
        raise LogError(f"bundle checkpoint: cosigned by {len(checkpoint.cosigned)} known witnesses, {quorum} needed")
    registry, keys = _registry(body.get("registry"), checkpoint, log_key)
    events = []
    entries = body.get("events")
    if not isinstance(entries, list) or not entries:
        raise LogError("bundle holds no events")
    for number, entry in enumerate(entries):
        what = f"bundle event {number}"
        event, payload, (header, signing_input, signature) = _logged_event(entry, what, checkpoint)
        known = keys.get(event.kid)
        if known is None:
            raise LogError(f"{what} (event {event.event_id}): key {event.kid} is not registered in the bundle")
        owner, jwk, added_at, revoked_at = known
        if owner != event.emitter or payload.get("emitter") != event.emitter:
            raise LogError(f"{what} (event {event.event_id}): key {event.kid} belongs to {owner}, not {event.emitter}")
        if event.log_index < added_at or (revoked_at is not None and event.log_index > revoked_at):
            raise LogError(f"{what} (event {event.event_id}): logged when key {event.kid} was not valid")
        if not _jwk_verifies(jwk, header.get("alg"), signature, signing_input):
            raise LogError(f"{what} (event {event.event_id}): signature by {event.kid} does not verify")
        events.append(event)
    try:  # last, so that a changed proof, event or checkpoint is named above; this covers the rest (selection)
        signed_text(note, log_key)
    except LogError as exc:
        raise LogError(f"bundle signature: {exc}") from exc
    selection = body.get("selection")
    return VerifiedBundle(checkpoint, selection if isinstance(selection, dict) else {}, events, registry)


def _registry(
    entries: object, checkpoint: Checkpoint, log_key: NoteKey
) -> tuple[list[BundleEvent], dict[str, tuple[str, dict[str, object], int, int | None]]]:
    """The server's admin events of the bundle, checked: kid -> (emitter, jwk, log index added, index revoked)."""
    if not isinstance(entries, list):
        raise LogError("bundle registry is not a list")
    keys: dict[str, tuple[str, dict[str, object], int, int | None]] = {}
    checked = []
    for number, entry in enumerate(entries):
        what = f"bundle registry event {number}"
        event, payload, (header, signing_input, signature) = _logged_event(entry, what, checkpoint)
        if header.get("alg") != "EdDSA" or not _ed25519_ok(log_key.public, signature, signing_input):
            raise LogError(f"{what} (event {event.event_id}): not signed by the log's key")
        change = payload.get("admin")
        if not isinstance(change, dict):
            raise LogError(f"{what} (event {event.event_id}): not an admin event")
        kid, action = change.get("kid"), change.get("action")
        if action == "key_added" and isinstance(kid, str) and isinstance(change.get("jwk"), dict):
            keys.setdefault(kid, (str(change.get("emitter")), change["jwk"], event.log_index, None))
        elif action == "key_revoked" and isinstance(kid, str) and kid in keys:
            owner, jwk, added, revoked = keys[kid]
            keys[kid] = (owner, jwk, added, event.log_index if revoked is None else min(revoked, event.log_index))
        checked.append(event)
    return checked, keys


def _main(argv: Sequence[str]) -> int:
    """``python tlog.py BUNDLE VKEY [WITNESS_VKEY ...]``: verify a bundle with nothing else of Custody."""
    if len(argv) < 2:
        print("usage: python tlog.py BUNDLE LOG_VKEY [WITNESS_VKEY ...]")
        return 2
    try:
        with open(argv[0], "rb") as handle:
            data = handle.read()
        verified = verify_bundle(data, NoteKey.from_vkey(argv[1]), [NoteKey.from_vkey(v) for v in argv[2:]])
    except (OSError, LogError) as exc:
        print(f"FAIL: {exc}")
        return 1
    checkpoint = verified.checkpoint
    for event in verified.events:
        print(f"OK: event {event.event_id} ({event.emitter} seq {event.seq}) at log index {event.log_index}")
    print(f"OK: {len(verified.events)} events in {checkpoint.origin} at tree size {checkpoint.size}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
