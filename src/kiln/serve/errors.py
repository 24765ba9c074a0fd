"""The error model: every failure is answered as ``{"error": {"code", "message", "details"}}``.

Client mistakes are 4xx with a machine-readable ``code``; anything else is a 500 ``internal``. Each
answered error is counted by its code in the metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serve.metrics import ServeMetrics


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. invalid_json, invalid_input, body_too_large")
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


_MEANINGS = {400: "malformed request (e.g. invalid JSON)", 401: "missing or wrong API key",
             404: "no such route", 413: "body over the size limit", 415: "unsupported content type",
             422: "well-formed but invalid input (shape, type, range, undecodable image, too many instances)",
             500: "a server fault, e.g. the model gave a non-finite output",
             503: "not ready, or overloaded (retry later)"}


def error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of a route, for its ``responses=``."""
    return {c: {"model": ErrorBody, "description": _MEANINGS[c]} for c in codes}


def error_response(err: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details is not None:
        body["details"] = err.details
    return JSONResponse({"error": body}, status_code=err.status, headers=err.headers)


def as_api_error(err: Exception) -> ApiError:
    """Any exception a route raised, as the error it is answered with."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return ApiError(err.status_code, code, str(err.detail), headers=err.headers)
    if isinstance(err, RequestValidationError):
        details = [{"loc": ".".join(map(str, e.get("loc", ()))), "type": e.get("type"), "msg": e.get("msg")}
                   for e in err.errors()[:20]]
        return ApiError(422, "invalid_request", "the request is invalid", details)
    return ApiError(500, "internal", f"internal error: {type(err).__name__}")


def answer_error(err: Exception, metrics: ServeMetrics) -> JSONResponse:
    api = as_api_error(err)
    metrics.error(api.code)
    return error_response(api)


def install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """FastAPI's routes answer errors in the error model too (404, 405 and server faults included)."""
    async def handle(request: Request, err: Exception) -> JSONResponse:
        return answer_error(err, metrics)

    for kind in (ApiError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, handle)
