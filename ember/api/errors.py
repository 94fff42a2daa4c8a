"""Every failure leaves as `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ember.api.protocol import NotYetSupported
from ember.serving.errors import RequestError

log = logging.getLogger("ember.api")

# segments pydantic adds to a location for union members and validators, not field names
_TYPE_SEGMENTS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> JSONResponse:
    type_ = type_ or ("invalid_request_error" if status < 500 else "internal_server_error")
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _param(loc: tuple) -> str | None:
    out = ""
    for seg in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif seg.isidentifier() and seg not in _TYPE_SEGMENTS:
            out += f".{seg}" if out else seg
    return out or None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    kind, param = err.get("type"), _param(tuple(err.get("loc", ())))
    cause = (err.get("ctx") or {}).get("error")
    if kind == "json_invalid":
        return error_response(400, f"request body is not valid JSON: {err.get('msg')}", None, "invalid_json")
    if isinstance(cause, NotYetSupported):
        return error_response(400, str(cause), cause.field, "unsupported_parameter")
    if kind == "extra_forbidden":
        return error_response(400, f"unknown field `{param}`", param, "unknown_field")
    if kind == "missing":
        return error_response(400, f"`{param}` is required", param, "missing_field")
    if param is None:
        return error_response(400, f"invalid request body: {err.get('msg')}", None, "invalid_value")
    return error_response(400, f"invalid value for `{param}`: {err.get('msg')}", param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error", None, "internal_error")
