"""HTTP face of the ingest server (FastAPI). Routes parse input, call one library function, render its result.

Every error, on every endpoint, is one envelope: ``{"error": {"code", "message", "details": [...]}}``.
``POST /v1/events`` reads the raw body and parses it with orjson rather than declaring a pydantic body: a
``list[str]`` body model costs far more per request than the parsing it replaces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest.auth import verify_head_proof
from ingest.codes import ErrorCode, Status
from ingest.server import IngestServer
from store.ground.envelope import bearer, envelope, error_response, errors, finish_openapi, install_error_envelope
from store.ground.errors import CustodyError, InvalidInput, StorageUnavailable, Unauthorized
from store.log_http import proof_or_invalid, read_tile

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_IMMUTABLE = "public, max-age=31536000, immutable"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"
    http_status = 415


class EventsRequest(BaseModel):
    events: list[str] = Field(description="JWS compact serializations, one per event", max_length=1000)


class EventResult(BaseModel):
    event_id: str | None
    status: Status
    error: ErrorCode | None = Field(description="the rejection's code (docs/protocol.md); null unless rejected")
    detail: str | None
    log_index: int | None = Field(description="an accepted event's leaf index in the transparency log; else null")


class HeadModel(BaseModel):
    seq: int
    hash: str


class EventsResponse(BaseModel):
    errors: bool
    results: list[EventResult]
    heads: dict[str, HeadModel]
    receipt: str | None = Field(
        description="JWS by the server's key over the accepted events' hashes and log indexes (docs/transparency.md)"
    )


class ProofModel(BaseModel):
    tree_size: int
    proof: list[str] = Field(description="base64 SHA-256 hashes, RFC 6962 order")


class KeyView(BaseModel):
    kid: str
    jwk: dict[str, str]
    added_at: str
    revoked_at: str | None
    revoke_reason: str | None


class EmitterView(BaseModel):
    emitter: str
    tenant: str
    kind: str
    created_at: str
    keys: list[KeyView]
    head: HeadModel


class EmitterPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    kind: str = Field(description="gateway | agent | idp")
    keys: list[dict[str, str]] = Field(description="public JWKs, Ed25519 (OKP) or P-256 (EC), each with a kid")


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = None


def create_app(server: IngestServer, *, manage_lifecycle: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await run_in_threadpool(server.open)
            if server.verifiers is not None:
                await server.verifiers.warm(server.keys)
        try:
            yield
        finally:
            if manage_lifecycle:
                if server.verifiers is not None:
                    await server.verifiers.aclose()
                await run_in_threadpool(server.close)

    app = FastAPI(
        title="Custody ingest API",
        version="1",
        description="Signed, hash-chained invocation events from gateways and agents. See docs/protocol.md.",
        lifespan=lifespan,
        # No OpenTelemetry: the server exports Prometheus metrics, and asking for the global providers cost every
        # request three lookups.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    install_error_envelope(app)
    finish_openapi(
        app, public={"/v1/events", "/healthz", "/metrics", "/checkpoint", "/tile/{path}", "/v1/log/consistency"}
    )
    app.add_middleware(EventsEndpoint, server=server)

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        responses=errors(
            e400='invalid_request: not JSON, or not exactly {"events": [...]}',
            e413="payload_too_large: more events or bytes than the server takes",
            e415="unsupported_media_type: not application/json",
            e503="storage_unavailable, verifier_unavailable or overloaded: nothing in the request was acknowledged",
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EventsRequest.model_json_schema()}},
            }
        },
    )
    async def post_events(request: Request) -> Response:
        """Ingest up to 1,000 signed events; ``accepted`` results are fsync'd before this answers."""
        # Served by EventsEndpoint in front of FastAPI; this route documents it and answers if that is bypassed.
        headers = request.headers
        status, body = await ingest_events(
            server, headers.get("content-type"), headers.get("content-length"), request.stream()
        )
        return Response(body, status_code=status, media_type="application/json")

    @app.put(
        "/v1/emitters/{emitter_id}",
        response_model=EmitterView,
        responses=errors(
            e400="invalid_request: a bad id, tenant, kind or JWK",
            e401="unauthorized: not the admin token",
            e409="conflict: another tenant or kind, or a kid with other key material",
            e503="storage_unavailable or overloaded",
        ),
    )
    async def put_emitter(
        emitter_id: str, body: EmitterPut, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Create an emitter or add keys to it. A registered key is never replaced or deleted."""
        actor = server.admin.require(authorization)
        raw = body.model_dump()
        view, _ = await run_in_threadpool(server.registry.put_emitter, emitter_id, raw, actor)
        return JSONResponse(view)

    @app.post(
        "/v1/emitters/{emitter_id}/keys/{kid}/revoke",
        response_model=EmitterView,
        responses=errors(
            e400='invalid_request: a body that is not {"reason": ...}',
            e401="unauthorized: not the admin token",
            e404="not_found: no such emitter or key",
            e503="storage_unavailable or overloaded",
        ),
    )
    async def revoke_key(
        emitter_id: str,
        kid: str,
        body: RevokeBody | None = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Revoke a key: events signed with it are rejected from now on. Revoking twice changes nothing."""
        actor = server.admin.require(authorization)
        reason = body.reason if body else None
        view, _ = await run_in_threadpool(server.registry.revoke_key, emitter_id, kid, reason, actor)
        return JSONResponse(view)

    @app.get("/v1/emitters", response_model=list[EmitterView], responses=errors(e401="unauthorized"))
    async def list_emitters(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        server.admin.require(authorization)
        return JSONResponse(await run_in_threadpool(server.registry.list_emitters))

    @app.get(
        "/v1/emitters/{emitter_id}",
        response_model=EmitterView,
        responses=errors(e401="unauthorized", e404="not_found: no such emitter"),
    )
    async def get_emitter(emitter_id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        """The emitter, its keys with revocation times, and its chain head."""
        server.admin.require(authorization)
        return JSONResponse(await run_in_threadpool(server.registry.view, emitter_id))

    @app.get(
        "/v1/emitters/{emitter_id}/head",
        response_model=HeadModel,
        responses=errors(e401="unauthorized: neither the admin token nor a valid head proof", e404="not_found"),
    )
    async def get_head(emitter_id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        """The chain head, for the admin or for the emitter itself (a head proof signed by one of its keys)."""
        if not server.admin.matches(bearer(authorization)):
            token = bearer(authorization)
            if token is None:
                raise Unauthorized("this call needs Authorization: Bearer <admin token or head proof>")
            try:
                verify_head_proof(token, emitter_id, server.keys)
            except Unauthorized:  # on a cluster, the key may have been registered through another node just now
                if not await run_in_threadpool(server.reload_changed_registry):
                    raise
                verify_head_proof(token, emitter_id, server.keys)
        server.registry.view(emitter_id)  # 404 for unknown emitters
        return JSONResponse(server.service.head(emitter_id).as_json())

    @app.get(
        "/checkpoint",
        responses={200: {"content": {"text/plain": {}}}, **errors(e404="not_found: no checkpoint yet")},
    )
    async def checkpoint() -> Response:
        """The newest signed checkpoint of the transparency log (c2sp.org/tlog-checkpoint)."""
        note = server.store.merkle.reader.checkpoint_note()
        if note is None:
            return error_response(404, "not_found", "the log has signed no checkpoint yet")
        return PlainTextResponse(note, headers={"Cache-Control": "no-cache"})

    @app.get(
        "/tile/{path:path}",
        responses={200: {"content": {"application/octet-stream": {}}}, **errors(e404="not_found: no such tile")},
    )
    async def tile(path: str) -> Response:
        """A tile or entry bundle exactly as c2sp.org/tlog-tiles lays them out (immutable)."""
        data = await run_in_threadpool(read_tile, server.store.merkle.tiles, path)
        return Response(data, media_type="application/octet-stream", headers={"Cache-Control": _IMMUTABLE})

    @app.get(
        "/v1/log/consistency",
        response_model=ProofModel,
        responses=errors(e400="invalid_input: sizes outside the newest checkpoint, or from > to"),
    )
    async def log_consistency(
        old: Annotated[int, Query(alias="from", ge=0)], new: Annotated[int, Query(alias="to", ge=0)]
    ) -> JSONResponse:
        """RFC 6962 consistency proof from tree size ``from`` to ``to`` (at most the newest checkpoint's)."""
        proof = await run_in_threadpool(proof_or_invalid, server.store.merkle.consistency, old, new)
        return JSONResponse({"tree_size": new, "proof": proof})

    @app.get("/healthz", responses=errors(e503="starting: replaying the write-ahead log; or overloaded"))
    async def healthz() -> JSONResponse:
        if not server.ready:
            return error_response(503, "starting", "replaying the write-ahead log")
        stats = server.store.flush_stats
        return JSONResponse(
            {
                "status": "ok",
                "unflushed_events": stats.unflushed_events,
                "flush_error": stats.last_error,
                "quarantined_events": stats.quarantined_events,
            }
        )

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class EventsEndpoint:
    """``POST /v1/events`` as a plain ASGI app in front of FastAPI's exception, routing and dependency layers,
    which cost about 0.13 ms of event-loop CPU per request and do nothing this endpoint needs: it reads its raw body
    and renders its own errors. Every other request, and the route's OpenAPI entry, stays with FastAPI; an error
    this code does not expect still reaches the app's 500 handler (``ServerErrorMiddleware`` is outside)."""

    def __init__(self, app: ASGIApp, server: IngestServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/events" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        try:
            status, body = await ingest_events(
                self.server, headers.get(b"content-type"), headers.get(b"content-length"), _body_chunks(receive)
            )
        except ClientDisconnect:
            return  # nothing was checked or acknowledged; there is no one to answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def ingest_events(
    server: IngestServer, content_type: str | None, content_length: str | None, chunks: AsyncIterator[bytes]
) -> tuple[int, bytes]:
    """The status and JSON body answering one ``POST /v1/events``."""
    started = time.perf_counter()
    try:
        tokens = await _read_events(server, content_type, content_length, chunks)
        try:
            outcome = await server.ingest(tokens)
        except StorageUnavailable:
            server.metrics.storage_failures.inc()
            raise
    except CustodyError as exc:
        return exc.http_status, orjson.dumps(envelope(exc.code, exc.message, exc.details))
    server.metrics.observe(outcome, time.perf_counter() - started)
    return 200, orjson.dumps(outcome.as_json())


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _read_events(
    server: IngestServer, content_type: str | None, content_length: str | None, chunks: AsyncIterator[bytes]
) -> list[object]:
    limits = server.limits
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {media_type or 'nothing'!r}")
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body is {content_length} bytes; at most {limits.max_body_bytes} per request")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise PayloadTooLarge(f"body is more than {limits.max_body_bytes} bytes per request")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or set(document) != {"events"} or not isinstance(document["events"], list):
        raise InvalidInput('body must be {"events": ["<JWS compact>", ...]} and nothing else')
    events: list[object] = document["events"]
    if len(events) > limits.max_events:
        raise PayloadTooLarge(f"{len(events)} events; at most {limits.max_events} per request")
    return events
