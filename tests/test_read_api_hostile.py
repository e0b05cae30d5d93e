"""Hostile input against every operation of the read API: never a 500, always the envelope, always a status the
OpenAPI documents for that route."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from query.api import create_query_app
from query.tokens import TokenStore
from tests import scenario
from tests.conftest import open_harness

TEXT = st.text(max_size=40) | st.sampled_from(
    ["", "0", "-1", "99999999999", "acme", "globex", "ACME", "acme\n", "../x", "2026-01-01T00:00:00Z",
     "2026-13-45T99:99:99Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "'; DROP TABLE events; --",
     "%00", "\x00", "=1+2", "![x](http://127.0.0.1:9/x.png)", "a" * 5000]
)  # fmt: skip
PARAMETERS = [
    "tenant", "agent", "credential", "user", "trace", "tool", "resource", "decision", "outcome", "emitter", "type",
    "since", "until", "limit", "cursor", "format", "window", "kind", "severity", "resource_limit",
]  # fmt: skip


@pytest.fixture(scope="module")
def read_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str], list[Any]]]:
    data = tmp_path_factory.mktemp("read-api") / "data"
    with open_harness(data) as harness:
        scenario.build(harness)
    tokens = TokenStore(data.parent / "tokens.json")
    headers = {
        "admin": tokens.issue("root", "admin", None),
        "analyst-acme": tokens.issue("ann", "analyst", "acme"),
        "auditor-globex": tokens.issue("gab", "auditor", "globex"),
    }
    with TestClient(create_query_app(data, tokens)) as client:
        spec = client.get("/openapi.json").json()
        operations = [(method.upper(), path, item[method]) for path, item in spec["paths"].items() for method in item]
        yield client, headers, operations


@given(data=st.data())
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_read_operation_survives_arbitrary_parameters(
    read_api: tuple[TestClient, dict[str, str], list[Any]], data: st.DataObject
) -> None:
    client, tokens, operations = read_api
    method, template, operation = data.draw(st.sampled_from(operations))
    path = re.sub(r"\{[^}]+\}", lambda _: data.draw(st.text(min_size=1, max_size=40).map(_path_safe)), template)
    params = data.draw(st.dictionaries(st.sampled_from(PARAMETERS), TEXT, max_size=5))
    who = data.draw(st.sampled_from([None, "nope", *tokens]))
    headers = {} if who is None else {"Authorization": f"Bearer {tokens.get(who, who)}"}
    response = client.request(method, path, params=params, headers=headers)
    assert response.status_code < 500, (method, path, params, response.text[:300])
    assert str(response.status_code) in operation["responses"], (method, template, response.status_code)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "details"}


def _path_safe(text: str) -> str:
    return "".join(char for char in text if char.isprintable() and char not in "/?#%\\") or "x"


def test_a_tenant_bound_token_never_sees_another_tenants_event_through_hostile_ids(
    read_api: tuple[TestClient, dict[str, str], list[Any]],
) -> None:
    client, tokens, _ = read_api
    headers = {"Authorization": f"Bearer {tokens['analyst-acme']}"}
    for tenant in ("globex", "GLOBEX", "globex\n", " globex", "acme,globex", "*", "%"):
        response = client.get("/v1/events", params={"tenant": tenant}, headers=headers)
        assert response.status_code in (400, 403), (tenant, response.status_code)
    everything = client.get("/v1/events", params={"limit": 1000}, headers=headers).json()["events"]
    assert {event["tenant"] for event in everything} == {"acme"}
