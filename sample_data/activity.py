"""Thirty days of the demo organisation at work, seeded and deterministic, with incidents planted in it.

``work_days`` adds the ordinary work to a ``Workload``; ``sample_data.generate`` puts it together with the planted
incidents.

The rhythm: tasks arrive over business hours (peaks at 10:00 and 14:00 UTC, quiet nights, weekends at a fifth).
A task is approved by a person of the tenant (``task.approval`` at the IdP); the agent calls tools through its
tenant's gateways with the token the IdP issued it that day (tokens rotate at 03:00 UTC, the old one revoked);
orchestrators hand part of the work to a sub-agent by token exchange (``agent.delegation``, a subset of their
scopes). About 1% of calls ask for a scope the agent lacks and are denied; 2% of allowed calls fail.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.sdk import rfc3339
from sample_data.org import AGENTS, TENANTS, TOOLS, Agent, Tool, gateway_for, tools_for, users_of

__all__ = ["Workload", "delegation", "work_days"]

ROTATION_HOUR = 3
_HOURLY = [0.1, 0.05, 0.05, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 2.2, 2.6, 2.3, 1.6, 2.0, 2.5, 2.2, 1.8, 1.2, 0.7, 0.5]
_HOURLY += [0.4, 0.3, 0.2, 0.15]
TASKS = {"acme": "work the ticket queue", "globex": "prepare the account review", "initech": "run the weekly chores"}


class Workload:
    """Accumulates events; every id comes from the seeded generator, every time from the plan."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rows: list[tuple[str, int, str, dict[str, Any]]] = []  # (occurred_at, order, emitter, fields)

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def add(self, emitter: str, at: datetime, **fields: Any) -> str:
        fields.setdefault("event_id", self.new_id())
        fields["occurred_at"] = rfc3339(at)
        self.rows.append((fields["occurred_at"], len(self.rows), emitter, fields))
        return str(fields["event_id"])

    def token(self, agent: Agent, at: datetime) -> dict[str, Any]:
        """The agent's token of the rotation period containing ``at``."""
        day = (at - timedelta(hours=ROTATION_HOUR)).date()
        return {
            "id": f"tok-{agent.name}-{day:%Y%m%d}",
            "kind": "agent_token",
            "client_id": agent.name,
            "scopes": sorted(agent.granted),
            "expires_at": rfc3339(_rotation(day) + timedelta(days=1, minutes=10)),
        }

    def call(
        self,
        agent: Agent,
        chain: list[str],
        credential: dict[str, Any],
        tool: Tool,
        at: datetime,
        *,
        resource: tuple[str, str] | None = None,
        resource_tenant: str | None = None,
        allowed: bool | None = None,
        parent: str | None = None,
        trace: str | None = None,
        approval: str | None = None,
        required_scope: str | bool | None = True,
    ) -> str:
        """A tool invocation as the gateway of the agent's tenant records it."""
        scope = tool.scope if required_scope is True else required_scope
        if allowed is None:
            allowed = scope in credential["scopes"]
        rid = resource or (tool.resource_type, self.resource_id(tool.resource_type))
        failed = allowed and self.rng.random() < 0.02
        return self.add(
            gateway_for(agent.tenant, tool.server).emitter,
            at,
            type="tool.invocation",
            delegation=delegation(chain),
            credential=credential,
            tool={"name": tool.name, "server": tool.server},
            resource={"type": rid[0], "id": rid[1], "tenant": resource_tenant or agent.tenant},
            decision={
                "result": "allow" if allowed else "deny",
                "required_scope": scope,
                "policy": "default-deny",
                "reason": None if allowed else f"{scope} not granted to {credential['id']}",
            },
            outcome=("error" if failed else "success") if allowed else None,
            parent_event_id=parent,
            trace_id=trace,
            approval_id=approval,
        )

    def resource_id(self, kind: str) -> str:
        prefix = {"ticket": "T", "invoice": "INV", "customer": "C", "doc": "D", "employee": "E"}.get(kind)
        if prefix is None:
            return f"{kind}-{self.rng.randrange(40)}"
        return f"{prefix}-{self.rng.randrange(1000, 9999)}"

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [(emitter, fields) for _, _, emitter, fields in sorted(self.rows, key=lambda row: row[:2])]


def delegation(chain: list[str]) -> dict[str, Any]:
    """``[user, agent, sub-agent]`` as RFC 8693 ``{"sub": user, "act": {"sub": sub-agent, "act": {"sub": agent}}}``."""
    act: dict[str, Any] | None = None
    for actor in chain[1:]:
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    return {"sub": chain[0], **({"act": act} if act else {})}


def _rotation(day: Any) -> datetime:
    return datetime(day.year, day.month, day.day, ROTATION_HOUR, tzinfo=UTC)


