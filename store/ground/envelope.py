"""The one error envelope of every Custody HTTP API: ``{"error": {"code", "message", "details": [...]}}``."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.ground.errors import CustodyError

__all__ = [
    "CONNECTION_ERRORS",
    "ErrorEnvelope",
    "RequestErrorCode",
    "bearer",
    "envelope",
    "error_response",
    "errors",
    "finish_openapi",
    "install_error_envelope",
]

log = logging.getLogger(__name__)


# Every request-level error code any Custody HTTP API answers with (per-event codes are ingest.codes.ErrorCode).
RequestErrorCode = Literal[
    "invalid_request",
    "invalid_payload",
    "payload_too_large",
    "unsupported_media_type",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "request_timeout",
    "overloaded",
    "starting",
    "storage_unavailable",
    "verifier_unavailable",
    "corrupt_state",
    "internal_error",
    "http_error",
]


class ErrorBody(BaseModel):
    code: RequestErrorCode
    message: str
    details: list[str]


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def envelope(code: str, message: str, details: list[str] | None = None) -> dict[str, dict[str, object]]:
    return {"error": {"code": code, "message": message, "details": details or []}}


# Answered by the serving layer (custody.serving) to any request, before it reaches a route.
CONNECTION_ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": ErrorEnvelope, "description": "request_timeout: the headers or body did not arrive in time"},
}


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a route: ``errors(e404="no such emitter")``, plus those of the serving layer. 503 is
    always listed: the serving layer answers ``overloaded`` with it."""
    responses: dict[int | str, dict[str, Any]] = {
        int(key.removeprefix("e")): {"model": ErrorEnvelope, "description": text} for key, text in described.items()
    }
    responses.setdefault(503, {"model": ErrorEnvelope, "description": "overloaded: too many requests in work"})
    return {**responses, **CONNECTION_ERRORS}


def finish_openapi(app: FastAPI, *, public: set[str]) -> None:
    """The app's OpenAPI as the server behaves: no 422 (validation errors are 400 in the envelope), a bearer
    security scheme on every operation whose path is not in ``public``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <token>"}
            }
            for path, item in schema["paths"].items():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
                    if path not in public:
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def error_response(status: int, code: str, message: str, details: list[str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status)


def install_error_envelope(app: FastAPI) -> None:
    """Route every error (ours, routing, validation, unexpected) through the envelope."""

    @app.exception_handler(CustodyError)
    async def custody_error(_: Request, exc: CustodyError) -> JSONResponse:
        return error_response(exc.http_status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(400, "invalid_request", "the request does not have the expected shape", details)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", "internal error; the server log has the details")
