"""An access review's rows as text: the columns and cells of the CSV, the HTML and the PDF alike."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from store.schema import parse_timestamp

__all__ = ["CSV_COLUMNS", "cells", "generated_at"]

CSV_COLUMNS = [
    "agent",
    "owner",
    "emitters",
    "credentials",
    "scopes_granted",
    "scopes_used",
    "scopes_unused",
    "denied",
    "findings",
    "delegations_given",
    "delegations_received",
    "users",
    "recommendation",
    "justification",
    "decision",
    "reviewer",
    "date",
    "comment",
]


def cells(agent: dict[str, Any]) -> dict[str, str]:
    """One agent as flat text cells (the CSV row, and the PDF and HTML tables)."""
    credentials = "; ".join(
        f"{c['id']} ({c['kind']}, issued {c['issued'] or '?'}, expires {c['expires'] or '-'},"
        f" revoked {c['revoked'] or '-'})"
        for c in agent["credentials"]
    )
    return {
        "agent": agent["agent"],
        "owner": agent["owner"] or "",
        "emitters": " ".join(agent["emitters"]),
        "credentials": credentials,
        "scopes_granted": " ".join(agent["scopes_granted"]),
        "scopes_used": " ".join(f"{u['scope']}:{u['count']}@{u['last_used']}" for u in agent["scopes_used"]),
        "scopes_unused": " ".join(agent["scopes_unused"]),
        "denied": str(agent["denied"]),
        "findings": "; ".join(
            f"[{f['severity']}{'' if f.get('status', 'open') == 'open' else ', ' + f['status']}] {f['title']}"
            for f in agent["findings"]
        ),
        "delegations_given": "; ".join(
            f"{d['agent']} x{d['count']} ({' '.join(d['scopes'])})" for d in agent["delegations_given"]
        ),
        "delegations_received": "; ".join(
            f"{d['agent']} x{d['count']} ({' '.join(d['scopes'])})" for d in agent["delegations_received"]
        ),
        "users": "; ".join(
            f"{u['user']} ({u['events']} events, {u['approvals']} approvals"
            + (f" by {', '.join(u['approved_by'])})" if u["approved_by"] else ")")
            for u in agent["users"]
        ),
        "recommendation": agent["recommendation"],
        "justification": agent["justification"],
        **{name: agent["review"][name] for name in ("decision", "reviewer", "date", "comment")},
    }


def generated_at(body: dict[str, Any]) -> datetime:
    return parse_timestamp(str(body["generated_at"]))
