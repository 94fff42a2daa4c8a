"""HTTP server configuration: one dataclass, filled from CLI flags or EMBER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    config: str | None = None  # TOML file of the models to serve: [models.<name>] tables (see README)
    served_model_name: str | None = None  # default: smollm2-135m-instruct, or the model file's stem
    generation_config: str | None = None  # JSON file of sampling defaults (overrides the model's own)
    log_level: str = "warning"
    # admission: requests of one model past its running batch that may wait for it; more get a 429
    max_waiting_requests: int = 256
    # chat: special-token text in message content is encoded as plain text, never as control tokens
    safe_tokenization: bool = True
    # access (ember/api/guard.py): keys, comma-separated, or a file of keys / `sha256:<hex>` lines
    api_key: str | None = None
    api_key_file: str | None = None
    allowed_hosts: str | None = None  # Host names answered; default: loopback names when bound to loopback
    cors_allow_origins: str | None = None  # comma-separated origins browsers may call from; off by default
    # limits on what a client may hold: body size, slow senders, connections, shutdown
    max_request_bytes: int = 32 * 2**20
    header_timeout: float = 10.0  # seconds for a request's headers to arrive, else the connection closes
    body_timeout: float = 60.0  # seconds for its body, else 408
    timeout_keep_alive: int = 5  # idle keep-alive connections close after this many seconds
    max_connections: int | None = None  # open connections + requests before uvicorn answers 503
    drain_timeout: float = 30.0  # SIGTERM: running requests get this long to finish
    metrics: bool = True  # off: no /metrics and nothing observed for it
    # batch jobs (ember/api/batch): the largest upload (files, datasets), the lines of one job, and the lines a
    # job keeps in flight (one fewer per live request)
    max_upload_bytes: int = 200 * 2**20
    batch_max_lines: int = 50_000
    batch_concurrency: int = 32
