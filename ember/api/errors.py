"""Every failure leaves as `{"error": {"message", "type", "param", "code"}}` with the right status:
4xx naming the field for client mistakes, 500 only for real bugs (logged)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ember.serving.errors import FieldError, RequestError

log = logging.getLogger("ember.api")

# segments pydantic adds to a location for union members and validators; never field names
_TYPE_SEGMENTS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _text(value: str | None) -> str | None:
    """Lone surrogates a client sent, escaped (`\\ud800`), so that the error itself can be encoded."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if value is not None else None


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": _text(message), "type": type_, "param": _text(param), "code": code}}


# OpenAI's error types by status; other 4xx are invalid_request_error, 5xx internal_server_error
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
               503: "service_unavailable"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    headers = None if retry_after is None else {"retry-after": str(max(1, round(retry_after)))}
    return JSONResponse(status_code=status, content=error_body(message, param, code, error_type(status)),
                        headers=headers)


def _param(loc: tuple, field: str | None = None) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; `field` (a validator's own) is appended."""
    out = ""
    for seg in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif seg.isidentifier() and seg[0].islower() and seg not in _TYPE_SEGMENTS:
            out += f".{seg}" if out else seg
    if field:
        out += f".{field}" if out else field
    return out or None


def describe_validation(errors: list[dict]) -> tuple[str, str | None, str]:
    """A pydantic validation failure as (message, param, code): unknown fields first, else the error of the
    union member that came closest."""
    unknown = [_param(tuple(e["loc"])) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        names = ", ".join(f"`{u}`" for u in unknown)
        return f"unknown field{'s' if len(unknown) > 1 else ''} {names}", unknown[0], "unknown_field"
    # a union reports one error per member: the deepest location is the member that came closest
    err = max(reversed(errors), key=lambda e: len(e.get("loc", ())))
    kind, loc = err.get("type"), tuple(err.get("loc", ()))
    cause = (err.get("ctx") or {}).get("error")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
    if isinstance(cause, FieldError):
        return str(cause), _param(loc, cause.field), cause.code
    param = _param(loc)
    if param is None:
        message = "a JSON object body is required" if kind == "missing" else f"invalid body: {err.get('msg')}"
        return message, None, "invalid_body"
    if kind == "missing":
        return f"`{param}` is required", param, "missing_field"
    return f"invalid value for `{param}`: {err.get('msg')}", param, "invalid_value"


def validation_response(exc: RequestValidationError) -> JSONResponse:
    return error_response(400, *describe_validation(exc.errors()))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(FieldError)
    async def _field_error(_: Request, exc: FieldError) -> JSONResponse:
        return error_response(400, str(exc), exc.field, exc.code)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.retry_after)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = error_response(exc.status_code, str(exc.detail), None, code)
        response.headers.update(exc.headers or {})  # a 405's `allow` (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error", None, "internal_error")
