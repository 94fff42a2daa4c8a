"""Tokenizer, chat template and streaming detokenizer, from a GGUF file or a Hugging Face folder.

Everything runs on the Rust `tokenizers` library plus Jinja2. transformers is never imported at
runtime: importing it costs seconds and the server must start fast. A GGUF carries no
`tokenizer.json`, so we rebuild the equivalent one from llama.cpp's `tokenizer.ggml.*` metadata,
reading only the metadata section of the file (tensor data is never touched).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Encoding, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer

from ember.models.gguf_file import read_gguf_metadata

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# Building a `tokenizers.Tokenizer` from GGUF metadata
# ---------------------------------------------------------------------------------------------------------

# llama.cpp token types (llama_token_type)
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes as the models' own tokenizer.json spell them (llama.cpp keeps rewritten copies of these).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "grok-2"}
_GPT4O_PRES = {"gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"}
# Pre-types whose tokenizer.json isolates every digit before the GPT-2 byte-level split
# (llama.cpp: "\p{N}" then the GPT-2 regex; SmolLM2's tokenizer.json: Digits(individual) + ByteLevel).
_DIGIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2_PRES = {"default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion",
              "granite-docling", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "mellum",
              "a.x-4.0", "roberta-bpe", "jina-v1-en", "jina-v2-code", ""}
# llama.cpp matches whole words against the vocabulary before merging for these (HF: "ignore_merges").
_IGNORE_MERGES_PRES = _LLAMA3_PRES - {"dbrx", "smaug-bpe", "glm4", "chatglm-bpe"} | {"tekken"}
# Pre-types llama.cpp adds BOS for when the file does not say.
_ADD_BOS_PRES = _LLAMA3_PRES - {"dbrx", "smaug-bpe", "glm4", "chatglm-bpe"} | {"tekken", "chameleon"}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer the model's tokenizer.json uses, picked by llama.cpp's `tokenizer.ggml.pre`."""
    splits: tuple[str, ...] | None
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _LLAMA3_PRES:
        splits = (_LLAMA3_SPLIT,)
    elif pre in _QWEN2_PRES:
        splits = (_QWEN2_SPLIT,)
    elif pre == "qwen35":
        splits = (_QWEN35_SPLIT,)
    elif pre == "tekken":
        splits = (_TEKKEN_SPLIT,)
    elif pre in _GPT4O_PRES:
        splits = (_GPT4O_SPLIT,)
    elif pre in ("deepseek-v3", "hunyuan-dense"):
        splits = _DEEPSEEK3_SPLITS
    else:
        if pre not in _GPT2_PRES:
            logger.warning("GGUF pre-tokenizer %r is not known here; using the GPT-2 split", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def _spm_merges(tokens: list[str], scores: np.ndarray | None) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary (GGUF files of type `llama` often carry none).

    Same construction as transformers' `generate_merges`: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (best first).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores.tolist(), strict=True)) if scores is not None else None
    entries: list[tuple[str, str, float]] = []
    for token, idx in (score_of or vocab).items():
        sc = score_of[token] if score_of is not None else idx
        local = [(token[:k], token[k:], sc) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        entries.extend(local)
    entries.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=score_of is not None)
    return [(a, b) for a, b, _ in entries]


def _gguf_rust_tokenizer(meta: dict[str, Any]) -> tuple[_RustTokenizer, bool]:
    """A `tokenizers.Tokenizer` equal to the one the GGUF was converted from, and the add_bos default."""
    model_type = meta.get("tokenizer.ggml.model", "gpt2")
    pre = str(meta.get("tokenizer.ggml.pre", "default")).lower()
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types_list: list[int] = types.tolist() if types is not None else [_TT_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges_raw = meta.get("tokenizer.ggml.merges")

    if model_type == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in merges_raw] if merges_raw is not None else []
        tk = _RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                       ignore_merges=pre in _IGNORE_MERGES_PRES))
        tk.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        add_bos_default = pre in _ADD_BOS_PRES
    elif model_type == "llama":
        if merges_raw is not None:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        else:
            merges = _spm_merges(tokens, meta.get("tokenizer.ggml.scores"))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        tk = _RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                       byte_fallback=True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(steps)
        add_bos_default = True
    else:
        raise NotImplementedError(f"GGUF tokenizer model {model_type!r} is not supported (gpt2, llama are)")

    # Control (and unknown, like <unk>) tokens are specials matched whole in text; user-defined ones are
    # matched whole but are ordinary text (not skipped by skip_special_tokens), as in llama.cpp and
    # transformers.
    byte_level = model_type == "gpt2"
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types_list, strict=True)
        # In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a converter
        # mislabel; adding it would mint a new id past the model's vocabulary.
        if ty in (_TT_CONTROL, _TT_UNKNOWN) and t and (not byte_level or all(c in _BYTE_DECODER for c in t))
    ]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types_list, strict=True) if ty == _TT_USER_DEFINED and t]
    if user:
        tk.add_tokens(user)
    return tk, add_bos_default


