"""Looking inside a generation through HTTP: logprobs in both Fireworks formats (against transformers
on the bundled model, float32 on both sides), echo and prompt scoring the way lm-eval asks for it,
streamed chunks that add up to the whole answer, raw_output and return_token_ids."""

from __future__ import annotations

import math

import pytest
import torch
from fireworks import Fireworks

from ember.models.loader import default_model_path
from tests.server import MODEL

CHAT = [{"role": "user", "content": "Name three colours."}]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """Row i: transformers' log-softmax over the token after ids[:i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)


def _post(server, path: str, **body) -> dict:
    r = server.post(path, {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _values(logprobs: dict) -> list[float | None]:
    """The chosen tokens' logprobs, in either format."""
    if "content" in logprobs:
        return [e["logprob"] for e in logprobs["content"]]
    return logprobs["token_logprobs"]


def _join(parts: list[dict]) -> dict:
    """Streamed logprobs objects, concatenated field by field."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, []) + value
    return out


def assert_close(a, b, tol: float = 1e-5) -> None:
    """Equal, floats within tol (the second request may reuse the first's cached prefix)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, abs_tol=tol), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, tol)
    else:
        assert a == b


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.3, "top_k": 20, "seed": 11}])
def test_sampled_token_logprobs_equal_transformers(float32_server, hf_model, tokenizer, sampling):
    """The raw model's numbers whatever the sampling settings: top_k and temperature change what is
    drawn, not what is reported."""
    server = float32_server
    prompt = tokenizer.encode("The three primary colours are")
    lp = _post(server, "/v1/completions", prompt=prompt, max_tokens=8, logprobs=3, ignore_eos=True,
               **sampling)["choices"][0]["logprobs"]
    ids = lp["token_ids"]
    ref = hf_logprobs(hf_model, prompt + ids)
    assert len(ids) == 8
    for j, token in enumerate(ids):
        row = ref[len(prompt) - 1 + j]
        assert abs(lp["token_logprobs"][j] - row[token].item()) < TOL
        top_values, top_ids = row.topk(3)
        expected = {tokenizer.token_bytes(i).decode(errors="replace"): v
                    for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)}
        expected.setdefault(lp["tokens"][j], row[token].item())
        assert lp["top_logprobs"][j].keys() == expected.keys()
        assert all(abs(lp["top_logprobs"][j][k] - v) < TOL for k, v in expected.items())
    if sampling["temperature"] == 0:
        assert ids == [int(ref[len(prompt) - 1 + j].argmax()) for j in range(8)]


@pytest.mark.parametrize("logprobs", [1, True])
def test_echo_scores_the_prompt_like_transformers(float32_server, hf_model, tokenizer, logprobs):
    server = float32_server
    text = "Paris is the capital and largest city of France."
    ids = tokenizer.encode(text)
    resp = _post(server, "/v1/completions", prompt=text, echo=True, max_tokens=0, logprobs=logprobs, temperature=0)
    choice = resp["choices"][0]
    assert (choice["text"], choice["finish_reason"], resp["usage"]["completion_tokens"]) == (text, "length", 0)
    values = _values(choice["logprobs"])
    ref = hf_logprobs(hf_model, ids)
    assert values[0] is None and len(values) == len(ids)
    assert max(abs(v - ref[i, ids[i + 1]].item()) for i, v in enumerate(values[1:])) < TOL


def test_lm_eval_loglikelihood(float32_server, hf_model, tokenizer):
    """lm-eval's local-completions request, verbatim (token ids, echo, logprobs 1, max_tokens 1), and its
    parse: sum(token_logprobs[ctxlen:-1]) and is_greedy; also the older max_tokens 0 form."""
    server = float32_server
    pairs = [("The capital of France is", " Paris"), ("Two plus two equals", " seven hundred")]
    contexts = [tokenizer.encode(c) for c, _ in pairs]
    prompts = [c + tokenizer.encode(x) for c, (_, x) in zip(contexts, pairs, strict=True)]
    expected = []
    for context, prompt in zip(contexts, prompts, strict=True):
        ref = hf_logprobs(hf_model, prompt)
        rows = range(len(context), len(prompt))
        expected.append((sum(ref[i - 1, prompt[i]].item() for i in rows),
                         all(int(ref[i - 1].argmax()) == prompt[i] for i in rows)))
    for max_tokens, end in ((1, -1), (0, None)):
        resp = _post(server, "/v1/completions", prompt=prompts, temperature=0, max_tokens=max_tokens, logprobs=1,
                     seed=1234, echo=True)
        for choice, context, (total, greedy) in zip(sorted(resp["choices"], key=lambda c: c["index"]), contexts,
                                                    expected, strict=True):
            token_logprobs = choice["logprobs"]["token_logprobs"][len(context):end]
            tops = choice["logprobs"]["top_logprobs"][len(context):end]
            assert abs(sum(token_logprobs) - total) < TOL * len(token_logprobs)
            assert all(t == max(top.values()) for t, top in zip(token_logprobs, tops, strict=True)) == greedy
    assert [g for _, g in expected] == [True, False]  # the check above saw both outcomes


