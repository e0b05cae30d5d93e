"""OCSF, the schema SIEMs exchange (schema.ocsf.io, version 1.5.0): events as API Activity (class 6003), findings as
Detection Finding (class 2004). docs/ocsf.md is the field-by-field mapping; what OCSF has no place for (the event's
hash and its place in the transparency log, the whole delegation chain, the signed decision) is under
``unmapped.custody``, never dropped.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from query.detect.records import FindingRecord
from query.findings import Finding
from query.lake import LakeReader
from store.ground.layout import DataDir

__all__ = ["OCSF_VERSION", "Anchor", "event_to_ocsf", "finding_to_ocsf", "latest_anchor", "ocsf_events"]

OCSF_VERSION = "1.5.0"
PRODUCT = {"name": "Custody", "vendor_name": "Custody", "version": "0.1.0"}
API_ACTIVITY, DETECTION_FINDING = 6003, 2004
_SEVERITY_ID = {"critical": 5, "high": 4, "medium": 3, "low": 2}
_FINDING_STATUS = {"open": 1, "acknowledged": 2, "suppressed": 3, "resolved": 4}  # New, In Progress, ...
_FINDING_ACTIVITY = {"open": 1, "acknowledged": 2, "suppressed": 2, "resolved": 3}  # Create, Update, Close
_COLUMNS = (
    'event_id, type, occurred_at, received_at, log_index, emitter, seq, prev_hash, event_hash, kid, tenant, "user",'
    " agent, delegation_chain, delegation_depth, credential_id, credential_kind, credential_client_id,"
    " credential_scopes, credential_expires_at, tool_name, tool_server, resource_type, resource_id, resource_tenant,"
    " decision_result, decision_required_scope, decision_policy, decision_reason, outcome, parent_event_id,"
    " trace_id, approval_id"
)


class Anchor(dict[str, Any]):
    """The signed checkpoint an export is anchored to: its origin, tree size and root hash (base64)."""


def latest_anchor(data_dir: Path) -> Anchor | None:
    """The newest checkpoint the log published (``log/checkpoint``), as origin, size and root; None before one."""
    try:
        lines = DataDir(data_dir).checkpoint_file.read_text().splitlines()
        return Anchor(
            origin=lines[0], size=int(lines[1]), root_hash=base64.b64encode(base64.b64decode(lines[2])).decode()
        )
    except (OSError, IndexError, ValueError):
        return None


def ocsf_events(
    reader: LakeReader, *, tenant: str | None, since: datetime | None, until: datetime | None, batch: int = 10_000
) -> Iterator[dict[str, Any]]:
    """The lake's events (of ``tenant``, in the window) in log order, as plain rows."""
    where: list[str] = ["TRUE"]
    params: list[object] = []
    if tenant is not None:
        where.append("tenant = ?")
        params.append(tenant)
    if since is not None:
        where.append("occurred_at >= ?")
        params.append(since)
    if until is not None:
        where.append("occurred_at < ?")
        params.append(until)
    with reader.connect() as connection:
        result = connection.execute(
            f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY log_index", params
        )
        names = [column[0] for column in result.description or ()]
        while rows := result.fetchmany(batch):
            for row in rows:
                yield dict(zip(names, row, strict=True))


def event_to_ocsf(row: dict[str, Any], anchor: Anchor | None) -> dict[str, Any]:
    """One lake row as an OCSF API Activity."""
    outcome, decision = row["outcome"], row["decision_result"]
    status_id = (
        2 if decision == "deny" or outcome == "error" else 1 if outcome == "success" or decision == "allow" else 0
    )
    status = {0: "Unknown", 1: "Success", 2: "Failure"}[status_id]
    actor: dict[str, Any] = {}
    if row["user"] is not None:
        actor["user"] = {"name": row["user"], "uid": row["user"]}
    if row["agent"] is not None:
        actor["app_name"] = row["agent"]
    chain = list(row["delegation_chain"] or [])
    if len(chain) > 1:
        actor["invoked_by"] = " -> ".join(chain)
    if row["credential_id"] is not None:
        session: dict[str, Any] = {"uid": row["credential_id"], "credential_uid": row["credential_id"]}
        if row["credential_expires_at"] is not None:
            session["expiration_time"] = _ms(row["credential_expires_at"])
        actor["session"] = session
    if decision is not None:
        authorization: dict[str, Any] = {"decision": decision}
        if row["decision_policy"] is not None:
            authorization["policy"] = {"name": row["decision_policy"], "desc": row["decision_reason"] or ""}
        actor["authorizations"] = [authorization]
    if not actor:
        actor["app_name"] = row["emitter"]  # an event with no principal: the emitter acted
    event: dict[str, Any] = {
        "class_uid": API_ACTIVITY,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": 99,
        "activity_name": "Invoke" if row["type"] == "tool.invocation" else row["type"],
        "type_uid": API_ACTIVITY * 100 + 99,
        "type_name": "API Activity: Other",
        "severity_id": 2 if decision == "deny" else 1,
        "severity": "Low" if decision == "deny" else "Informational",
        "time": _ms(row["occurred_at"]),
        "status_id": status_id,
        "status": status,
        "actor": actor,
        "api": {
            "operation": row["tool_name"] or row["type"],
            "request": {"uid": row["event_id"]},
            **({"service": {"name": row["tool_server"]}} if row["tool_server"] else {}),
        },
        "src_endpoint": {"name": row["emitter"]},
        "metadata": {
            "version": OCSF_VERSION,
            "product": PRODUCT,
            "uid": row["event_id"],
            "event_code": row["type"],
            "log_name": row["emitter"],
            "logged_time": _ms(row["received_at"]),
            "sequence": row["seq"],
            "tenant_uid": row["tenant"],
            **({"correlation_uid": row["trace_id"]} if row["trace_id"] else {}),
        },
        "unmapped": {"custody": _custody_fields(row, anchor)},
    }
    if decision == "deny" and row["decision_reason"]:
        event["status_detail"] = row["decision_reason"]
    if row["resource_id"] is not None:
        event["resources"] = [{"uid": row["resource_id"], "type": row["resource_type"]}]
    return event


