"""Prompt-cache controls through a real server: isolation keys (body or header) never share blocks across
namespaces and do within one, the answer is the same either way, and prompt_cache_max_len bounds what
a request reads from or stores in the cache."""

from __future__ import annotations

import uuid

from tests.server import MODEL


def _ask(server, system: str, headers: dict | None = None, **extra) -> tuple[int, int, str]:
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "Name three colours."}], **extra}
    r = server.post("/v1/chat/completions", body, headers=headers or {})
    assert r.status_code == 200, r.text
    data = r.json()
    return data["usage"]["prompt_tokens"], data["usage"]["prompt_tokens_details"]["cached_tokens"], \
        data["choices"][0]["message"]["content"]


def test_isolation_keys_separate_namespaces(server):
    system = f"You are a careful assistant {uuid.uuid4().hex}. " * 8  # a long prefix no other test shares
    prompt, cold, text = _ask(server, system, prompt_cache_isolation_key="tenant-a")
    assert cold == 0
    full = (prompt - 1) // 16 * 16  # every full block but the one holding the last token
    assert _ask(server, system, prompt_cache_isolation_key="tenant-b")[1:] == (0, text)
    assert _ask(server, system)[1:] == (0, text)  # no key: the shared namespace, which has not seen it
    assert _ask(server, system, prompt_cache_isolation_key="tenant-a")[1:] == (full, text)
    assert _ask(server, system, {"x-prompt-cache-isolation-key": "tenant-b"})[1:] == (full, text)
    assert _ask(server, system)[1:] == (full, text)


def test_prompt_cache_max_len(server):
    system = f"You answer in lists {uuid.uuid4().hex}. " * 8
    assert _ask(server, system, prompt_cache_max_len=0)[1] == 0
    assert _ask(server, system, prompt_cache_max_len=0)[1] == 0  # the first stored nothing, this reads nothing
    prompt, cached, _ = _ask(server, system, prompt_cache_max_len=40)
    assert cached == 0  # nothing of it was stored before
    assert _ask(server, system, prompt_cache_max_len=40)[1] == 32  # two whole 16-token blocks within 40
    assert _ask(server, system)[1] == 32  # only those were stored
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                             "prompt_cache_max_len": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_cache_max_len"
