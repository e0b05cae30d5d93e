"""Hostile input against every operation in the OpenAPI: never a 500, never a crash, always the error envelope."""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ADMIN, Harness, open_harness
from tests.signing import b64, chain

pytestmark = pytest.mark.each_backend  # harness tests run on the embedded store and on PostgreSQL

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def assert_envelope(response: Any) -> None:
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "details"}
        assert isinstance(error["code"], str)
        assert error["message"]


def operations(harness: Harness) -> list[tuple[str, str]]:
    spec = harness.client.get("/openapi.json").json()
    return [(method.upper(), path) for path, item in spec["paths"].items() for method in item]


def test_the_openapi_lists_every_route(harness: Harness) -> None:
    assert set(operations(harness)) == {
        ("POST", "/v1/events"),
        ("PUT", "/v1/emitters/{emitter_id}"),
        ("POST", "/v1/emitters/{emitter_id}/keys/{kid}/revoke"),
        ("GET", "/v1/emitters"),
        ("GET", "/v1/emitters/{emitter_id}"),
        ("GET", "/v1/emitters/{emitter_id}/head"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/checkpoint"),
        ("GET", "/tile/{path}"),
        ("GET", "/v1/log/consistency"),
    }


@given(data=st.data())
@SETTINGS
def test_every_operation_survives_arbitrary_input(harness: Harness, data: st.DataObject) -> None:
    method, template = data.draw(st.sampled_from(operations(harness)))
    path = re.sub(r"\{[^}]+\}", lambda _: data.draw(st.text(min_size=1, max_size=12).map(_path_safe)), template)
    headers = data.draw(st.sampled_from([{}, ADMIN, {"Authorization": "Bearer x"}, {"Authorization": "Basic Zm9v"}]))
    body = data.draw(st.one_of(st.binary(max_size=200), JSON.map(lambda value: json.dumps(value).encode())))
    content_type = data.draw(st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]))
    response = harness.client.request(method, path, content=body, headers={**headers, "Content-Type": content_type})
    assert_envelope(response)
    documented = harness.client.get("/openapi.json").json()["paths"][template][method.lower()]["responses"]
    assert str(response.status_code) in documented, (method, template, response.status_code, sorted(documented))


def test_the_openapi_says_what_the_server_does(harness: Harness) -> None:
    from ingest.codes import ErrorCode, Status

    spec = harness.client.get("/openapi.json").json()
    result = spec["components"]["schemas"]["EventResult"]["properties"]
    assert result["status"]["$ref"].endswith("/Status")
    assert spec["components"]["schemas"]["Status"]["enum"] == [status.value for status in Status]
    assert spec["components"]["schemas"]["ErrorCode"]["enum"] == [code.value for code in ErrorCode]
    codes = spec["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"]
    assert {"invalid_request", "request_timeout", "overloaded", "storage_unavailable", "unauthorized"} <= set(codes)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <token>",
    }
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (method, path)  # validation errors are 400 here
            public = path in (
                "/v1/events",
                "/healthz",
                "/metrics",
                "/checkpoint",
                "/tile/{path}",
                "/v1/log/consistency",
            )
            assert ("security" in operation) is not public, (method, path)


def _path_safe(text: str) -> str:
    """A path segment that reaches the server as one: no separators, and not "." or "..", which every HTTP client
    resolves away before sending (the request would then be for another route)."""
    segment = "".join(char for char in text if char.isprintable() and char not in "/?#%\\")
    return "x" if segment in ("", ".", "..") else segment


