"""Client mistakes found while validating or translating a request; the API layer turns them into 4xx
envelopes."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot succeed as sent: `param` names the offending field for the client; with
    `retry_after` (seconds) it may succeed later (a 429 with a `retry-after` header)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.retry_after = retry_after


class FieldError(ValueError):
    """A validation failure about one field, relative to the object it was raised in (pydantic adds
    the location of that object)."""

    code = "invalid_value"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