def _custody_fields(row: dict[str, Any], anchor: Anchor | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": row["type"],
        "event_hash": row["event_hash"],
        "prev_hash": row["prev_hash"],
        "kid": row["kid"],
        "emitter": row["emitter"],
        "seq": row["seq"],
        "log_index": row["log_index"],
        "delegation_chain": chain if (chain := list(row["delegation_chain"] or [])) else None,
        "delegation_depth": row["delegation_depth"],
        "credential": {
            "id": row["credential_id"],
            "kind": row["credential_kind"],
            "client_id": row["credential_client_id"],
            "scopes": list(row["credential_scopes"] or []),
        }
        if row["credential_id"] is not None
        else None,
        "decision": {
            "result": row["decision_result"],
            "required_scope": row["decision_required_scope"],
            "policy": row["decision_policy"],
            "reason": row["decision_reason"],
        }
        if row["decision_result"] is not None
        else None,
        "outcome": row["outcome"],
        "resource_tenant": row["resource_tenant"],
        "parent_event_id": row["parent_event_id"],
        "approval_id": row["approval_id"],
    }
    if anchor is not None and row["log_index"] is not None and row["log_index"] < anchor["size"]:
        fields["checkpoint"] = dict(anchor)  # the signed tree this event is a leaf of (prove it: /v1/log/inclusion)
    return {name: value for name, value in fields.items() if value is not None}


def finding_to_ocsf(finding: FindingRecord | Finding, evidence: list[str], anchor: Anchor | None) -> dict[str, Any]:
    """A finding (a record of continuous detection, or one computed on demand) as an OCSF Detection Finding."""
    status = finding.status if isinstance(finding, FindingRecord) else "open"
    uid = (
        f"custody-finding-{finding.id}"
        if isinstance(finding, FindingRecord)
        else (f"custody-{finding.kind}-{finding.tenant}-{finding.subject}")
    )
    first, last = _ms_text(finding.first_seen), _ms_text(finding.last_seen)
    info: dict[str, Any] = {
        "uid": uid,
        "title": finding.title,
        "types": [finding.kind],
        "analytic": {"name": finding.kind, "uid": finding.kind, "type_id": 1, "type": "Rule"},
        "related_events": [{"uid": event_id} for event_id in evidence],
        "related_events_count": len(evidence),
        **({"first_seen_time": first} if first is not None else {}),
        **({"last_seen_time": last} if last is not None else {}),
    }
    moment = last or first or 0
    if isinstance(finding, FindingRecord):
        info["created_time"] = _ms_text(finding.opened_at)
        info["modified_time"] = _ms_text(finding.updated_at)
        moment = info["modified_time"] or moment
    activity = _FINDING_ACTIVITY[status]
    unmapped: dict[str, Any] = {
        "tenant": finding.tenant,
        "subject": finding.subject,
        "owasp": list(finding.owasp),
        "status": status,
        "evidence": evidence,
    }
    if isinstance(finding, FindingRecord) and finding.assignee:
        unmapped["assignee"] = finding.assignee
    if anchor is not None:
        unmapped["checkpoint"] = dict(anchor)
    return {
        "class_uid": DETECTION_FINDING,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": activity,
        "activity_name": {1: "Create", 2: "Update", 3: "Close"}[activity],
        "type_uid": DETECTION_FINDING * 100 + activity,
        "severity_id": _SEVERITY_ID[finding.severity],
        "severity": finding.severity.capitalize(),
        "status_id": _FINDING_STATUS[status],
        "status": {1: "New", 2: "In Progress", 3: "Suppressed", 4: "Resolved"}[_FINDING_STATUS[status]],
        "time": moment,
        "is_alert": finding.severity in ("critical", "high"),
        "finding_info": info,
        "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "uid": uid, "tenant_uid": finding.tenant},
        "unmapped": {"custody": unmapped},
    }


def _ms(value: datetime | None) -> int:
    return 0 if value is None else int(value.timestamp() * 1000)


def _ms_text(value: str | None) -> int | None:
    if not value:
        return None
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
