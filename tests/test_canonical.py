"""RFC 8785 canonicalization against conformance vectors written elsewhere (tests/vectors/jcs, with their licence)."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.ground.canonical import canonicalize, canonicalize_parsed, event_hash
from store.ground.errors import CanonicalizationError
from store.ground.tlog import LogError, jcs
from tests.conftest import VECTORS

JCS = json.loads((VECTORS / "jcs" / "canonicalization_vectors.json").read_text(encoding="utf-8"))
CASES = JCS["canonicalization_vectors"]


def _has_non_integer(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_non_integer(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_non_integer(item) for item in value)
    return False


def _input(case: dict[str, Any]) -> Any:
    # The vectors' notes: build -0 by hand, JSON parsers may not round-trip it.
    return -0.0 if case["name"] == "number_negative_zero" else case["input"]


@pytest.mark.parametrize("case", [c for c in CASES if not _has_non_integer(_input(c))], ids=lambda c: c["name"])
def test_integer_only_vectors_canonicalize_byte_for_byte(case: dict[str, Any]) -> None:
    assert canonicalize(_input(case)) == case["canonical"].encode("utf-8")


@pytest.mark.parametrize("case", [c for c in CASES if _has_non_integer(_input(c))], ids=lambda c: c["name"])
def test_vectors_with_floats_are_refused(case: dict[str, Any]) -> None:
    with pytest.raises(CanonicalizationError, match="must be integers"):
        canonicalize(_input(case))


@pytest.mark.parametrize("case", [c for c in CASES if not _has_non_integer(_input(c))], ids=lambda c: c["name"])
def test_the_offline_verifiers_own_canonicalizer_agrees(case: dict[str, Any]) -> None:
    """store/ground/tlog.py carries its own RFC 8785 (it may import nothing of Custody): same bytes."""
    assert jcs(_input(case)) == case["canonical"].encode("utf-8")
    assert jcs({"outer": [{"\U0001f389": 1, "\ue000": 2, "a": 3}]}) == canonicalize(
        {"outer": [{"\U0001f389": 1, "\ue000": 2, "a": 3}]}
    )


@pytest.mark.parametrize("case", [c for c in CASES if _has_non_integer(_input(c))], ids=lambda c: c["name"])
def test_the_offline_verifiers_canonicalizer_refuses_floats(case: dict[str, Any]) -> None:
    with pytest.raises(LogError, match="no fractions"):
        jcs(_input(case))


def test_the_vector_set_covers_both_kinds() -> None:
    accepted = [c for c in CASES if not _has_non_integer(_input(c))]
    refused = [c for c in CASES if _has_non_integer(_input(c))]
    assert len(accepted) >= 20
    assert len(refused) >= 8


def test_supplementary_keys_sort_by_utf16_inside_nested_values() -> None:
    value = {"outer": [{"\U0001f389": 1, "\ue000": 2, "a": 3}]}
    assert canonicalize(value) == '{"outer":[{"a":3,"\U0001f389":1,"\ue000":2}]}'.encode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"n": 2**53 + 1}, "outside"),
        ({"n": -(2**53) - 1}, "outside"),
        ({"s": "bad \ud800 surrogate"}, "lone surrogate"),
        ({1: "key"}, "not a string"),
        ({"n": math.inf}, "must be integers"),
        ({"t": (1, 2)}, "not a JSON value"),
    ],
)
def test_values_jcs_cannot_carry_are_refused_with_the_path(value: Any, message: str) -> None:
    with pytest.raises(CanonicalizationError, match=message):
        canonicalize(value)


def test_error_names_the_path_of_the_float() -> None:
    with pytest.raises(CanonicalizationError, match=r"\$\.attrs\.ratio: numbers must be integers, got 0\.5"):
        canonicalize({"attrs": {"ratio": 0.5}})


def test_event_hash_is_lowercase_sha256_hex() -> None:
    assert event_hash(b"{}") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_the_verifiers_canonicalizer_for_parsed_values_agrees_with_the_full_one(value: Any) -> None:
    """The verifier's shortcut (numbers and keys only, for what orjson parsed) gives the same bytes or error."""
    parsed = orjson.loads(orjson.dumps(value))
    try:
        expected: bytes | str = canonicalize(parsed)
    except CanonicalizationError as exc:
        expected = str(exc)
    try:
        got: bytes | str = canonicalize_parsed(parsed)
    except CanonicalizationError as exc:
        got = str(exc)
    assert got == expected
