"""The decision for one tool call, default deny: a tool is allowed only when the policy names it, one upstream
offers it, the resource it acts on can be named from its arguments (when the policy says how), and the caller's
token carries the scope the policy requires. Everything else is denied, with the reason in the event."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from custody.gateway.auth import MAX_NAME, Principal
from custody.gateway.config import Policy, ToolRule

__all__ = ["Decision", "decide", "visible"]


@dataclass(frozen=True, slots=True)
class Decision:
    result: Literal["allow", "deny"]
    required_scope: str | None
    reason: str
    server: str | None  # the upstream the call goes (or would have gone) to
    resource: dict[str, str] | None

    def event_field(self, policy: Policy) -> dict[str, Any]:
        return {
            "result": self.result,
            "required_scope": self.required_scope,
            "policy": policy.label,
            "reason": self.reason,
        }


def decide(
    policy: Policy,
    principal: Principal,
    tool: str,
    arguments: Mapping[str, Any],
    offered_by: Sequence[str],
    tenant: str,
) -> Decision:
    """``offered_by``: the upstreams whose tool list holds ``tool``."""
    rule = policy.rule(tool)
    if rule is None:
        return Decision("deny", None, f"tool {tool!r} is not in policy {policy.name}: default deny", None, None)
    candidates = [name for name in offered_by if rule.server in (None, name)]
    server = candidates[0] if len(candidates) == 1 else rule.server
    if not candidates:
        where = f"upstream {rule.server!r}" if rule.server else "no upstream"
        return _deny(rule, f"{where} offers no tool {tool!r}", server, None)
    if len(candidates) > 1:
        return _deny(
            rule, f"tool {tool!r} is offered by {', '.join(candidates)}: the policy must name its server", None, None
        )
    resource = None
    if rule.resource is not None:
        value = arguments.get(rule.resource.argument)
        if isinstance(value, bool) or not isinstance(value, str | int):
            got = "nothing" if value is None else type(value).__name__
            return _deny(
                rule,
                f"argument {rule.resource.argument!r} must name the {rule.resource.type} (a string); got {got}",
                server,
                None,
            )
        if isinstance(value, int) and value.bit_length() > 1800:  # more than 512 digits (and str() would refuse)
            return _deny(
                rule, f"argument {rule.resource.argument!r} is a number of more than {MAX_NAME} digits", server, None
            )
        text = str(value)
        if not 0 < len(text) <= MAX_NAME or any(0xD800 <= ord(char) <= 0xDFFF for char in text):
            return _deny(
                rule, f"argument {rule.resource.argument!r} is not a name of 1 to {MAX_NAME} characters", server, None
            )
        resource = {"type": rule.resource.type, "id": text, "tenant": tenant}
    if rule.scope not in principal.scopes:
        return _deny(rule, f"scope {rule.scope!r} is not granted to this credential", server, resource)
    return Decision("allow", rule.scope, f"scope {rule.scope!r} granted", server, resource)


def visible(policy: Policy, principal: Principal, tool: str, server: str) -> bool:
    """Whether ``tools/list`` shows ``tool`` (offered by ``server``) to this caller: only what it may call."""
    rule = policy.rule(tool)
    return rule is not None and rule.server in (None, server) and rule.scope in principal.scopes


def _deny(rule: ToolRule, reason: str, server: str | None, resource: dict[str, str] | None) -> Decision:
    return Decision("deny", rule.scope, reason, server, resource)