def work_days(work: Workload, start: datetime, end: datetime, tasks_per_day: int) -> None:
    """The organisation's ordinary work from ``start`` to ``end``: credentials, then tasks over business hours."""
    _credentials(work, start, end)
    day = start.replace(hour=0, minute=0, second=0)
    while day < end:
        share = 0.2 if day.weekday() >= 5 else 1.0
        for _ in range(round(tasks_per_day * share)):
            hour = work.rng.choices(range(24), weights=_HOURLY)[0]
            at = day + timedelta(hours=hour, seconds=work.rng.randrange(3600))
            if start <= at < end - timedelta(minutes=30):
                _task(work, at)
        day += timedelta(days=1)


def _credentials(work: Workload, start: datetime, end: datetime) -> None:
    """Each agent's daily token from its IdP, issued at the rotation hour; the previous one revoked then."""
    day = (start - timedelta(hours=ROTATION_HOUR)).date()
    while _rotation(day) < end:
        at = _rotation(day)
        for agent in AGENTS.values():
            if agent.sub_agent:
                continue
            idp = f"idp-{agent.tenant}"
            token = work.token(agent, at)
            chain = [agent.owner, agent.name]
            if at >= start:
                work.add(idp, at, type="credential.issued", credential=token, delegation=delegation(chain))
            previous = work.token(agent, at - timedelta(hours=1))
            if at - timedelta(minutes=1) >= start:
                work.add(
                    idp,
                    at + timedelta(seconds=1),
                    type="credential.revoked",
                    credential=previous,
                    revoked_at=rfc3339(at + timedelta(seconds=1)),
                    reason="rotation",
                )
        day += timedelta(days=1)


def _task(work: Workload, at: datetime) -> None:
    rng = work.rng
    tenant = rng.choice(TENANTS)
    agents = [a for a in AGENTS.values() if a.tenant == tenant and not a.sub_agent]
    agent = rng.choices(agents, weights=[a.weight for a in agents])[0]
    user = rng.choice(users_of(tenant))
    trace = f"trace-{work.new_id()[:13]}"
    approval_id = f"appr-{work.new_id()[:8]}"
    root = work.add(
        f"idp-{tenant}",
        at,
        type="task.approval",
        approval={"id": approval_id, "approved_by": user, "scopes": list(agent.scopes), "task": TASKS[tenant]},
        approval_id=approval_id,
        trace_id=trace,
    )
    chain = [user, agent.name]
    mine = tools_for(agent.scopes)
    clock = at
    for _ in range(rng.randint(2, 7)):
        clock += timedelta(seconds=rng.randint(3, 90))
        token = work.token(agent, clock)
        tool = rng.choice(mine)
        if rng.random() < 0.02:  # asks for what it was not granted: denied at the gateway (half reach one)
            tool = rng.choice([t for t in TOOLS.values() if t.scope and t.scope not in agent.granted])
            tool = tool if _reachable(agent, tool) else mine[0]
        credential = token
        if agent.service_account and rng.random() < 0.3:
            credential = {"id": agent.service_account, "kind": "service_account", "client_id": agent.name,
                          "scopes": sorted(agent.scopes)}  # fmt: skip
        work.call(agent, chain, credential, tool, clock, parent=root, trace=trace, approval=approval_id)
    for sub_name, scopes in agent.delegates:
        if rng.random() < 0.35:
            clock += timedelta(seconds=rng.randint(5, 60))
            _delegate(work, agent, AGENTS[sub_name], scopes, user, clock, root, trace, approval_id)


def _delegate(
    work: Workload,
    agent: Agent,
    sub: Agent,
    scopes: tuple[str, ...],
    user: str,
    at: datetime,
    parent: str,
    trace: str,
    approval_id: str,
    *,
    calls: int | None = None,
) -> tuple[str, list[str]]:
    """A token exchange: the IdP gives ``sub`` a one-hour token with ``scopes``; the sub-agent then works with it."""
    rng = work.rng
    token_id = f"tok-{sub.name}-{work.new_id()[:8]}"
    handed = work.add(
        f"idp-{agent.tenant}",
        at,
        type="agent.delegation",
        delegation=delegation([user, agent.name]),
        credential=work.token(agent, at),
        delegate={"agent": sub.name, "credential_id": token_id, "scopes": list(scopes)},
        parent_event_id=parent,
        trace_id=trace,
        approval_id=approval_id,
    )
    credential = {
        "id": token_id,
        "kind": "agent_token",
        "client_id": sub.name,
        "scopes": list(scopes),
        "expires_at": rfc3339(at + timedelta(hours=1)),
    }
    ids = []
    for _ in range(calls if calls is not None else rng.randint(1, 4)):
        at += timedelta(seconds=rng.randint(2, 40))
        tool = rng.choice(tools_for(scopes))
        ids.append(
            work.call(
                sub,
                [user, agent.name, sub.name],
                credential,
                tool,
                at,
                parent=handed,
                trace=trace,
                approval=approval_id,
            )
        )
    return handed, ids


def _reachable(agent: Agent, tool: Tool) -> bool:
    try:
        gateway_for(agent.tenant, tool.server)
    except KeyError:
        return False
    return True
