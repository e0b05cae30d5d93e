"""RFC 6962 proofs and C2SP signed notes (``store.ground.tlog``) against vectors written elsewhere and a naive tree.

- transparency-dev/merkle's conformance vectors (tests/vectors/rfc6962-merkle): every happy path verifies and
  every corrupted proof, root, index or size fails.
- Hypothesis: proofs generated from complete-subtree hashes equal the RFC 6962 definitions computed naively over
  the whole list of leaves, and verify; a proof for another leaf or size does not.
- The signed-note specification's own example key and note.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from store.ground.tlog import (
    EMPTY_ROOT,
    LogError,
    NoteKey,
    checkpoint_text,
    consistency_proof,
    cosign,
    inclusion_proof,
    leaf_hash,
    node_hash,
    open_checkpoint,
    sign_note,
    signed_text,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "rfc6962-merkle"


def _vectors(kind: str) -> list[tuple[str, dict[str, Any]]]:
    paths = sorted((VECTORS / kind).rglob("*.json"))
    return [(str(path.relative_to(VECTORS)), json.loads(path.read_text())) for path in paths]


def _b(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _outcome(check: Callable[[], None], want_error: bool) -> None:
    if want_error:
        with pytest.raises(LogError):
            check()
    else:
        check()


@pytest.mark.parametrize(("name", "case"), _vectors("inclusion"), ids=lambda v: v if isinstance(v, str) else "")
def test_inclusion_vectors(name: str, case: dict[str, Any]) -> None:
    proof = [_b(item) for item in case["proof"] or []]

    def check() -> None:
        verify_inclusion(_b(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, _b(case["root"]))

    _outcome(check, case["wantErr"])


@pytest.mark.parametrize(("name", "case"), _vectors("consistency"), ids=lambda v: v if isinstance(v, str) else "")
def test_consistency_vectors(name: str, case: dict[str, Any]) -> None:
    proof = [_b(item) for item in case["proof"] or []]

    def check() -> None:
        verify_consistency(case["size1"], case["size2"], proof, _b(case["root1"]), _b(case["root2"]))

    _outcome(check, case["wantErr"])


def test_the_vectors_hold_both_kinds() -> None:
    cases = [case for _, case in _vectors("inclusion") + _vectors("consistency")]
    assert sum(bool(case["wantErr"]) for case in cases) > 100
    assert sum(not case["wantErr"] for case in cases) >= 10


# -- a naive tree -------------------------------------------------------------------------------------------------


def naive_root(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) exactly as RFC 6962 section 2.1 writes it."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_root(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_root(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [naive_root(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*naive_subproof(m, leaves[:k], whole), naive_root(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_root(leaves[:k])]


def source_over(leaves: list[bytes]) -> Callable[[int, int], bytes]:
    @cache
    def hash_at(level: int, index: int) -> bytes:
        if level == 0:
            return leaf_hash(leaves[index])
        return node_hash(hash_at(level - 1, 2 * index), hash_at(level - 1, 2 * index + 1))

    return hash_at


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.data())
def test_proofs_equal_the_naive_definitions_and_verify(size: int, data: st.DataObject) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(size)]
    hash_at = source_over(leaves)
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(1, size))
    root, old_root = naive_root(leaves), naive_root(leaves[:old])

    path = inclusion_proof(index, size, hash_at)
    assert path == naive_path(index, leaves)
    verify_inclusion(leaf_hash(leaves[index]), index, size, path, root)
    if size > 1:
        with pytest.raises(LogError):
            verify_inclusion(leaf_hash(leaves[index]), (index + 1) % size, size, path, root)

    proof = consistency_proof(old, size, hash_at)
    assert proof == ([] if old == size else naive_subproof(old, leaves, True))
    verify_consistency(old, size, proof, old_root, root)
    if old < size:
        with pytest.raises(LogError):
            verify_consistency(old, size, proof, old_root, naive_root([*leaves[: size - 1], b"forged"]))


# -- signed notes -------------------------------------------------------------------------------------------------


def test_the_signed_note_specifications_example() -> None:
    key = NoteKey.from_vkey("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
    note = (
        "This is an example message.\n\n"
        "\u2014 example.com/foo"
        " Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
    )
    assert signed_text(note, key) == "This is an example message.\n"
    with pytest.raises(LogError, match="does not verify"):
        signed_text(note.replace("example message", "example massage"), key)


def test_checkpoints_and_cosignatures() -> None:
    log_private, witness_private = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    log_key = NoteKey.of("custody.test/log", log_private)
    witness = NoteKey.of("witness.test/w1", witness_private, 0x04)
    text = checkpoint_text(log_key.name, 5, hashlib.sha256(b"root").digest())
    note = text + "\n" + sign_note(text, log_key.name, log_private)
    checkpoint = open_checkpoint(note, NoteKey.from_vkey(log_key.vkey))
    assert (checkpoint.size, checkpoint.cosigned) == (5, {})
    cosigned = note + cosign(text, witness.name, witness_private, 1_700_000_000)
    assert open_checkpoint(cosigned, log_key, [witness]).cosigned == {"witness.test/w1": 1_700_000_000}
    forged = note + cosign(text.replace("\n5\n", "\n6\n"), witness.name, witness_private, 1_700_000_000)
    with pytest.raises(LogError, match=r"cosignature by witness\.test/w1 does not verify"):
        open_checkpoint(forged, log_key, [witness])
    assert open_checkpoint(forged, log_key).size == 5  # an unknown signer's line is ignored
    other = NoteKey.of("custody.test/log", Ed25519PrivateKey.generate())
    with pytest.raises(LogError, match=r"carries no signature by custody\.test/log"):
        open_checkpoint(note, other)
    with pytest.raises(LogError, match="does not verify"):
        open_checkpoint(note.replace("\n5\n", "\n6\n"), log_key)
    for broken in ("", "no blank line\n", text + "\n", text + "\n\u2014 x\n", text + "\n- custody.test/log AAAA\n"):
        with pytest.raises(LogError):
            open_checkpoint(broken, log_key)
