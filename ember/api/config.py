"""HTTP server configuration: one dataclass, filled from CLI flags or EMBER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: smollm2-135m-instruct, or the model file's stem
    generation_config: str | None = None  # JSON file of sampling defaults (overrides the model's own)
    log_level: str = "warning"
    # admission: requests of one model past its running batch that may wait for it; more get a 429
    max_waiting_requests: int = 256
    # chat: special-token text in message content is encoded as plain text, never as control tokens
    safe_tokenization: bool = True
