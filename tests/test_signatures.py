"""Ed25519 verification goes through libsodium: it agrees with OpenSSL on honest and damaged signatures, and it
refuses the degenerate ones OpenSSL accepts (a small-order key whose "signature" fits every message)."""

from __future__ import annotations

import random

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from store.ground.jws import ParsedJws, parse_compact, sign_compact, verify_signature

_L = 2**252 + 27742317777372353535851937790883648493  # the order of the Ed25519 base point


def openssl_accepts(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def test_libsodium_and_openssl_agree_on_signatures_and_their_damage() -> None:
    rng = random.Random(8032)
    agreed = {True: 0, False: 0}
    for index in range(40):
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        token = sign_compact(rng.randbytes(rng.randrange(1, 2000)), private, f"k{index}")
        parsed = parse_compact(token)
        cases = [(parsed.signature, parsed.signing_input)]
        for _ in range(8):  # one bit flipped in the signature, or in the signed bytes
            signature, message = bytearray(parsed.signature), bytearray(parsed.signing_input)
            target = signature if rng.random() < 0.5 else message
            target[rng.randrange(len(target))] ^= 1 << rng.randrange(8)
            cases.append((bytes(signature), bytes(message)))
        other = Ed25519PrivateKey.generate().public_key()
        for signature, message in cases:
            for key in (public, other):
                damaged = ParsedJws(parsed.alg, parsed.kid, message, parsed.payload, signature)
                expected = openssl_accepts(key, signature, message)
                assert verify_signature(damaged, key) is expected
                agreed[expected] += 1
    assert agreed[True] == 40  # each honest signature, with its own key only
    assert agreed[False] == 40 * 17


def test_libsodium_refuses_what_openssl_lets_through() -> None:
    private = Ed25519PrivateKey.generate()
    token = parse_compact(sign_compact(b'{"v":1}', private, "k"))
    public = private.public_key()
    # A non-canonical S (S + L): the same point equation, a second encoding of one signature. Both refuse it.
    s = int.from_bytes(token.signature[32:], "little") + _L
    malleated = token.signature[:32] + s.to_bytes(32, "little")
    twin = ParsedJws(token.alg, token.kid, token.signing_input, token.payload, malleated)
    assert not openssl_accepts(public, malleated, token.signing_input)
    assert not verify_signature(twin, public)
    # The identity point as a public key with R = identity, S = 0 satisfies the equation for every message.
    identity = Ed25519PublicKey.from_public_bytes(bytes([1] + [0] * 31))
    anything = bytes([1] + [0] * 31) + bytes(32)
    forged = ParsedJws("EdDSA", "k", b"any message at all", b"{}", anything)
    assert openssl_accepts(identity, anything, b"any message at all")
    assert not verify_signature(forged, identity)