@pytest.mark.parametrize("k", [0, 5])
def test_chat_logprobs_in_openai_format(server, tokenizer, k):
    resp = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=k)
    choice = resp.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens
    if choice.finish_reason == "stop":  # the end-of-turn token is reported; it adds no text
        assert tokenizer.token_to_id(entries[-1].token) in tokenizer.eos_token_ids
        entries = entries[:-1]
    assert bytes(b for e in entries for b in e.bytes).decode() == choice.message.content
    for e in choice.logprobs.content:
        assert e.logprob <= 0 and len(e.top_logprobs) == k
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        if k:  # greedy on unpenalised logits: the chosen token is the likeliest
            assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("logprobs", [{"logprobs": True, "top_logprobs": 2}, {"logprobs": 2}])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 5}])
def test_streamed_logprobs_concatenate_to_the_answer(server, path, logprobs, sampling):
    chat = "chat" in path
    body = {"model": MODEL, "max_tokens": 10, "return_token_ids": True, **logprobs, **sampling,
            **({"messages": CHAT} if chat else {"prompt": "A list of fruits:"})}
    whole = server.post(path, body).json()["choices"][0]
    chunks = [c["choices"][0] for c in server.stream(path, body) if c["choices"]]
    text = "".join(c["delta"].get("content", "") if chat else c["text"] for c in chunks)
    assert text == (whole["message"]["content"] if chat else whole["text"])
    assert [t for c in chunks for t in c.get("token_ids", [])] == whole["token_ids"]
    assert_close(_join([c["logprobs"] for c in chunks if c["logprobs"]]), whole["logprobs"])
    legacy = isinstance(logprobs["logprobs"], int) and not isinstance(logprobs["logprobs"], bool)
    assert ("tokens" in whole["logprobs"]) == legacy
    assert len(whole["token_ids"]) == len(_values(whole["logprobs"]))


def test_stop_string_cuts_the_reported_tokens(server):
    resp = _post(server, "/v1/completions", prompt="1, 2, 3, 4, 5, 6,", max_tokens=24, temperature=0, stop=" 8",
                 logprobs=0)
    choice = resp["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text.endswith(" 8") and choice["finish_reason"] == "stop"
    assert "".join(lp["tokens"]).startswith(text)  # every reported token touches the returned text
    assert lp["text_offset"][-1] < len(text) <= lp["text_offset"][-1] + len(lp["tokens"][-1])


@pytest.mark.parametrize("echo", [{"echo": True}, {"echo_last": 2}])
def test_streamed_echo_comes_first(server, tokenizer, echo):
    prompt = "Roses are red, violets are"
    ids = tokenizer.encode(prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1, **echo}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    chunks = [c["choices"][0] for c in server.stream("/v1/completions", body)]
    echoed = ids[-echo.get("echo_last", len(ids)):]
    assert chunks[0]["text"].startswith(tokenizer.decode(echoed))
    assert chunks[0]["logprobs"]["token_ids"][:len(echoed)] == echoed
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert_close(_join([c["logprobs"] for c in chunks]), whole["logprobs"])
    assert (whole["logprobs"]["token_logprobs"][0] is None) == ("echo" in echo)
    assert whole["logprobs"]["text_offset"][:2] == [0, len(tokenizer.decode(echoed[:1]))]


def test_raw_output_and_token_ids_in_chat(server, tokenizer):
    fw = Fireworks(api_key="unused", base_url=f"{server.url}/inference", max_retries=0)
    resp = fw.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                      raw_output=True, return_token_ids=True)
    choice, raw = resp.choices[0], resp.choices[0].raw_output
    assert resp.prompt_token_ids == raw.prompt_token_ids and len(resp.prompt_token_ids) == resp.usage.prompt_tokens
    assert tokenizer.encode("".join(raw.prompt_fragments), add_special_tokens=False) == raw.prompt_token_ids
    assert choice.token_ids == raw.completion_token_ids and raw.grammar is None
    assert raw.completion == tokenizer.decode(choice.token_ids)  # special tokens kept
    assert choice.message.content == tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    assert [e.token_id for e in raw.completion_logprobs.content] == choice.token_ids
    plain = fw.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, raw_output=True)
    assert plain.choices[0].raw_output.completion_logprobs is None and plain.prompt_token_ids is None


@pytest.mark.parametrize("stream", [False, True])
def test_token_ids_per_prompt_in_completions(server, tokenizer, stream):
    prompts = ["Hello", "The sky is"]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "raw_output": True}
    if stream:
        choices: dict[int, dict] = {}
        for chunk in server.stream("/v1/completions", body):
            for c in chunk["choices"]:
                seen = choices.setdefault(c["index"], {"text": "", "token_ids": []})
                assert ("prompt_token_ids" in c) == (seen["text"] == "" and not seen["token_ids"])
                seen["prompt_token_ids"] = seen.get("prompt_token_ids") or c.get("prompt_token_ids")
                seen["text"] += c["text"]
                seen["token_ids"] += c["token_ids"]
                assert ("raw_output" in c) == (c["finish_reason"] is not None)
                seen["raw_output"] = c.get("raw_output")
    else:
        resp = _post(server, "/v1/completions", **body)
        assert "prompt_token_ids" not in resp
        choices = {c["index"]: c for c in resp["choices"]}
    assert sorted(choices) == [0, 1, 2, 3]
    for i, c in choices.items():
        assert c["prompt_token_ids"] == c["raw_output"]["prompt_token_ids"] == tokenizer.encode(prompts[i // 2])
        assert c["raw_output"]["prompt_fragments"] == [prompts[i // 2]]
        assert c["token_ids"] == c["raw_output"]["completion_token_ids"] and len(c["token_ids"]) == 3
        assert tokenizer.decode(c["token_ids"]) == c["text"]
