"""Request and response bodies (Fireworks + OpenAI shapes). Requests reject unknown fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields of Fireworks' schema that Ember does not implement yet: named in a clear 400 rather than
# reported as unknown, and never silently ignored.
NOT_YET_SUPPORTED = frozenset({
    "echo", "echo_last", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "min_p", "typical_p", "mirostat_lr", "mirostat_target", "raw_output",
    "return_token_ids", "prompt_truncate_len", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "prediction", "speculation", "reasoning_effort",
    "reasoning_history", "thinking", "images",
})


class NotYetSupported(ValueError):
    def __init__(self, field: str) -> None:
        super().__init__(f"`{field}` is not supported by this server yet")
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


Stop = Annotated[str, Field()] | Annotated[list[str], Field(max_length=4)]


class _GenerationRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: Stop | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    context_length_exceeded_behavior: Literal["error", "truncate"] = "truncate"
    # accepted and kept for later use (usage records, caching hints); they do not change generation
    user: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    perf_metrics_in_response: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in NOT_YET_SUPPORTED and data[key] not in (None, False):
                    raise NotYetSupported(key)
        return {k: v for k, v in data.items() if k not in NOT_YET_SUPPORTED} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_max(self) -> _GenerationRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | \
        Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
