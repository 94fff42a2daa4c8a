"""Tokenizer and chat template from the model file, and incremental detokenisation.

Built on the Rust `tokenizers` library, not transformers: importing transformers costs seconds of
server start-up. A GGUF carries no tokenizer.json, so its vocabulary, merges and token types are
assembled into a byte-level BPE with the pre-tokenizer llama.cpp uses for the file's `pre` type.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from ember.models.gguf_file import gguf_field, open_gguf

# llama.cpp's split regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`; absent = GPT-2's own.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS: dict[str, list[str]] = {
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # SmolLM's tokenizer.json: single digits, then GPT-2
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4
_FALLBACK_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class Tokenizer:
    def __init__(self, backend: RustTokenizer, *, bos_token: str | None, eos_token: str | None,
                 eos_token_ids: list[int], chat_template: str | None, add_bos: bool) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        return cls._from_hf(path) if path.is_dir() else cls.from_gguf_reader(open_gguf(path))

    @classmethod
    def from_gguf_reader(cls, reader) -> Tokenizer:
        kind = gguf_field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (byte-level BPE 'gpt2' is supported)")
        tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
        types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
        backend = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                           fuse_unk=False))
        splits = _PRE_SPLITS.get(gguf_field(reader, "tokenizer.ggml.pre", "default"), [_GPT2_SPLIT])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types, strict=True) if k == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED])

        def token(key: str) -> str | None:
            i = gguf_field(reader, f"tokenizer.ggml.{key}")
            return None if i is None else tokens[i]

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False))
        if add_bos and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", special_tokens=[(bos, tokens.index(bos))])
        eos_ids = [i for i in (gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
                   if i is not None]
        return cls(backend, bos_token=bos, eos_token=eos, eos_token_ids=sorted(set(eos_ids)),
                   chat_template=gguf_field(reader, "tokenizer.chat_template"), add_bos=add_bos)

    @classmethod
    def _from_hf(cls, folder: Path) -> Tokenizer:
        backend = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def name(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        bos, eos = name("bos_token"), name("eos_token")
        eos_ids = {backend.token_to_id(eos)} if eos else set()
        gen_file = folder / "generation_config.json"
        if gen_file.is_file():
            gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
            eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        template = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        add_bos = bool(bos) and len(backend.encode("a").ids) > len(backend.encode("a", add_special_tokens=False).ids)
        return cls(backend, bos_token=bos, eos_token=eos, eos_token_ids=sorted(i for i in eos_ids if i is not None),
                   chat_template=template, add_bos=add_bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level alphabet undone); OpenAI's logprob `bytes`."""
        token = self.backend.id_to_token(token_id) or ""
        table = _byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")  # an added token spelled in plain text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **extra) -> str:
        """Render as transformers' apply_chat_template(tokenize=False) does."""
        template = _compile(self.chat_template or _FALLBACK_TEMPLATE)
        return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-unicode table, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in enumerate(codes)}


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Text for tokens as they arrive, never splitting a UTF-8 character.

    Decodes only a short window (from the last emitted boundary), so each token costs O(1); text is
    emitted once the window no longer ends in a replacement character, i.e. a character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: the boundary before the last emitted token(s)
        self.read_offset = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
