"""What every request passes before a route, as one ASGI middleware: the Host check, the API key, the
drain, and the body-size limit. Pure ASGI (not a Starlette BaseHTTPMiddleware) so that an oversized body
is refused before it is read whole and streamed answers pass through untouched.

- Host: a server bound to a loopback address answers only requests whose `Host` is a loopback name, so
  a web page in a local browser cannot reach it through DNS rebinding; `--allowed-hosts` widens that.
- API key: with `--api-key` / `EMBER_API_KEY` (several, comma-separated) or `--api-key-file` (one key, or
  `sha256:<hex digest>` of a key, a line), every route but `/health` and the dashboard's page (not its
  data) needs `Authorization: Bearer <key>`
  (what the OpenAI and Fireworks SDKs send) or `x-api-key: <key>`; else 401 as OpenAI answers it.
- Drain: after SIGTERM new requests get a 503 with `retry-after` while running ones finish.
- Overflow: when every model's running batch and waiting line are full, a generation request gets its 429
  before its body is even read (a burst's overflow costs the server almost nothing).
- Body: a `content-length` over `--max-request-bytes` is a 413 at once; a body sent without one is read
  up to the limit and refused as soon as it passes it; a body that trickles in slower than
  `--body-timeout` seconds is a 408.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from ember.api.batch.inprocess import batch_job_of
from ember.api.errors import error_body, error_type
from ember.api.records import record

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# answered without a key: liveness probes, and the dashboard's page and script (they hold no data; the page
# asks for the key and sends it with its requests for /v1/usage)
OPEN_PATHS = frozenset({"/health", "/dashboard"})
OPEN_PREFIXES = ("/dashboard/vendor/", "/downloads/", "/uploads/")  # (those URLs are signed: ember.api.datasets)
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # the routes behind the models' admission
UPLOAD_PATHS = ("/v1/files", ":upload")  # POSTs of files: --max-upload-bytes, not --max-request-bytes
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
MODEL_PARSE_LIMIT = 1 << 20  # bytes of a body parsed again to name its model in a usage row


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_api_keys(keys: str | None, key_file: str | None) -> list[bytes]:
    """SHA-256 digests of the accepted keys: a plain key is hashed here, a file's `sha256:<hex>` line is
    taken as is, so a key file need not hold the keys themselves."""
    digests = [hashlib.sha256(k.strip().encode()).digest() for k in (keys or "").split(",") if k.strip()]
    for line in Path(key_file).read_text().splitlines() if key_file else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            digest = bytes.fromhex(line.removeprefix("sha256:"))
            if len(digest) != 32:
                raise ValueError(f"{key_file}: {line!r} is not a SHA-256 digest")
            digests.append(digest)
        else:
            digests.append(hashlib.sha256(line.encode()).digest())
    return digests


@dataclass
class GuardConfig:
    api_keys: list[bytes] = field(default_factory=list)  # SHA-256 digests; empty = no key needed
    allowed_hosts: frozenset[str] | None = None  # None = any Host
    max_request_bytes: int = 32 * 2**20
    body_timeout: float = 60.0
    max_upload_bytes: int = 200 * 2**20  # the bodies of file uploads (UPLOAD_PATHS)

    @classmethod
    def build(cls, host: str, allowed_hosts: str | None, api_key: str | None, api_key_file: str | None,
              max_request_bytes: int, body_timeout: float, max_upload_bytes: int) -> GuardConfig:
        names: frozenset[str] | None
        if allowed_hosts:
            names = None if allowed_hosts.strip() == "*" else frozenset(
                h.strip().lower() for h in allowed_hosts.split(",") if h.strip())
        else:
            names = LOOPBACK_NAMES if _is_loopback(host) else None
        return cls(load_api_keys(api_key, api_key_file), names, max_request_bytes, body_timeout, max_upload_bytes)


def _host_name(value: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "[::1]", "a.b:80" -> "a.b")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _reply(send: Send, status: int, message: str, code: str,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message, None, code, error_type(status))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class Guard:
    """The middleware; `state.draining` (the app's state) is set by the server on SIGTERM."""

    def __init__(self, app: ASGIApp, config: GuardConfig, state: object) -> None:
        self.app = app
        self.config = config
        self.state = state

    def _all_models_full(self) -> bool:
        """Whether no served model could admit one more request: then a burst's overflow is refused before
        its body is read and validated (the route's own admission stays the exact check per model)."""
        registry = getattr(self.state, "registry", None)
        models = registry.generators() if registry is not None else []
        limit_extra = self.state.config.max_waiting_requests
        return bool(models) and all(m.admission.active >= m.max_num_seqs + limit_extra for m in models)

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        key = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        digest = hashlib.sha256(key).digest()
        # compare with every key, so the time taken says nothing about which one nearly matched
        return bool(key) and sum(hmac.compare_digest(digest, d) for d in self.config.api_keys) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["started"] = time.perf_counter()  # (request.state.started: latencies)
        headers = dict(scope["headers"])
        hosts = self.config.allowed_hosts
        # a batch job's line (a scope no network client can make): authorised when the job was created
        internal = batch_job_of(scope) is not None
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if hosts is not None and not internal and host not in hosts:
            await _reply(send, 400, "this server answers only requests addressed to "
                         f"{', '.join(sorted(hosts))} (see --allowed-hosts)", "invalid_host")
            return
        path = scope["path"]
        keyless = internal or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or scope["method"] == "OPTIONS"
        if self.config.api_keys and not keyless and not self._key_ok(headers):
            await _reply(send, 401, "Incorrect API key provided: pass it as `Authorization: Bearer <key>`",
                         "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        if getattr(self.state, "draining", False):
            await _reply(send, 503, "the server is shutting down", "server_draining", [(b"retry-after", b"5")])
            return
        if scope["method"] == "POST" and path.endswith(GENERATION_PATHS) and self._all_models_full():
            await _reply(send, 429, "every model already has its running batch and waiting line full; retry later",
                         "too_many_requests", [(b"retry-after", b"1")])
            return
        declared = headers.get(b"content-length")
        upload = (scope["method"] == "POST" and path.endswith(UPLOAD_PATHS)) or path.startswith("/uploads/")
        limit = self.config.max_upload_bytes if upload else self.config.max_request_bytes
        flag = "--max-upload-bytes" if upload else "--max-request-bytes"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"the request body has {int(declared)} bytes; this server takes at most "
                         f"{limit} ({flag})", "request_too_large")
            return
        try:
            body, receive = await self._bounded_body(receive, limit)
        except _BodyTooLarge:
            await _reply(send, 413, f"the request body exceeds {limit} bytes ({flag})",
                         "request_too_large")
            return
        except TimeoutError:
            await _reply(send, 408, f"the request body did not arrive within {self.config.body_timeout:g} s",
                         "request_timeout")
            return
        status: list[int] = []

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:  # (the app's 500 handler answers it outside this middleware)
            status.append(500)
            raise
        finally:
            # every /v1 request leaves a usage row: a generation's route writes its own; refusals (the dashboard
            # shows errors) and the other routes get theirs here
            if status and "/v1/" in path and not scope.get("state", {}).get("recorded"):
                code = status[0]
                record(Request(scope), code, model=_named_model(body),
                       error_type=error_type(code) if code >= 400 else None)

    async def _bounded_body(self, receive: Receive, limit: int) -> tuple[bytes, Receive]:
        """Read the whole body (at most `limit` bytes, within the body timeout); returns it and a receive for
        the app that replays it, then passes the connection's later messages (disconnects) through."""
        chunks, size = [], 0
        async with asyncio.timeout(self.config.body_timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return b"", _replay([message], receive)
                size += len(message.get("body", b""))
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        body = b"".join(chunks)
        return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _named_model(body: bytes) -> str:
    """The `model` a JSON body names, for the usage row of a request no route recorded ("" when there is
    none, or the body is larger than is worth parsing again)."""
    if not 0 < len(body) <= MODEL_PARSE_LIMIT:
        return ""
    try:
        named = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, or nested too deep
        return ""
    return named[:256] if isinstance(named, str) else ""


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()
    return replay