@pytest.fixture(params=[0, 2], ids=["checks-in-thread", "verifier-processes"])
def checking_harness(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    """The harness with the checks in the server's thread, and with two verifier processes (events reach them
    pickled, so the pickler meets the hostile input too)."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # spawned workers re-run __main__
    with open_harness(tmp_path / "data", verify_workers=request.param) as opened:
        yield opened


@given(
    events=st.lists(
        st.one_of(
            JSON,
            st.text(max_size=60),
            st.from_regex(r"[A-Za-z0-9_\-]{0,20}\.[A-Za-z0-9_\-]{0,20}\.[A-Za-z0-9_\-]{0,20}", fullmatch=True),
        ),
        max_size=8,
    )
)
@SETTINGS
def test_arbitrary_event_lists_get_one_result_each(checking_harness: Harness, events: list[Any]) -> None:
    response = checking_harness.client.post("/v1/events", json={"events": events})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(events)
    assert {r["status"] for r in results} <= {"rejected"}


@given(data=st.data())
@SETTINGS
def test_mutated_signed_events_never_slip_through(checking_harness: Harness, data: st.DataObject) -> None:
    harness = checking_harness
    if not hasattr(harness, "fuzz_key"):
        harness.fuzz_key = harness.register("gw-fuzz")  # type: ignore[attr-defined]
    key, kid = harness.fuzz_key  # type: ignore[attr-defined]
    head = harness.client.get("/v1/emitters/gw-fuzz/head", headers=ADMIN).json()
    [token], _ = chain("gw-fuzz", 1, key, kid, start=head["seq"] + 1, prev_hash=head["hash"])
    header, payload, signature = token.split(".")
    part = data.draw(st.sampled_from(["header", "payload", "signature"]))
    original = {"header": header, "payload": payload, "signature": signature}[part]
    position = data.draw(st.integers(0, max(len(original) - 1, 0)))
    replacement = data.draw(st.sampled_from("ABCDEFabcdef0123456789-_"))
    mutated = original[:position] + replacement + original[position + 1 :]
    parts = {"header": header, "payload": payload, "signature": signature, part: mutated}
    forged = f"{parts['header']}.{parts['payload']}.{parts['signature']}"
    result = harness.client.post("/v1/events", json={"events": [forged]}).json()["results"][0]
    if forged == token:
        assert result["status"] == "accepted"
    elif result["status"] == "accepted":
        # Only a base64url spelling of the same bytes may pass (the last character's unused bits).
        assert _decoded(forged) == _decoded(token)
    else:
        assert result["status"] == "rejected"


def _decoded(token: str) -> list[bytes]:
    import base64

    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


def test_request_level_errors(harness: Harness) -> None:
    cases = [
        (b"{", "application/json", 400, "invalid_request"),
        (b"[]", "application/json", 400, "invalid_request"),
        (b'{"events": "x"}', "application/json", 400, "invalid_request"),
        (b'{"events": [], "more": 1}', "application/json", 400, "invalid_request"),
        (b'{"events": []}', "text/plain", 415, "unsupported_media_type"),
        (b'{"events": []}', "", 415, "unsupported_media_type"),
        (orjson.dumps({"events": ["x"] * 51}), "application/json", 413, "payload_too_large"),
        (b'{"events": ["' + b"a" * (9 * 1024 * 1024) + b'"]}', "application/json", 413, "payload_too_large"),
    ]
    for body, content_type, status, code in cases:
        response = harness.client.post("/v1/events", content=body, headers={"Content-Type": content_type})
        assert response.status_code == status, (body[:40], response.text)
        assert response.json()["error"]["code"] == code
        assert_envelope(response)
    empty = harness.client.post("/v1/events", json={"events": []})
    assert empty.json() == {"errors": False, "results": [], "heads": {}, "receipt": None}


def test_unknown_routes_and_methods_use_the_envelope(harness: Harness) -> None:
    for response in (
        harness.client.get("/nope"),
        harness.client.delete("/v1/events"),
        harness.client.get("/v1/emitters/unknown", headers=ADMIN),
        harness.client.put("/v1/emitters/gw-1", content=b"[1]", headers={**ADMIN, "Content-Type": "application/json"}),
    ):
        assert response.status_code in (400, 404, 405)
        assert_envelope(response)


def test_b64_helper_matches_the_protocol() -> None:
    assert b64(b"\xff\xfe") == "__4"
