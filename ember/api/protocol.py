"""Request bodies in Fireworks' schema (a superset of OpenAI's), ranges as its docstrings give them
(OpenAI's where Fireworks is silent).

Unknown fields are rejected. Fields of the schema that Ember does not implement yet (tools,
structured outputs, reasoning controls, ...) are accepted only at values that change nothing;
any other value is a 400 naming the field, never silently ignored. Types are strict:
`"max_tokens": "5"` is a mistake, not a 5.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# field -> the values at which it is harmless today; every other non-null value is refused for now
NOT_YET_SUPPORTED: dict[str, tuple] = {
    "response_format": ({"type": "text"},), "prediction": (), "speculation": (),
    "reasoning_effort": ("none", False), "reasoning_history": (), "thinking": ({"type": "disabled"},),
}
CHAT_NOT_YET_SUPPORTED: dict[str, tuple] = {
    **NOT_YET_SUPPORTED, "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none", "auto"), "safe_tokenization": (False,),
}
COMPLETION_NOT_YET_SUPPORTED: dict[str, tuple] = {**NOT_YET_SUPPORTED, "images": ([],)}
MAX_LOGPROBS = 5  # alternatives per position a client may ask for (Fireworks' limit)


class FieldError(ValueError):
    """A validation failure about one field, relative to the object it was raised in."""

    code = "invalid_value"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotYetSupported(FieldError):
    code = "unsupported_parameter"

    def __init__(self, field: str, what: str | None = None) -> None:
        super().__init__(field, f"{what or f'`{field}`'} is not supported by this server yet")


def _harmless(value: Any, neutral: tuple) -> bool:
    # `0 == False` in Python; on the wire they differ (`logprobs: 0` asks for the legacy format)
    return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                for v in neutral)


class _Strict(BaseModel):
    """extra="forbid", strict types, and the not-yet-supported gate for the fields in `not_yet`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    not_yet: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def _gate_not_yet(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.not_yet:
            return data
        for key, value in data.items():
            if key in cls.not_yet and not _harmless(value, cls.not_yet[key]):
                raise NotYetSupported(key)
        return {k: v for k, v in data.items() if k not in cls.not_yet}


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = {"tool_calls": ([],)}

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        for i, part in enumerate(parts if isinstance(parts, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise NotYetSupported(f"content[{i}].type", f"`{kind}` content")
        return data

    def for_template(self) -> dict:
        """The plain dict a chat template expects, content parts joined into one string."""
        content = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class GenerationRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 only to score an echoed prompt
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    typical_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None  # 0 would divide by zero
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id -> bias
    mirostat_target: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # tau, in bits
    mirostat_lr: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    ignore_eos: bool = False
    # true: OpenAI's format with `top_logprobs` alternatives; an int: the legacy format with that many
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    echo_last: Annotated[int, Field(ge=0)] | None = None
    raw_output: bool | None = None
    return_token_ids: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    context_length_exceeded_behavior: Literal["error", "truncate"] = "truncate"
    # accepted and kept; they label the request and do not change what is generated
    user: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    perf_metrics_in_response: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise FieldError("max_completion_tokens",
                             "give max_tokens or its alias max_completion_tokens, not both")
        if self.requested_max_tokens == 0 and not self.wants_echo:
            raise FieldError("max_tokens" if self.max_tokens is not None else "max_completion_tokens",
                             "max_tokens may be 0 only with echo or echo_last (to score the prompt)")
        if self.top_logprobs and self.logprobs in (None, False):
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if any(not (k.isascii() and k.isdigit()) for k in self.logit_bias or {}):
            raise FieldError("logit_bias", "logit_bias keys must be token ids (decimal integers as strings)")
        return self

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per position, or None when no logprobs were asked for; top_logprobs, when
        given, overrides the legacy integer (as Fireworks documents)."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.top_logprobs is not None or self.logprobs is True:
            return self.top_logprobs or 0
        return self.logprobs

    @property
    def legacy_logprobs(self) -> bool:
        """`logprobs: <int>` asks for the legacy {tokens, token_logprobs, ...} format."""
        return self.logprobs is not None and not isinstance(self.logprobs, bool)

    @property
    def wants_echo(self) -> bool:
        return bool(self.echo or self.echo_last)

    def echo_count(self, prompt_len: int) -> int:
        """How many trailing prompt tokens come back ahead of the completion."""
        return prompt_len if self.echo else min(self.echo_last or 0, prompt_len)


class ChatCompletionRequest(GenerationRequest):
    not_yet: ClassVar[dict[str, tuple]] = CHAT_NOT_YET_SUPPORTED

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # drop the oldest non-system messages until the rendered prompt has at most this many tokens
    prompt_truncate_len: Annotated[int, Field(ge=1)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    not_yet: ClassVar[dict[str, tuple]] = COMPLETION_NOT_YET_SUPPORTED

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
