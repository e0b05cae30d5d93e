"""The event payload of the ingest protocol (``docs/protocol.md``), validated with pydantic in strict mode.

Strict mode means no coercion: ``"7"`` is not a seq and ``true`` is not an integer. Unknown fields are refused, so
nothing a gateway sends is silently dropped from the typed columns. Floats are refused before this model runs (by
the canonicalizer, which sees every number). Per-type rules (a ``tool.invocation`` has a tool and a decision, ...)
are checked after the field types.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

__all__ = [
    "EMITTER_ID",
    "EVENT_TYPES",
    "Event",
    "describe_validation_error",
]

EMITTER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
_TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"
_UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

EVENT_TYPES = ("tool.invocation", "agent.delegation", "task.approval", "credential.issued", "credential.revoked")

Name = Annotated[str, StringConstraints(min_length=1, max_length=512)]
Text = Annotated[str, StringConstraints(max_length=4096)]
Scopes = Annotated[list[Name], Field(max_length=512)]
Identifier = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
Timestamp = Annotated[str, StringConstraints(pattern=_TIMESTAMP_PATTERN)]
EventId = Annotated[str, StringConstraints(pattern=_UUID_PATTERN)]
Hash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SafeInt = Annotated[int, Field(ge=-(2**53), le=2**53)]
AttrValue = Annotated[str, StringConstraints(max_length=4096)] | SafeInt | bool

_MAX_DELEGATION_DEPTH = 32


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Actor(_Strict):
    sub: Name
    act: Actor | None = None


class Delegation(_Strict):
    sub: Name
    act: Actor | None = None


class Credential(_Strict):
    id: Name
    kind: Literal["agent_token", "user_session", "service_account", "api_key"]
    client_id: Name
    scopes: Scopes
    expires_at: Timestamp | SafeInt | None = None


class Tool(_Strict):
    name: Name
    server: Name


class Resource(_Strict):
    type: Name
    id: Name
    tenant: Identifier


class Decision(_Strict):
    result: Literal["allow", "deny"]
    required_scope: Name | None
    policy: Text | None = None
    reason: Text | None = None


class Delegate(_Strict):
    agent: Name
    credential_id: Name
    scopes: Scopes


class Approval(_Strict):
    id: Name
    approved_by: Name
    scopes: Scopes
    task: Text


class Event(_Strict):
    v: Annotated[int, Field(ge=1, le=1)]  # not Literal[1]: that admits true, since True == 1 in Python
    event_id: EventId
    type: Literal["tool.invocation", "agent.delegation", "task.approval", "credential.issued", "credential.revoked"]
    occurred_at: Timestamp
    emitter: Identifier
    tenant: Identifier
    seq: Annotated[int, Field(ge=1, le=2**53)]
    prev_hash: Hash
    delegation: Delegation | None = None
    credential: Credential | None = None
    tool: Tool | None = None
    resource: Resource | None = None
    decision: Decision | None = None
    outcome: Literal["success", "error"] | None = None
    parent_event_id: EventId | None = None
    trace_id: Name | None = None
    approval_id: Name | None = None
    delegate: Delegate | None = None
    approval: Approval | None = None
    revoked_at: Timestamp | None = None
    reason: Text | None = None
    attrs: (
        Annotated[
            dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], AttrValue], Field(max_length=256)
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _per_type_rules(self) -> Event:
        required = _REQUIRED[self.type]
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} event needs {', '.join(missing)}")
        if self.tool is not None and self.type != "tool.invocation":
            raise ValueError(f"tool is only for tool.invocation events, not {self.type}")
        if self.approval is not None and self.approval_id is not None and self.approval.id != self.approval_id:
            raise ValueError(f"approval_id {self.approval_id!r} differs from approval.id {self.approval.id!r}")
        if self.seq == 1 and self.prev_hash != "0" * 64:
            raise ValueError("prev_hash of seq 1 must be 64 zeros")
        depth, actor = 0, self.delegation.act if self.delegation else None
        while actor is not None:
            depth += 1
            actor = actor.act
        if depth > _MAX_DELEGATION_DEPTH:
            raise ValueError(f"delegation is {depth} agents deep, more than {_MAX_DELEGATION_DEPTH}")
        _check_date("occurred_at", self.occurred_at)
        if self.revoked_at is not None:
            _check_date("revoked_at", self.revoked_at)
        if self.credential is not None and isinstance(self.credential.expires_at, str):
            _check_date("credential.expires_at", self.credential.expires_at)
        return self

    def occurred_at_datetime(self) -> datetime:
        return datetime.fromisoformat(self.occurred_at[:-1]).replace(tzinfo=UTC)


_REQUIRED = {
    "tool.invocation": ("delegation", "credential", "tool", "decision"),
    "agent.delegation": ("delegation", "delegate"),
    "task.approval": ("approval",),
    "credential.issued": ("credential",),
    "credential.revoked": ("credential", "revoked_at"),
}


def _check_date(name: str, value: str) -> None:
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError as exc:
        raise ValueError(f"{name} {value!r} is not a real date and time: {exc}") from exc


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``, values shortened."""
    lines = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "payload"
        got: Any = problem.get("input")
        shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message} (got {shown})")
    return "; ".join(lines)
