"""Findings that depend on order and windows: every burst counts, and a backdated use after a revocation is found.

The tenant's own gateway is the adversary here: it signs what it likes as ``occurred_at``. What the server
received, and when, is the server's.
"""

from __future__ import annotations

from query.findings import FindingSettings, findings
from query.lake import LakeReader
from tests import scenario
from tests.conftest import Harness

INTERN = scenario.credential("tok-intern", "agent_token", "intern-agent", ["tickets:read"])


def denied(s: scenario.Scenario, name: str, minute: float) -> dict[str, object]:
    return scenario.invocation(
        s,
        name,
        minute,
        ["carl@acme.example", "intern-agent"],
        INTERN,
        "update_ticket",
        "helpdesk-mcp",
        "tickets:write",
        ("ticket", name, "acme"),
        result="deny",
    )


def read_ticket(s: scenario.Scenario, name: str, minute: float) -> dict[str, object]:
    return scenario.invocation(
        s,
        name,
        minute,
        ["carl@acme.example", "intern-agent"],
        INTERN,
        "read_ticket",
        "helpdesk-mcp",
        "tickets:read",
        ("ticket", "T-7", "acme"),
    )


def test_every_burst_of_an_actor_is_evidence_not_only_the_first(harness: Harness) -> None:
    s = scenario.Scenario()
    gateway = harness.emitter("gw-help", "acme")
    names = [f"first-{i}" for i in range(5)] + [f"second-{i}" for i in range(5)]
    for index, name in enumerate(names):
        gateway.emit(**denied(s, name, index if index < 5 else 100 + index))  # two bursts, 100 minutes apart
    gateway.emit(**denied(s, "lone", 50))  # alone in its window: no burst
    gateway.flush()
    harness.flush()
    [burst] = findings(LakeReader(harness.data_dir), kinds=("denied_burst",))
    assert burst.evidence == [s.id(name) for name in names]  # was: the first burst's 5 only
    assert burst.details == {"detail": 10}


def test_a_use_backdated_before_the_revocation_is_found_by_when_it_arrived(harness: Harness) -> None:
    s = scenario.Scenario()
    idp = harness.emitter("idp-acme", "acme")
    gateway = harness.emitter("gw-help", "acme")
    idp.emit(
        type="credential.revoked",
        occurred_at=scenario.at(50),
        credential=INTERN,
        revoked_at=scenario.at(50),
        reason="intern offboarded",
    )
    idp.flush()
    gateway.emit(**read_ticket(s, "backdated-use", 10))  # claims 40 minutes before the revocation, arrives after
    gateway.flush()
    harness.flush()
    reader = LakeReader(harness.data_dir)
    strict = FindingSettings(revocation_grace_seconds=0)  # the test posts within a second of the revocation
    [found] = findings(reader, kinds=("action_after_revocation",), settings=strict)
    assert (found.subject, found.evidence) == ("tok-intern", [s.id("backdated-use")])
    # Within the grace (the default 60 s), a use and a revocation that arrive together are judged by occurred_at.
    assert findings(reader, kinds=("action_after_revocation",)) == []


def test_a_use_before_the_revocation_received_before_it_is_not_flagged(harness: Harness) -> None:
    s = scenario.Scenario()
    gateway = harness.emitter("gw-help", "acme")
    gateway.emit(**read_ticket(s, "use", 10))
    gateway.emit(
        type="credential.revoked",
        occurred_at=scenario.at(50),
        credential=INTERN,
        revoked_at=scenario.at(50),
    )
    gateway.flush()
    harness.flush()
    strict = FindingSettings(revocation_grace_seconds=0)
    assert findings(LakeReader(harness.data_dir), kinds=("action_after_revocation",), settings=strict) == []
