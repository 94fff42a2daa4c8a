"""Client mistakes found while translating a request; the API layer turns them into 4xx envelopes."""

from __future__ import annotations


class RequestError(Exception):
    """A request that can never succeed as sent: `param` names the offending field for the client."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
