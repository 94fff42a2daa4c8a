"""Request bodies in Fireworks' schema (a superset of OpenAI's), ranges as its docstrings give them
(OpenAI's where Fireworks is silent).

Every field of OpenAI's and Fireworks' request schemas is accepted; only fields in neither are
"unknown". Fields that Ember does not implement (reasoning controls, audio, web search, ...) are
accepted only at values that change nothing (null, false, text only); any other value is a 400 saying
it is not supported, never silently ignored. Types are strict:
`"max_tokens": "5"` is a mistake, not a 5. Strings must be Unicode text and the body at most
MAX_DEPTH deep (ember.serving.client_json).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ember.serving.client_json import check_json, loads
from ember.serving.errors import FieldError

# field -> the values at which it is harmless today; every other non-null value is refused for now
NOT_YET_SUPPORTED: dict[str, tuple] = {
    "reasoning_effort": ("none", False), "reasoning_history": (), "thinking": ({"type": "disabled"},),
}
CHAT_NOT_YET_SUPPORTED: dict[str, tuple] = {
    **NOT_YET_SUPPORTED,
    # OpenAI's: stored completions, audio in and out, web search, moderation, output length control
    "store": (False,), "modalities": (["text"],), "audio": (), "web_search_options": (), "moderation": (),
    "verbosity": ("medium",),
}
# OpenAI's legacy completions: several samples ranked server-side, text inserted before a suffix
COMPLETION_NOT_YET_SUPPORTED: dict[str, tuple] = {**NOT_YET_SUPPORTED, "images": ([],), "best_of": (1,),
                                                  "suffix": ("",)}
MAX_LOGPROBS = 5  # alternatives per position of the legacy integer `logprobs` (Fireworks' and OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for `top_logprobs`
MIN_REPETITION_PENALTY = 0.01  # below it seen tokens' logits grow past anything meaningful, toward float32 inf
# Bounds on what one request may ask for, far above real use, so that no request costs unbounded work
MAX_MESSAGES = 10_000  # OpenAI publishes none; each one is rendered and tokenized
MAX_TOOLS = 128  # OpenAI's limit, for tools and the legacy functions alike
MAX_TOOL_CALLS = 128  # calls in one replayed assistant message (OpenAI's limit)
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_TOTAL_TOKENS = 128 * 8192  # n x max_tokens: all samples of one request together


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
    not_yet: ClassVar[dict[str, tuple]] = {"include_obfuscation": (False,)}  # random padding on chunks

    include_usage: bool | None = False


class PromptCacheOptions(_Strict):
    """OpenAI's: the prefix cache is automatic here (implicit); explicit breakpoints are not supported."""

    not_yet: ClassVar[dict[str, tuple]] = {"mode": ("implicit",)}

    ttl: Literal["30m"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Prediction(_Strict):
    """OpenAI's predicted output: text the answer is expected to largely repeat (a file being edited, say).
    It only speeds generation up (speculative decoding); `type` may be left out (Fireworks)."""

    type: Literal["content"] = "content"
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class CalledFunction(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # JSON text (OpenAI) or an object (Fireworks)

    @model_validator(mode="after")
    def _arguments_object(self) -> CalledFunction:
        """A replayed call's arguments go into the prompt as they are: they must be a JSON object."""
        text = self.arguments
        if isinstance(text, str) and text.strip() and not isinstance(loads(text, "arguments"), dict):
            raise FieldError("arguments", "a call's arguments must be a JSON object")
        return self

    def arguments_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


class ToolCallMessage(_Strict):
    """A call of an earlier assistant turn, sent back with the conversation."""

    not_yet: ClassVar[dict[str, tuple]] = {"custom": ()}  # OpenAI's free-form custom tools

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = None  # left in by clients that replay streamed deltas


# message fields a template never sees: calls are rewritten below; refusals and annotations describe a
# past answer (SDKs replay them with `message.model_dump()`), they are not part of the conversation
_NOT_RENDERED = {"tool_calls", "function_call", "refusal", "annotations"}


class ChatMessage(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = {"audio": ()}  # an earlier audio answer, by id

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[list[ToolCallMessage], Field(max_length=MAX_TOOL_CALLS)] | None = None
    function_call: CalledFunction | None = None  # the legacy form of one tool call
    reasoning_content: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None

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
        """The plain dict a chat template expects: content parts joined into one string, calls with
        their arguments as JSON text, legacy `function` messages as `tool` ones."""
        content = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content
        message = {**self.model_dump(exclude_none=True, exclude=_NOT_RENDERED),
                   "content": content or "", "role": "tool" if self.role == "function" else self.role}
        calls = list(self.tool_calls or []) + \
            ([ToolCallMessage(function=self.function_call)] if self.function_call else [])
        if calls:
            message["tool_calls"] = [{"id": c.id or f"call_{i}", "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments_text()}}
                                     for i, c in enumerate(calls)]
        return message


class JsonSchemaFormat(_Strict):
    """OpenAI's `json_schema` object; Fireworks also takes the schema itself in its place."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | str | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "grammar"]
    json_schema: dict[str, Any] | str | None = None
    schema_: dict[str, Any] | str | None = Field(None, alias="schema")  # Fireworks' json_object form
    grammar: str | None = None  # GBNF, for type "grammar"

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("json_schema", "type json_schema needs a `json_schema` object with a `schema`")
        if self.type == "grammar" and not self.grammar:
            raise FieldError("grammar", "type grammar needs a GBNF `grammar`")
        spec = self.json_schema
        if isinstance(spec, dict) and ("schema" in spec or "name" in spec):  # OpenAI's {name, schema, strict}
            try:
                form = JsonSchemaFormat.model_validate(spec)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(x) for x in error["loc"])
                raise FieldError("json_schema", f"invalid json_schema ({where}): {error['msg']}") from exc
            if form.schema_ is None:
                raise FieldError("json_schema", "json_schema needs a `schema`")
            self.json_schema = form.schema_
        return self

    def schema_source(self) -> dict[str, Any] | str | None:
        """The JSON schema asked for, however it was spelt: json_schema.schema (OpenAI), json_schema
        as the schema itself, or schema (Fireworks' json_object form); None for any object."""
        return self.json_schema if self.json_schema is not None else self.schema_


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object
    strict: bool | None = None


class ToolDef(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = {"custom": ()}  # OpenAI's free-form custom tools

    type: Literal["function"]
    function: FunctionDef


class FunctionChoiceName(_Strict):
    name: str


class FunctionChoice(_Strict):
    """`{"type": "function", "function": {"name": ...}}` (OpenAI) or `{"type": "function", "name": ...}`."""

    # OpenAI's choice of a subset of the tools, and of a custom tool
    not_yet: ClassVar[dict[str, tuple]] = {"allowed_tools": (), "custom": ()}

    type: Literal["function"]
    function: FunctionChoiceName | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _named(self) -> FunctionChoice:
        if (self.function.name if self.function else self.name) is None:
            raise FieldError("function", "name the function to call: {\"function\": {\"name\": ...}}")
        return self

    @property
    def function_name(self) -> str:
        return self.function.name if self.function else self.name  # type: ignore[return-value]


class SamplingFields(_Strict):
    """The sampling fields every generating endpoint takes (chat, completions, responses)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    typical_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None


class GenerationRequest(SamplingFields):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 only to score an echoed prompt
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None  # token id -> bias
    mirostat_target: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # tau, in bits
    mirostat_lr: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    # true: OpenAI's format with `top_logprobs` alternatives; an int: the legacy format with that many
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    echo_last: Annotated[int, Field(ge=0)] | None = None
    raw_output: bool | None = None
    return_token_ids: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    context_length_exceeded_behavior: Literal["error", "truncate"] = "truncate"
    # accepted and kept; they label the request and do not change what is generated
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None  # or the x-prompt-cache-isolation-key header
    prompt_cache_max_len: Annotated[int, Field(ge=0)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    perf_metrics_in_response: bool | None = None
    response_format: ResponseFormat | None = None
    # predicted outputs: OpenAI's object (or Fireworks' plain string), or Fireworks' `speculation` as text or
    # token ids; `speculation: false` (Ember's) turns off prompt-lookup drafts for this request
    prediction: Prediction | str | None = None
    speculation: str | list[int] | bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _sane_json(cls, data: Any) -> Any:
        check_json(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise FieldError("max_completion_tokens",
                             "give max_tokens or its alias max_completion_tokens, not both")
        if self.requested_max_tokens == 0 and not self.wants_echo:
            raise FieldError("max_tokens" if self.max_tokens is not None else "max_completion_tokens",
                             "max_tokens may be 0 only with echo or echo_last (to score the prompt)")
        if self.n * (self.requested_max_tokens or 0) > MAX_TOTAL_TOKENS:
            raise FieldError("max_tokens" if self.max_tokens is not None else "max_completion_tokens",
                             f"n x max_tokens is {self.n * self.requested_max_tokens}; one request may ask "
                             f"for at most {MAX_TOTAL_TOKENS} tokens in all (lower n or max_tokens)")
        if self.prediction is not None and isinstance(self.speculation, str | list):
            raise FieldError("speculation", "give the expected output once: as `prediction` (OpenAI's) or as "
                                            "`speculation` (Fireworks'), not both; only `speculation: false` "
                                            "goes with a prediction")
        if self.top_logprobs and self.logprobs in (None, False):
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        # a token id has at most 10 digits; int() refuses past 4300 (CPython's guard against quadratic parsing)
        if any(not (k.isascii() and k.isdigit() and len(k) <= 10) for k in self.logit_bias or {}):
            raise FieldError("logit_bias", "logit_bias keys must be token ids (decimal integers as strings)")
        return self

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def predicted(self) -> str | list[int] | None:
        """The output the client expects, as text or token ids, whichever field gave it."""
        if self.prediction is not None:
            return self.prediction if isinstance(self.prediction, str) else self.prediction.text
        return None if isinstance(self.speculation, bool) else self.speculation

    @property
    def speculate(self) -> bool:
        """False when the client turned prompt-lookup speculation off (`speculation: false`)."""
        return self.speculation is not False

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

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    # drop the oldest non-system messages until the rendered prompt has at most this many tokens
    prompt_truncate_len: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required", "any"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDef], Field(max_length=MAX_TOOLS)] | None = None  # legacy tools
    function_call: Literal["none", "auto"] | FunctionChoiceName | None = None  # legacy tool_choice
    prompt_cache_options: PromptCacheOptions | None = None
    # special-token text in messages stays text (None: the server's --safe-tokenization, on by default)
    safe_tokenization: bool | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        if self.tools is not None and self.functions is not None:
            raise FieldError("functions", "give tools or the legacy functions, not both")
        if self.tool_choice is not None and self.function_call is not None:
            raise FieldError("function_call", "give tool_choice or the legacy function_call, not both")
        names = [f.name for f in self.function_defs]
        if len(set(names)) < len(names):
            raise FieldError("tools" if self.tools is not None else "functions", "function names must be unique")
        choice, forced = self.tool_mode, self.forced_function
        param = "tool_choice" if self.function_call is None else "function_call"
        if choice not in ("none", "auto") and not names:
            raise FieldError(param, f"tool_choice `{forced or choice}` needs tools")
        if forced is not None and forced not in names:
            raise FieldError(param, f"`{forced}` is not among the tools: {names}")
        if choice != "none" and self.response_format is not None and self.response_format.type != "text":
            raise FieldError("response_format", "response_format cannot be combined with tool calls; "
                                                "use tool_choice: none")
        return self

    @property
    def function_defs(self) -> list[FunctionDef]:
        return [t.function for t in self.tools] if self.tools is not None else list(self.functions or [])

    @property
    def _choice(self) -> str | FunctionChoice | FunctionChoiceName | None:
        return self.tool_choice if self.tool_choice is not None else self.function_call

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required", or "function" (one call of `forced_function`)."""
        choice = self._choice
        if isinstance(choice, FunctionChoice | FunctionChoiceName):
            return "function"
        if choice is None:
            return "auto" if self.function_defs else "none"
        return "required" if choice == "any" else choice

    @property
    def forced_function(self) -> str | None:
        choice = self._choice
        if isinstance(choice, FunctionChoice):
            return choice.function_name
        return choice.name if isinstance(choice, FunctionChoiceName) else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    not_yet: ClassVar[dict[str, tuple]] = COMPLETION_NOT_YET_SUPPORTED

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
