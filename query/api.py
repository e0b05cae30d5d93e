"""HTTP read API over the forensics library: the same answers as the CLI, for the dashboard and for tools.

Every endpoint needs ``Authorization: Bearer <token>`` (see ``query.tokens``). A tenant-bound token sees only its
tenant on every endpoint: filters are forced to it, asking for another tenant is 403, and an event of another
tenant is 404 (its existence is not revealed). Running verification is for ``admin`` and ``auditor`` tokens.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, field_validator
from starlette.concurrency import run_in_threadpool

from query.blast import Subject, forward_taint, identity_blast_radius
from query.detect.loop import findings_store_path
from query.detect.records import FindingRecord, FindingStore, TransitionError
from query.findings import KINDS, findings
from query.index.reach_copies import ReachCopies
from query.index.tree_index import TreeIndex
from query.lake import LakeReader
from query.log_proofs import consistency, inclusion
from query.paths import delegation_path
from query.recert.reports import build_report
from query.recert.review import parse_window
from query.search import EventFilter, search
from query.tokens import Forbidden, Principal, TokenStore
from query.verify.run import run_verification
from store.ground.envelope import bearer, errors, finish_openapi, install_error_envelope
from store.ground.errors import InvalidInput, NotFound
from store.ground.layout import DataDir
from store.merkle_log import LogReader

__all__ = ["create_query_app"]

_BAD_INPUT = "invalid_request: a parameter out of its range or form"
_UNAUTHORIZED = "unauthorized: no token, or an unknown or revoked one"
_FORBIDDEN = "forbidden: another tenant than the token's, or a role that may not ask this"
_READS = errors(e400=_BAD_INPUT, e401=_UNAUTHORIZED, e403=_FORBIDDEN)
_QUEUE = errors(
    e400=_BAD_INPUT,
    e401=_UNAUTHORIZED,
    e403=_FORBIDDEN,
    e404="not_found: no such finding (in the token's tenant), or continuous detection never ran on this data dir",
)


def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    tokens: TokenStore = request.app.state.tokens
    return tokens.authenticate(bearer(authorization))


Caller = Annotated[Principal, Depends(_principal)]


class FindingChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["acknowledge", "resolve", "reopen", "suppress", "assign", "comment"]
    comment: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    assignee: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    until: AwareDatetime | None = None

    @field_validator("comment", "assignee")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and any(0xD800 <= ord(char) <= 0xDFFF for char in value):
            raise ValueError("a lone surrogate is not text")
        return value


_stores: dict[Path, FindingStore] = {}
_stores_lock = threading.Lock()


def _finding_store(data_dir: Path) -> FindingStore:
    """The findings records of ``data_dir`` (one connection per process); NotFound when detection never ran."""
    path = findings_store_path(data_dir)
    with _stores_lock:
        if path not in _stores:
            if not path.exists():
                raise NotFound("no findings records: continuous detection has not run on this data dir")
            _stores[path] = FindingStore(path)
        return _stores[path]


def _record_or_404(records: FindingStore, finding_id: int, tenant: str | None) -> FindingRecord:
    try:
        return records.get(finding_id, tenant=tenant)
    except TransitionError as exc:
        raise NotFound(str(exc)) from exc


def create_query_app(data_dir: Path, tokens: TokenStore) -> FastAPI:
    reader = LakeReader(data_dir)
    app = FastAPI(title="Custody read API", version="1", description="Forensics over the Custody lake.")
    install_error_envelope(app)
    finish_openapi(app, public={"/healthz"})

    app.state.tokens = tokens
    tree = TreeIndex(reader)  # built in the background from start; a path asked for earlier waits for it
    threading.Thread(target=tree.warm, name="tree-index", daemon=True).start()
    reach_copies = ReachCopies(reader)  # written in the background; a blast radius reads the lake for the rest
    reach_copies.warm()

    @app.get("/v1/events", responses=_READS)
    async def events(
        caller: Caller,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        agent: str | None = None,
        credential: str | None = None,
        tool: str | None = None,
        resource: str | None = None,
        decision: Literal["allow", "deny"] | None = None,
        outcome: Literal["success", "error"] | None = None,
        emitter: str | None = None,
        type: str | None = None,
        trace: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> JSONResponse:
        """Events newest first; ``agent`` matches any position in the delegation chain."""
        where = EventFilter(
            tenant=caller.scope(tenant),
            since=since,
            until=until,
            user=user,
            agent=agent,
            credential=credential,
            tool=tool,
            resource=resource,
            decision=decision,
            outcome=outcome,
            emitter=emitter,
            type=type,
            trace=trace,
        )
        page = await run_in_threadpool(search, reader, where, limit=limit, cursor=cursor)
        return JSONResponse(page.as_json())

    @app.get(
        "/v1/events/{event_id}/path",
        responses=errors(e401=_UNAUTHORIZED, e403=_FORBIDDEN, e404="not_found: no such event (in the token's tenant)"),
    )
    async def path(caller: Caller, event_id: str) -> JSONResponse:
        """The delegation path of an event and its task tree, as a graph and as text."""
        scope = caller.scope(None)
        narrowed = await run_in_threadpool(tree.reader_for, event_id)  # the rows of its task tree only
        found = await run_in_threadpool(delegation_path, narrowed, event_id, tenant=scope)
        return JSONResponse(found.as_json())

    @app.get(
        "/v1/log/inclusion",
        responses=errors(
            e400=_BAD_INPUT + "; or the event is not in that tree",
            e401=_UNAUTHORIZED,
            e403=_FORBIDDEN,
            e404="not_found",
        ),
    )
    async def log_inclusion(
        caller: Caller, event_id: str, tree_size: Annotated[int | None, Query(ge=0)] = None
    ) -> JSONResponse:
        """The event's leaf in the transparency log and its RFC 6962 inclusion proof to the tree of ``tree_size``
        (default: the newest checkpoint, which the answer then carries)."""
        scope = caller.scope(None)
        narrowed = await run_in_threadpool(tree.reader_for, event_id)
        found = await run_in_threadpool(inclusion, narrowed, event_id, tree_size, tenant=scope)
        return JSONResponse(found.as_json())

    @app.get("/v1/log/consistency", responses=_READS)
    async def log_consistency(
        caller: Caller,
        old: Annotated[int, Query(alias="from", ge=0)],
        new: Annotated[int, Query(alias="to", ge=0)],
    ) -> JSONResponse:
        """RFC 6962 consistency proof between two tree sizes (at most the newest checkpoint's)."""
        return JSONResponse(await run_in_threadpool(consistency, reader, old, new))

    @app.get("/v1/log/checkpoint", responses=_READS)
    async def log_checkpoint(caller: Caller) -> Response:
        """The newest signed checkpoint (c2sp.org/tlog-checkpoint), as the ingest server's ``/checkpoint``."""
        note = LogReader(DataDir(data_dir)).checkpoint_note()
        if note is None:
            raise NotFound("the log has signed no checkpoint yet")
        return Response(note, media_type="text/plain; charset=utf-8")

    @app.get("/v1/blast-radius", responses=_READS)
    async def blast_radius(
        caller: Caller,
        agent: str | None = None,
        credential: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: str | None = None,
        resource_limit: Annotated[int, Query(ge=0, description="resources listed, most used first; 0: all")] = 1000,
    ) -> JSONResponse:
        """Granted vs used scopes, reachable vs used tools, resources (``resources_total`` counts them all; the
        ``resource_limit`` most used are listed), tenants, users, delegates."""
        if (agent is None) == (credential is None):
            raise InvalidInput("give exactly one of agent or credential")
        kind: Literal["agent", "credential"] = "agent" if agent else "credential"
        reach = await run_in_threadpool(
            identity_blast_radius,
            reader,
            kind,
            agent or credential or "",
            since=since,
            until=until,
            tenant=caller.scope(tenant),
            copies=reach_copies,
            resource_limit=resource_limit or None,
        )
        reach_copies.warm()  # copies for the files written since (returns at once when one is running)
        return JSONResponse(reach.as_json())

    @app.get("/v1/taint", responses=_READS)
    async def taint(
        caller: Caller,
        since: datetime,
        agent: str | None = None,
        credential: str | None = None,
        user: str | None = None,
        trace: str | None = None,
        tenant: str | None = None,
        format: Literal["json", "csv"] = "json",
    ) -> Response:
        """Everything reached after ``since`` by a compromised agent, credential, user session or trace."""
        options: dict[Subject, str | None] = {"agent": agent, "credential": credential, "user": user, "trace": trace}
        given = [(name, value) for name, value in options.items() if value]
        if len(given) != 1:
            raise InvalidInput("give exactly one of agent, credential, user or trace")
        kind, subject = given[0]
        result = await run_in_threadpool(forward_taint, reader, kind, subject or "", since, tenant=caller.scope(tenant))
        if format == "csv":
            return Response(result.as_csv(), media_type="text/csv")
        return Response(result.as_json(), media_type="application/json")

    @app.get("/v1/findings", responses=_READS)
    async def list_findings(
        caller: Caller, tenant: str | None = None, kind: Annotated[list[str] | None, Query()] = None
    ) -> JSONResponse:
        """Findings by severity, each with its evidence event ids and OWASP references."""
        unknown = set(kind or ()) - set(KINDS)
        if unknown:
            raise InvalidInput(f"unknown finding kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        found = await run_in_threadpool(findings, reader, tenant=caller.scope(tenant), kinds=tuple(kind or KINDS))
        return JSONResponse([finding.as_json() for finding in found])

    @app.get("/v1/findings/queue", responses=_QUEUE)
    async def findings_queue(
        caller: Caller,
        tenant: str | None = None,
        status: Annotated[list[Literal["open", "acknowledged", "resolved", "suppressed"]] | None, Query()] = None,
        kind: Annotated[list[str] | None, Query()] = None,
        min_severity: Literal["critical", "high", "medium", "low"] = "low",
        assignee: str | None = None,
        limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    ) -> JSONResponse:
        """The triage queue: the findings continuous detection recorded, most severe first (open and acknowledged
        ones unless ``status`` says otherwise)."""
        records = _finding_store(data_dir)
        queue = records.queue(
            tenant=caller.scope(tenant),
            statuses=tuple(status or ("open", "acknowledged")),
            kinds=tuple(kind or ()),
            min_severity=min_severity,
            assignee=assignee,
            limit=limit,
        )
        return JSONResponse([record.as_json() for record in queue])

    @app.get("/v1/findings/queue/{finding_id}", responses=_QUEUE)
    async def finding_record(caller: Caller, finding_id: int) -> JSONResponse:
        """One recorded finding with its evidence event ids and its history (who changed what, when)."""
        records = _finding_store(data_dir)
        record = _record_or_404(records, finding_id, caller.tenant)
        return JSONResponse(
            {**record.as_json(), "evidence": records.evidence(finding_id), "history": records.history(finding_id)}
        )

    @app.post("/v1/findings/queue/{finding_id}", responses=_QUEUE)
    async def change_finding(caller: Caller, finding_id: int, change: FindingChange) -> JSONResponse:
        """Acknowledge, resolve, reopen, suppress (with a reason and an expiry), assign or comment: analysts and
        admins; the change is recorded with the token's name and becomes an event of the server's stream."""
        if caller.role not in ("admin", "analyst"):
            raise Forbidden(f"changing findings is for analyst and admin tokens; {caller.name!r} is {caller.role}")
        records = _finding_store(data_dir)
        _record_or_404(records, finding_id, caller.tenant)
        try:
            record = records.transition(
                finding_id,
                change.action,
                f"{caller.role}:{caller.name}",
                tenant=caller.tenant,
                comment=change.comment,
                assignee=change.assignee,
                until=change.until,
            )
        except TransitionError as exc:
            raise InvalidInput(str(exc)) from exc
        return JSONResponse(record.as_json())

    @app.post("/v1/verify", responses=_READS)
    async def verify(caller: Caller) -> JSONResponse:
        """Verify the whole lake, and the lake against the transparency log; a tenant-bound caller sees only the
        problems of its tenant's emitters."""
        if caller.role not in ("admin", "auditor"):
            raise Forbidden(f"verification is for admin and auditor tokens; {caller.name!r} is {caller.role}")
        verification = await run_in_threadpool(run_verification, data_dir)
        return JSONResponse(verification.report.for_tenant(caller.tenant).as_json())

    @app.get("/v1/recert", responses=_READS)
    async def recert(
        caller: Caller,
        tenant: str | None = None,
        window: str = "90d",
        format: Literal["csv", "json", "html", "pdf"] = "json",
    ) -> Response:
        """Access-recertification report of a tenant's agents, signed by the server key (auditor and admin)."""
        if caller.role not in ("admin", "auditor"):
            raise Forbidden(
                f"recertification reports are for auditor and admin tokens; {caller.name!r} is {caller.role}"
            )
        scope = caller.scope(tenant)
        if scope is None:
            raise InvalidInput("tenant is required: a report covers one tenant's agents")
        report = await run_in_threadpool(build_report, data_dir, scope, window_days=parse_window(window), form=format)
        return Response(
            report.content,
            media_type=report.media_type,
            headers={"Content-Disposition": f'attachment; filename="{report.filename}"'},
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app