# ---------------------------------------------------------------------------------------------------------
# Chat templates (rendered exactly like transformers' apply_chat_template)
# ---------------------------------------------------------------------------------------------------------

DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's chat template, as google/gemma-3-*-it's tokenizer_config.json has it: llama.cpp's Gemma 3 GGUFs of the
# base models carry none (a system message opens the first user turn; the assistant's role is `model`)
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
# The template of each GGUF architecture whose files may come without one
_ARCHITECTURE_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}

# Names of end-of-turn tokens (llama.cpp's end-of-generation list). One counts as a stop token only
# when the chat template actually writes it and the vocabulary has it as a special token.
_END_OF_TURN_NAMES = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "<|end_of_turn|>", "</s>",
)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _compile_template(source: str) -> Any:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes; transformers replaced it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A deep copy in plain JSON types, so the template sees (and can change) nothing of the caller's."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, np.generic):  # numpy scalars: np.bool_(False) must stay falsy
        return _plain(value.item())
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """transformers' message normalization: drop None-valued keys, alias the reasoning fields."""
    out = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _encode(backend: _RustTokenizer, text: str) -> Encoding:
    """One text through the Rust tokenizer, without the GIL: `encode_batch` releases it while it works
    (`encode` holds it: an 8 MB prompt froze every other thread, the server's event loop included)."""
    return backend.encode_batch([text], add_special_tokens=False)[0]


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> ids, chat template rendering and per-token bytes for one model."""

    def __init__(
        self,
        backend: _RustTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_templates: dict[str, str] | None,
        add_bos: bool,
        add_eos: bool = False,
        special_token_strings: dict[str, str] | None = None,
    ) -> None:
        self._tk = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self._templates = dict(chat_templates or {})
        first = next(iter(self._templates.values()), None)
        self.chat_template: str | None = self._templates.get("default") or first
        self.add_bos = add_bos and bos_token_id is not None
        self.add_eos = add_eos and bool(eos_token_ids)
        # bos_token, eos_token, unk_token, pad_token: the variables transformers hands every template
        self.special_token_strings = dict(special_token_strings or {})
        self.bos_token: str | None = self.special_token_strings.get("bos_token")
        self.eos_token: str | None = self.special_token_strings.get("eos_token")
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._added_content: dict[int, str] = {i: t.content for i, t in added.items()}
        # how control tokens are spelt in text (e.g. "<|im_start|>"): what safe tokenization neutralises
        self.special_texts: frozenset[str] = frozenset(self._added_content[i] for i in self.special_ids)
        self._plain_backend: _RustTokenizer | None = None  # made at the first safe encode (a copy)
        self._token_bytes_cache: dict[int, bytes] = {}
        self._compiled: dict[str, Any] = {}
        decoder = str(backend.decoder)
        self._byte_level = decoder.startswith("ByteLevel") or "ByteLevel(" in decoder
        model = backend.model
        self._byte_fallback = bool(getattr(model, "byte_fallback", False))
        # Byte-fallback pieces "<0x..>" decode together with their neighbours, so the detokenizer
        # must not cut a run of them.
        self.byte_fallback_ids: frozenset[int] = frozenset()
        if self._byte_fallback:
            vocab = backend.get_vocab(with_added_tokens=False)
            pieces = (f"<0x{b:02X}>" for b in range(256))
            self.byte_fallback_ids = frozenset(vocab[p] for p in pieces if p in vocab)

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a `.gguf` file, or a folder with tokenizer.json (+ tokenizer_config / generation_config)."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls._from_hf_folder(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls._from_gguf(ggufs[0])
            raise FileNotFoundError(f"{path} has no tokenizer.json (and not exactly one .gguf)")
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return cls._from_gguf(path)
        raise ValueError(f"{path} is neither a GGUF file nor a tokenizer folder")

    @classmethod
    def _from_gguf(cls, path: Path) -> Tokenizer:
        meta = read_gguf_metadata(path)
        return cls.from_gguf_metadata(meta)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """From already-read GGUF metadata (the model loader reads it anyway)."""
        backend, add_bos_default = _gguf_rust_tokenizer(meta)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]

        def tok_id(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos, eos = tok_id("bos_token_id"), tok_id("eos_token_id")
        unk, pad = tok_id("unknown_token_id"), tok_id("padding_token_id")
        templates: dict[str, str] = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        prefix = "tokenizer.chat_template."
        for key, value in meta.items():
            if key.startswith(prefix) and isinstance(value, str) and key != "tokenizer.chat_templates":
                templates[key[len(prefix):]] = value
        if not templates and meta.get("general.architecture") in _ARCHITECTURE_TEMPLATES:
            templates["default"] = _ARCHITECTURE_TEMPLATES[meta["general.architecture"]]
        named = (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
        strings = {name: tokens[i] for name, i in named if i is not None}
        declared = [eos, tok_id("eot_token_id"), tok_id("eom_token_id")]
        tk = cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=[],
            chat_templates=templates,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            special_token_strings=strings,
        )
        tk.eos_token_ids = tk._end_ids([i for i in declared if i is not None])
        return tk

    @classmethod
    def _from_hf_folder(cls, folder: Path) -> Tokenizer:
        backend = _RustTokenizer.from_file(str(folder / "tokenizer.json"))

        def read_json(name: str) -> dict:
            p = folder / name
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

        config = read_json("tokenizer_config.json")
        special_map = read_json("special_tokens_map.json")
        generation = read_json("generation_config.json")

        strings: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if content is not None:
                strings[name] = content

        def id_of(name: str) -> int | None:
            return backend.token_to_id(strings[name]) if name in strings else None

        bos = id_of("bos_token")
        if bos is None and isinstance(generation.get("bos_token_id"), int):
            bos = generation["bos_token_id"]

        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            raw = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif raw is None:
            raw = read_json("chat_template.json").get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update({t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t})
        for extra in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            templates.setdefault(extra.stem, extra.read_text(encoding="utf-8"))

        # Whether the tokenizer.json post-processor adds BOS/EOS; tokenizer_config's flags win when given.
        eos = id_of("eos_token")
        probe = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        post_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
        post_eos = eos is not None and len(probe) > len(plain) and probe[-1] == eos
        add_bos = config.get("add_bos_token", post_bos)
        add_eos = config.get("add_eos_token", post_eos)

        declared: list[int] = [eos] if eos is not None else []
        gen_eos = generation.get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        declared += [i for i in gen_eos or [] if isinstance(i, int)]
        tk = cls(backend, bos_token_id=bos, eos_token_ids=[], chat_templates=templates, add_bos=bool(add_bos),
                 add_eos=bool(add_eos), special_token_strings=strings)
        tk.eos_token_ids = tk._end_ids(declared)
        return tk

    def _end_ids(self, declared: list[int]) -> list[int]:
        """Declared stop ids, plus the end-of-turn specials the chat templates actually write."""
        out: list[int] = []
        for i in declared:
            if i not in out:
                out.append(i)
        text = "\n".join(self._templates.values())
        for name in _END_OF_TURN_NAMES:
            if name in text:
                i = self._tk.token_to_id(name)
                if i is not None and i in self.special_ids and i not in out:
                    out.append(i)
        return out

    # -- text <-> ids -------------------------------------------------------------------------------------

    @property
    def backend(self) -> _RustTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to save it as tokenizer.json)."""
        return self._tk

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special tokens written in it (like <|im_start|>) become their ids."""
        ids = _encode(self._tk, text).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
            if self.add_eos:
                ids.append(self.eos_token_ids[0])
        return ids

    def encode_with_plain_spans(self, text: str, plain: Sequence[tuple[int, int]]) -> list[int]:
        """Ids of `text` (no BOS/EOS added) where special-token text inside the character spans `plain`
        (sorted, disjoint: what a user typed) is ordinary text, while special tokens elsewhere (a
        template's) stay control tokens. The tokenizer splits text at special tokens and encodes the
        pieces between them on their own, so only the pieces that hold such text are encoded again
        (with specials read as text); every other id is exactly encode()'s. (A sentencepiece vocabulary
        that prefixes the text's start with '▁' also prefixes such a piece: it is encoded on its own.)"""
        enc = _encode(self._tk, text)
        ids, offsets = enc.ids, enc.offsets
        starts = [a for a, _ in plain]

        def typed(start: int, end: int) -> bool:  # overlaps a span (sorted, disjoint: bisect, not a scan)
            k = bisect.bisect_left(starts, end) - 1
            return k >= 0 and plain[k][1] > start

        real = [i for i, t in enumerate(ids) if t in self.special_ids and not typed(*offsets[i])]
        out: list[int] = []
        first, start = 0, 0  # the piece after the last real special token: ids[first:], text[start:]
        for stop in [*real, len(ids)]:
            piece = ids[first:stop]
            if any(t in self.special_ids for t in piece):  # special-token text typed inside it
                end = offsets[stop][0] if stop < len(ids) else len(text)
                piece = _encode(self._plain_encoder(), text[start:end]).ids
            out += piece + ids[stop:stop + 1]
            if stop < len(ids):
                first, start = stop + 1, offsets[stop][1]
        return out

    def _plain_encoder(self) -> _RustTokenizer:
        """A copy of the backend that reads special-token text as text (two threads may both make it
        at first: the copies are equal)."""
        if self._plain_backend is None:
            plain = _RustTokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        return self._plain_backend

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD and ids outside the vocabulary are dropped."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The vocabulary spelling of a token (byte-level or '▁' form), '' for an unknown id."""
        t = self._tk.id_to_token(int(i))
        return t if t is not None else ""

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes one token stands for (OpenAI logprobs `bytes`); may be a partial UTF-8 char."""
        i = int(i)
        cached = self._token_bytes_cache.get(i)
        if cached is not None:
            return cached
        if i in self._added_content:
            out = self._added_content[i].encode("utf-8")
        else:
            tok = self._tk.id_to_token(i)
            if tok is None:
                out = b""
            elif self._byte_level:
                try:
                    out = bytes(_BYTE_DECODER[c] for c in tok)
                except KeyError:  # not spelled in the byte alphabet: the ByteLevel decoder emits it as is
                    out = tok.encode("utf-8")
            elif self._byte_fallback and i in self.byte_fallback_ids:
                out = bytes([int(tok[3:5], 16)])
            elif self._byte_fallback or "▁" in tok:
                out = tok.replace("▁", " ").encode("utf-8")
            else:
                out = self._tk.decode([i], skip_special_tokens=False).encode("utf-8")
        self._token_bytes_cache[i] = out
        return out

    # -- chat ---------------------------------------------------------------------------------------------

    def template_for(self, tools: list | None) -> str:
        """The template source `apply_chat_template` renders with (a `tool_use` one when tools are given)."""
        if tools is not None and "tool_use" in self._templates:  # transformers' choice, named templates
            return self._templates["tool_use"]
        return self.chat_template or DEFAULT_CHATML_TEMPLATE

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt for `messages`, rendered exactly as transformers' `apply_chat_template(tokenize=False)`.

        `extra` reaches the template as variables (e.g. `enable_thinking`, `documents`) and overrides
        the special-token strings (`bos_token`, ...). Tokenize the result with add_special_tokens=False.
        """
        source = self.template_for(tools)
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = self._compiled[source] = _compile_template(source)
        variables = {**self.special_token_strings, **_plain(extra)}
        variables.setdefault("documents", None)
        return compiled.render(
            messages=_normalize_messages(messages),
            tools=_plain(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# ---------------------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text chunks that never split a UTF-8 character.

    Uses vLLM's/TGI's prefix window: the text of the new tokens is decode(window + new) minus
    decode(window), where the window starts at the last point text was emitted. Each step decodes a
    few tokens, not the whole sequence, and decoders with context effects (sentencepiece's leading
    space, byte-fallback runs, U+FFFD for incomplete bytes) see the same left context in both decodes.
    Text is held back while it ends in U+FFFD (maybe an incomplete character) or in a byte-fallback
    piece, so the chunks always concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 prefix_ids: Sequence[int] = ()) -> None:
        """`prefix_ids`: ids already in the sequence (the prompt tail), used only as left context so a
        sentencepiece model's first generated word keeps its leading space; their text is not emitted."""
        self.tokenizer = tokenizer
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hold_ids = tokenizer.byte_fallback_ids
        context = list(prefix_ids)[-6:]
        while context and context[-1] in self._hold_ids:  # never let a byte run straddle the start
            context.pop()
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, len(context)) if context else ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ids; returns the text that became final (possibly '')."""
        if not token_ids:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        if self._ids[-1] in self._hold_ids:
            return ""
        text = self._decode(self._prefix_offset)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new

    def flush(self) -> str:
        """Everything still held back (a trailing partial character comes out as U+FFFD). End of stream."""
        text = self._decode(self._prefix_offset)
        new = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new
