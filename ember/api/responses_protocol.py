"""The Responses API's request body (`POST /v1/responses`), in OpenAI's schema with Fireworks' sampling
extras, strict as the chat protocol is: every field `responses.create` sends is accepted, a value Ember
cannot honour is a 400 saying so, and a field in neither API is unknown."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from ember.api.protocol import MAX_TOOLS, FunctionName, NotYetSupported, SamplingFields, _Strict
from ember.serving.errors import FieldError

MAX_INPUT_ITEMS = 10_000
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
# tools OpenAI runs on its own servers: Ember has nothing to run them with
SERVER_TOOLS = ("file_search", "web_search", "web_search_preview", "computer_use_preview", "mcp",
                "code_interpreter", "image_generation", "local_shell", "shell", "apply_patch", "custom")


class ContentPart(_Strict):
    """Text in a message: `input_text` from the client, `output_text` replayed from an earlier answer."""

    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # on replayed output text; nothing to render
    logprobs: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind in ("input_image", "input_file", "input_audio", "refusal"):
            raise NotYetSupported("type", f"`{kind}` content")
        return data


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_INPUT_ITEMS)]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(value: Any) -> str:
    """A message may leave out its type (the SDK's EasyInputMessage)."""
    return (value.get("type") or "message") if isinstance(value, dict) else getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object
    strict: bool | None = None


class FunctionToolChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """`text.format`: plain text, any JSON object, or JSON matching `schema` (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise FieldError("schema", "format json_schema needs a `schema`")
        return self


class TextConfig(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = {"verbosity": ("medium",)}

    format: TextFormat | None = None


class ResponsesRequest(SamplingFields):  # temperature, top_p, and Fireworks' extras as chat takes them
    # OpenAI's fields that change nothing at these values, and are not supported at any other
    not_yet: ClassVar[dict[str, tuple]] = {
        "background": (False,), "conversation": (), "prompt": (), "context_management": (),
        "background_options": (), "image": (), "access_programs": (), "moderation": (), "include": ([],),
        "top_logprobs": (0,), "stream_options": (), "prompt_cache_options": (),
    }

    model: str
    input: str | Annotated[list[InputItem], Field(max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    ignore_eos: bool = False  # Fireworks' extra, as chat takes it
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = None
    reasoning: dict[str, Any] | None = None  # accepted: no reasoning model is served yet
    # accepted and kept; they label the request and do not change what is generated
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    perf_metrics_in_response: bool | None = None

    @model_validator(mode="after")
    def _function_tools_only(self) -> ResponsesRequest:
        """Function tools are parsed strictly; tools that run on OpenAI's servers are refused by name."""
        for i, tool in enumerate(self.tools or []):
            kind = tool.get("type")
            if kind in SERVER_TOOLS:
                raise NotYetSupported(f"tools[{i}].type", f"`{kind}` (a tool OpenAI runs on its own servers; "
                                                          "Ember runs function tools, whose calls come back to you)")
            if kind != "function":
                raise FieldError(f"tools[{i}].type", f"unknown tool type {kind!r}")
            try:
                FunctionTool.model_validate(tool)
            except ValidationError as exc:
                error = exc.errors()[0]
                raise FieldError(".".join([f"tools[{i}]", *map(str, error["loc"])]), error["msg"]) from exc
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return [FunctionTool.model_validate(t) for t in self.tools or []]
