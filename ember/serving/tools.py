"""Tool calling for chat templates that know no tools (SmolLM2's among them).

The tools are described in the system prompt, and the model writes each call as a Hermes-style block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A grammar makes every call valid by construction: a listed name and arguments that match that
function's parameters schema. With `tool_choice: auto` the answer is either text (which then cannot
start with "<") or calls; `required` and a named function allow calls only. Earlier calls and tool
results are written back into the prompt in the same format, so multi-turn conversations render.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ember.structured.backend import GrammarSpec
from ember.structured.schema import close_objects, rebase_refs

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_ARGS_KEY = ', "arguments": '
_END = "}" + CLOSE
MAX_PARALLEL_CALLS = 8
# the exact JSON spelling of a call (no free whitespace), so the arguments text is the model's own
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # JSON schema of the arguments object
    description: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def format_call(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is already JSON text."""
    return f'{OPEN}{{"name": {json.dumps(name)}{_ARGS_KEY}{arguments or "{}"}}}{CLOSE}'


def system_prompt(tools: list[Tool]) -> str:
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description or "",
                                    "parameters": t.parameters}) for t in tools)
    return ("You can call functions. These are the functions, with JSON schemas of their arguments:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call functions, reply with nothing but one block per call, like this:\n"
            f'{format_call("<function name>", "<arguments as a JSON object>")}\n'
            "Otherwise reply in plain text.")


def template_speaks_hermes(template: str) -> bool:
    """A chat template that renders tools and calls itself, in the block format parsed here (Qwen's,
    Hermes')."""
    return "<tool_call>" in template and "tools" in template


def prepare_messages(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """Messages a template without tool support can render: past calls as blocks in the assistant's
    content, tool results as <tool_response> blocks from the user, the tool list in the system prompt."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            content = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        section = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _call_schema(tool: Tool, at: str) -> dict:
    """The schema of one call, to sit at `at` (a URI fragment) of the grammar's schema: the arguments'
    own refs (`#/$defs/...`, as pydantic writes them) follow them to `at/properties/arguments`."""
    arguments = rebase_refs(close_objects(tool.parameters or {"type": "object"}), f"{at}/properties/arguments")
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_grammar(tools: list[Tool], choice: str, parallel: bool, function: str | None = None,
                 max_calls: int | None = None) -> GrammarSpec:
    """`choice` is "auto", "required" or "function": one call of `function` (once, as OpenAI does).
    Parallel calls number at most MAX_PARALLEL_CALLS, or `max_calls` (the Responses API's max_tool_calls)."""
    named = choice == "function"
    chosen = [t for t in tools if t.name == function] if named else tools
    if len(chosen) == 1:
        schema = _call_schema(chosen[0], "#")
    else:
        schema = {"anyOf": [_call_schema(t, f"#/anyOf/{i}") for i, t in enumerate(chosen)]}
    schema["x-guidance"] = _JSON_STYLE
    most = min(MAX_PARALLEL_CALLS, max_calls or MAX_PARALLEL_CALLS) if parallel and not named else 1
    calls = f'call ("\\n" call){{0,{most - 1}}}' if most > 1 else "call"
    start = "TEXT | calls" if choice == "auto" else "calls"
    return GrammarSpec("lark", f"start: {start}\ncalls: {calls}\n"
                               f'call: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n'
                               "TEXT: /[^<](.|\\n)*/\n")


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first carries id and name, later ones argument text only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)


@dataclass
class ToolCallParser:
    """Splits a choice's text, as it streams, into content and tool-call deltas.

    The grammar guarantees the shape: an answer starting with "<" is calls only, anything else is
    content only. Argument text is passed on as it comes, holding back just what might be the call's
    closing `}` and tag, so the fragments concatenate to exactly the non-streamed arguments.
    """

    calls: list[ToolCall] = field(default_factory=list)
    _mode: str | None = None  # "content" or "calls", decided by the first character
    _buffer: str = ""
    _state: str = "open"  # within calls: "open" (expecting a block), "head" (before the arguments), "args"

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode is None and text:
            self._mode = "calls" if text.startswith("<") else "content"
        if self._mode != "calls":
            return text, []
        self._buffer += text
        deltas: list[ToolCallDelta] = []
        while True:
            delta = self._advance()
            if delta is None:
                return "", deltas
            if delta.id is not None or delta.arguments:
                deltas.append(delta)

    def _advance(self) -> ToolCallDelta | None:
        """One step of the state machine over the buffer; None when it needs more text."""
        buf = self._buffer
        if self._state == "open":
            start = buf.find(OPEN)
            if start < 0:
                return None
            self._buffer, self._state = buf[start + len(OPEN):], "head"
            return ToolCallDelta(len(self.calls))  # empty: nothing to send yet
        if self._state == "head":
            at = buf.find(_ARGS_KEY)
            if at < 0:
                return None
            name = json.loads(buf[:at] + "}")["name"]
            call = ToolCall(new_call_id(), name)
            self.calls.append(call)
            self._buffer, self._state = buf[at + len(_ARGS_KEY):], "args"
            return ToolCallDelta(len(self.calls) - 1, call.id, call.name)
        call = self.calls[-1]
        end = buf.find(_END)
        if end >= 0:
            fragment, self._buffer, self._state = buf[:end], buf[end + len(_END):], "open"
            call.complete = True
        else:
            keep = _held_back(buf, _END)
            fragment, self._buffer = buf[:len(buf) - keep], buf[len(buf) - keep:]
            if not fragment:
                return None
        call.arguments += fragment
        return ToolCallDelta(len(self.calls) - 1, arguments=fragment)

    def finish(self) -> list[ToolCallDelta]:
        """At the end of the text: arguments cut short (by max_tokens) are passed on as they are."""
        if self._mode == "calls" and self._state == "args" and self._buffer:
            fragment, self._buffer = self._buffer, ""
            self.calls[-1].arguments += fragment
            return [ToolCallDelta(len(self.calls) - 1, arguments=fragment)]
        return []

    @property
    def called(self) -> bool:
        return any(c.complete for c in self.calls)
