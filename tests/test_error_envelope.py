"""One error envelope for both HTTP APIs: the same schema in both OpenAPIs, on every error response they list,
and the same shape on the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from query.api import create_query_app
from query.tokens import TokenStore
from tests.conftest import Harness


def error_refs(spec: dict[str, Any]) -> dict[tuple[str, str, str], str]:
    return {
        (path, method, status): response["content"]["application/json"]["schema"]["$ref"]
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
        if int(status) >= 400
    }


def test_both_apis_document_one_envelope_on_every_error(harness: Harness, tmp_path: Path) -> None:
    tokens = TokenStore(tmp_path / "tokens.json")
    tokens.issue("root", "admin", None)
    with TestClient(create_query_app(harness.data_dir, tokens)) as read_api:
        specs = {"ingest": harness.client.get("/openapi.json").json(), "read": read_api.get("/openapi.json").json()}
        wire = {
            "ingest": harness.client.get("/v1/emitters").json(),  # 401
            "read": read_api.get("/v1/events").json(),  # 401
        }
    schemas = [spec["components"]["schemas"] for spec in specs.values()]
    assert schemas[0]["ErrorEnvelope"] == schemas[1]["ErrorEnvelope"]
    assert schemas[0]["ErrorBody"] == schemas[1]["ErrorBody"]
    for name, spec in specs.items():
        refs = error_refs(spec)
        assert refs, name
        assert set(refs.values()) == {"#/components/schemas/ErrorEnvelope"}, name
    for body in wire.values():
        assert set(body) == {"error"}
        assert set(body["error"]) == {"code", "message", "details"}
        assert body["error"]["code"] == "unauthorized"
