"""The one error envelope of every Custody HTTP API: ``{"error": {"code", "message", "details": [...]}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.errors import CustodyError

__all__ = ["ErrorEnvelope", "envelope", "error_response", "install_error_envelope"]

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[str]


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def envelope(code: str, message: str, details: list[str] | None = None) -> dict[str, dict[str, object]]:
    return {"error": {"code": code, "message": message, "details": details or []}}


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
