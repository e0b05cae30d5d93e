"""A tenant whose log is full of values that mean something to a spreadsheet, to Markdown or to HTML.

Emitters choose agent names, users, resource ids, tools and reasons; a security tool must show every one of them
as the text it is. ``post`` writes this log through the real ingest API; tests then read it through every face.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.sdk import rfc3339
from tests.conftest import Harness

FORMULA_AGENT = "=1+2"
FORMULA_USER = "@SUM(A1:A9)"
FORMULA_RESOURCE = '=HYPERLINK("http://127.0.0.1:9/x","click")'


def markup(beacon: str) -> dict[str, str]:
    """Values that Markdown or HTML would turn into an image fetched from ``beacon``, a link, or formatting."""
    return {
        "agent": f"`evil` ![x]({beacon}/agent.png) **bold**",
        "user": f'<img src="{beacon}/user.png"> *alice*',
        "resource": f"[click]({beacon}/resource) <b>INV</b>",
        "tool": f"![t]({beacon}/tool.png)",
        "reason": f"<script>fetch('{beacon}/reason')</script> # heading",
    }


def post(harness: Harness, beacon: str = "http://127.0.0.1:9") -> dict[str, str]:
    """Post the hostile tenant's log (tenant ``acme``); return the markup values used, and under ``event_id`` the
    id of a denied call by the markup agent."""
    values = markup(beacon)
    gateway = harness.emitter("gw-hostile", "acme")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    for number, (user, agent, resource) in enumerate(
        [
            (FORMULA_USER, FORMULA_AGENT, FORMULA_RESOURCE),
            (values["user"], values["agent"], values["resource"]),
        ]
    ):
        credential = {"id": f"tok-{number}", "kind": "agent_token", "client_id": agent, "scopes": ["records:read"]}
        gateway.emit(
            type="credential.issued",
            occurred_at=rfc3339(start + timedelta(minutes=10 * number)),
            credential=credential,
            delegation={"sub": user, "act": {"sub": agent}},
        )
        for call in range(3):
            fields: dict[str, Any] = {
                "type": "tool.invocation",
                "occurred_at": rfc3339(start + timedelta(minutes=10 * number + call + 1)),
                "delegation": {"sub": user, "act": {"sub": agent}},
                "credential": credential,
                "tool": {"name": values["tool"] if number else "=cmd|' /C calc'!A0", "server": "records-mcp"},
                "resource": {"type": "record", "id": resource, "tenant": "acme"},
                "decision": {
                    "result": "deny" if call == 2 else "allow",
                    "required_scope": "records:read",
                    "policy": "default-deny",
                    "reason": values["reason"] if call == 2 else None,
                },
                "outcome": None if call == 2 else "success",
            }
            signed = gateway.emit(**fields)
            if number == 1 and call == 2:
                values["event_id"] = signed.event_id
    gateway.flush()
    harness.flush()
    return values
