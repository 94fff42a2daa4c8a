"""Fireworks deployments end to end through the fireworks-ai SDK against real `ember serve` processes: a
deployment's life (create, get, list, inference under both id forms, :scale to zero and back, scale from zero on
a request, PATCH reloading its replica with a new context length, delete, undelete, hard delete), scale to zero
after the idle window, deployments surviving a restart, 4xx answers naming the field, a request in flight
finishing when its deployment scales to zero, and a server without a store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fireworks
import httpx
import openai
import pytest
from fireworks import Fireworks

from tests.server import MODEL, Server, launch

ACCOUNT = "acme"
FW_MODEL = f"accounts/fireworks/models/{MODEL}"
HI = [{"role": "user", "content": "Say hi."}]


def _name(deployment_id: str, account: str = ACCOUNT) -> str:
    return f"accounts/{account}/deployments/{deployment_id}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ember-deployments")


@pytest.fixture(scope="module")
def served(folder) -> Iterator[Server]:
    with launch("--data-dir", str(folder / "data"), log=folder / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def fw(served) -> Fireworks:
    return Fireworks(base_url=served.url, api_key="unused", account_id=ACCOUNT, max_retries=0)


def _fw(server: Server) -> Fireworks:
    return Fireworks(base_url=server.url, api_key="unused", account_id=ACCOUNT, max_retries=0)


def _wait(fw: Fireworks, deployment_id: str, ok: Callable, timeout: float = 30, account: str = ACCOUNT):
    """The deployment once `ok(deployment)` holds (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        d = fw.deployments.get(deployment_id, account_id=account)
        if ok(d):
            return d
        assert time.monotonic() < deadline, f"{deployment_id}: {d.state} {d.replica_stats} {d.desired_replica_count}"
        time.sleep(0.1)


def _ready(d) -> bool:
    return d.state == "READY" and d.replica_stats.ready_replica_count == 1


def _at_zero(d) -> bool:
    return d.replica_stats.ready_replica_count == 0 and d.desired_replica_count == 0


def _chat(server: Server, model: str, messages: list | None = None, **kw) -> httpx.Response:
    return server.post("/v1/chat/completions", {"model": model, "messages": messages or HI, "max_tokens": 4,
                                                "temperature": 0, **kw})


def _error(response: httpx.Response | fireworks.APIStatusError) -> dict:
    body = response.json() if isinstance(response, httpx.Response) else response.body
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def _served_until_ok(server: Server, model: str, timeout: float = 30) -> list[httpx.Response]:
    """Requests until one is answered; every earlier one a 503 telling to retry while the replica loads."""
    deadline, answers = time.monotonic() + timeout, []
    while True:
        r = _chat(server, model)
        answers.append(r)
        if r.status_code == 200:
            return answers
        assert r.status_code == 503, r.text
        assert _error(r)["code"] == "model_loading" and int(r.headers["retry-after"]) >= 1
        assert time.monotonic() < deadline, "the replica never loaded"
        time.sleep(0.1)


# a deployment's life


def test_deployment_lifecycle(fw, served):
    created = fw.deployments.create(base_model=FW_MODEL, deployment_id="life", display_name="first life",
                                    min_replica_count=0, max_replica_count=1,
                                    autoscaling_policy={"scale_to_zero_window": "600s"})
    assert created.name == _name("life") and created.state == "CREATING" and created.display_name == "first life"
    assert created.base_model == FW_MODEL and (created.min_replica_count, created.max_replica_count) == (0, 1)
    assert created.autoscaling_policy.scale_to_zero_window == "600s" and created.desired_replica_count == 1
    assert created.replica_stats.ready_replica_count == 0
    ready = _wait(fw, "life", _ready)
    assert ready.replica_count == 1 and ready.desired_replica_count == 1 and ready.status.code == "OK"
    assert ready.create_time == created.create_time and ready.update_time >= created.update_time
    assert ready.replica_stats.initializing_replica_count == 0

    # inference under both forms of its id, through the openai SDK
    client = served.client()
    for model in (_name("life"), f"{FW_MODEL}#{_name('life')}"):
        answer = client.chat.completions.create(model=model, messages=HI, max_tokens=4, temperature=0)
        assert answer.model == model and answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens > 1
        assert answer.choices[0].message.content is not None
    long_prompt = [{"role": "user", "content": "one two three four five six seven eight nine ten " * 10}]
    assert _chat(served, _name("life"), long_prompt).status_code == 200  # fits the base model's context

    # :scale to zero; a request then scales it back from zero: 503s with retry-after while it loads, then 200
    assert fw.deployments.scale("life", replica_count=0) is not None
    at_zero = _wait(fw, "life", _at_zero)
    assert at_zero.state == "READY" and at_zero.replica_count == 0
    answers = _served_until_ok(served, _name("life"))
    assert len(answers) >= 2, "the first request after scaling to zero must wait for the replica"
    assert answers[-1].json()["usage"]["completion_tokens"] >= 1
    back = _wait(fw, "life", _ready)
    assert back.desired_replica_count == 1

    # :scale to 0 and explicitly back to 1
    fw.deployments.scale("life", replica_count=0)
    _wait(fw, "life", _at_zero)
    fw.deployments.scale("life", replica_count=1)
    assert _wait(fw, "life", _ready).desired_replica_count == 1
    assert _chat(served, _name("life")).status_code == 200

    # PATCH: a new context length reloads the replica (UPDATING), then it is enforced
    updated = fw.deployments.update("life", base_model=FW_MODEL, display_name="second life", max_context_length=64)
    assert updated.state == "UPDATING" and updated.display_name == "second life" and updated.max_context_length == 64
    ready = _wait(fw, "life", _ready)
    assert ready.display_name == "second life" and ready.max_context_length == 64
    assert ready.autoscaling_policy.scale_to_zero_window == "600s"  # what the PATCH did not send stays
    too_long = _chat(served, _name("life"), long_prompt)
    assert too_long.status_code == 400, too_long.text
    assert "64" in _error(too_long)["message"]
    assert _chat(served, _name("life")).status_code == 200
    renamed = fw.deployments.update("life", base_model=FW_MODEL, description="no reload")
    assert renamed.state == "READY" and renamed.description == "no reload" and renamed.display_name == "second life"

    # delete: DELETED for get, gone from the list unless show_deleted, its requests 404
    assert fw.deployments.delete("life") is not None
    deleted = fw.deployments.get("life")
    assert deleted.state == "DELETED" and deleted.delete_time is not None
    assert deleted.replica_stats.ready_replica_count == 0
    assert _name("life") not in [d.name for d in fw.deployments.list()]
    assert [d.state for d in fw.deployments.list(show_deleted=True) if d.name == _name("life")] == ["DELETED"]
    for model in (_name("life"), f"{FW_MODEL}#{_name('life')}"):
        r = _chat(served, model)
        assert r.status_code == 404 and _error(r)["param"] == "model", r.text
    with pytest.raises(fireworks.NotFoundError):
        fw.deployments.scale("life", replica_count=1)
    with pytest.raises(fireworks.NotFoundError):
        fw.deployments.update("life", base_model=FW_MODEL, display_name="ghost")

    # undelete: back, and serving again (with the fields it had)
    undeleted = fw.deployments.undelete("life", body={})
    assert undeleted.state == "CREATING" and undeleted.delete_time is None
    ready = _wait(fw, "life", _ready)
    assert ready.display_name == "second life" and ready.max_context_length == 64
    assert _chat(served, _name("life")).status_code == 200
    assert _name("life") in [d.name for d in fw.deployments.list()]
    with pytest.raises(fireworks.BadRequestError):  # not deleted
        fw.deployments.undelete("life", body={})

    # hard delete forgets it (even once soft-deleted)
    fw.deployments.delete("life", hard=True)
    with pytest.raises(fireworks.NotFoundError) as exc:
        fw.deployments.get("life")
    assert _error(exc.value)["code"] == "NOT_FOUND"
    assert _name("life") not in [d.name for d in fw.deployments.list(show_deleted=True)]
    assert _chat(served, _name("life")).status_code == 404
    with pytest.raises(fireworks.NotFoundError):
        fw.deployments.undelete("life", body={})
    # its id is free again
    again = fw.deployments.create(base_model=FW_MODEL, deployment_id="life", disable_auto_deploy=True)
    assert again.state == "READY" and again.display_name == "" and again.desired_replica_count == 0
    fw.deployments.delete("life", hard=True)


def test_list_pages_and_show_deleted(fw):
    account = "lister"
    ids = ["p3", "p0", "p2", "p1"]  # created in this order, not in name order
    for deployment_id in ids:  # at zero replicas: nothing loads
        d = fw.deployments.create(base_model=FW_MODEL, deployment_id=deployment_id, account_id=account,
                                  disable_auto_deploy=True)
        assert d.state == "READY" and d.desired_replica_count == 0
    first = fw.deployments.list(account_id=account, page_size=1)
    assert [d.name for d in first.deployments] == [_name("p3", account)] and first.next_page_token
    second = fw.deployments.list(account_id=account, page_size=1, page_token=first.next_page_token)
    assert [d.name for d in second.deployments] == [_name("p0", account)]
    assert [d.name for d in fw.deployments.list(account_id=account, page_size=1)] == \
        [_name(i, account) for i in ids]  # the SDK follows the page tokens
    last = fw.deployments.list(account_id=account, page_size=3, page_token=first.next_page_token)
    assert len(last.deployments) == 3 and not last.next_page_token and not last.has_next_page()

    fw.deployments.delete("p0", account_id=account)
    assert [d.name for d in fw.deployments.list(account_id=account, page_size=1)] == \
        [_name(i, account) for i in ids if i != "p0"]
    shown = list(fw.deployments.list(account_id=account, page_size=1, show_deleted=True))
    assert [d.name for d in shown] == [_name(i, account) for i in ids]
    assert [d.state for d in shown] == ["READY", "DELETED", "READY", "READY"]
    assert fw.deployments.list(account_id="nobody-here").deployments == []  # another account sees none
    checked = fw.deployments.create(base_model=FW_MODEL, deployment_id="p4", account_id=account, validate_only=True)
    assert checked.name == _name("p4", account) and checked.state == "CREATING"
    with pytest.raises(fireworks.NotFoundError):  # validateOnly makes nothing
        fw.deployments.get("p4", account_id=account)
    masked = fw.deployments.get("p3", account_id=account, read_mask="displayName")
    assert masked.name == _name("p3", account) and masked.state is None
    for bad in ({"page_token": "not-a-token"}, {"filter": "state=READY"}, {"order_by": "name sideways"}):
        with pytest.raises(fireworks.BadRequestError):
            fw.deployments.list(account_id=account, **bad)


def test_scale_to_zero_after_the_idle_window(fw, served):
    created = fw.deployments.create(base_model=MODEL, deployment_id="idle", min_replica_count=0,
                                    autoscaling_policy={"scale_to_zero_window": "2s"})
    assert created.max_replica_count == 1  # the default when left out
    _wait(fw, "idle", _ready)
    assert _chat(served, _name("idle")).status_code == 200
    started = time.monotonic()
    idle = _wait(fw, "idle", _at_zero, timeout=20)
    assert time.monotonic() - started >= 1.5  # not before its window
    assert idle.state == "READY" and idle.replica_count == 0
    assert idle.autoscaling_policy.scale_to_zero_window == "2s"
    # a request scales it from zero again: the openai SDK's own retries (which follow retry-after) wait for it
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=8)
    answer = client.chat.completions.create(model=_name("idle"), messages=HI, max_tokens=4)
    assert answer.model == _name("idle") and answer.usage.completion_tokens >= 1
    assert _wait(fw, "idle", _ready).desired_replica_count == 1
    fw.deployments.delete("idle", hard=True)


def test_a_minimum_replica_is_never_scaled_to_zero_when_idle(fw, served):
    fw.deployments.create(base_model=FW_MODEL, deployment_id="pinned", min_replica_count=1,
                          autoscaling_policy={"scale_to_zero_window": "1s"})
    _wait(fw, "pinned", _ready)
    time.sleep(2.5)
    pinned = fw.deployments.get("pinned")
    assert _ready(pinned) and pinned.desired_replica_count == 1
    fw.deployments.delete("pinned", hard=True)


def test_a_replica_that_fails_to_load(fw, served, tmp_path):
    """A base model that cannot load: FAILED with the reason, its requests 503; a PATCH to a good one recovers."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    fw.deployments.create(base_model=str(broken), deployment_id="broken")
    failed = _wait(fw, "broken", lambda d: d.state != "CREATING", timeout=20)
    assert failed.state == "FAILED" and failed.status.code != "OK" and failed.status.message
    assert failed.replica_stats.ready_replica_count == 0
    r = _chat(served, _name("broken"))
    assert r.status_code == 503 and _error(r)["code"] == "deployment_failed", r.text
    fixed = fw.deployments.update("broken", base_model=FW_MODEL)
    assert fixed.state in ("CREATING", "UPDATING") and fixed.base_model == FW_MODEL
    ready = _wait(fw, "broken", _ready)
    assert ready.status.code == "OK" and not ready.status.message
    assert _chat(served, _name("broken")).status_code == 200
    fw.deployments.delete("broken", hard=True)


# requests in flight


def test_a_request_in_flight_finishes_when_its_deployment_scales_to_zero(fw, served):
    fw.deployments.create(base_model=FW_MODEL, deployment_id="drain", min_replica_count=0,
                          autoscaling_policy={"scale_to_zero_window": "600s"})
    _wait(fw, "drain", _ready)
    stream = served.client().chat.completions.create(
        model=_name("drain"), messages=[{"role": "user", "content": "Count from one to one hundred."}],
        max_tokens=200, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks, after = [], 0
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 5:
            fw.deployments.scale("drain", replica_count=0)
            assert fw.deployments.get("drain").desired_replica_count == 0
        elif len(chunks) > 5:
            after += 1
    assert after > 100, "the scale to zero came after the answer"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 200
    assert _wait(fw, "drain", _at_zero).state == "READY"
    fw.deployments.delete("drain", hard=True)


def test_scaling_back_up_while_the_old_replica_drains_keeps_the_new_one(fw, served):
    """Scale to 0 while a request runs, then to 1 before it ends: the replica that drains must not take the
    new one's count with it when it finally unloads."""
    fw.deployments.create(base_model=FW_MODEL, deployment_id="flip", min_replica_count=0,
                          autoscaling_policy={"scale_to_zero_window": "600s"})
    _wait(fw, "flip", _ready)
    stream = served.client().chat.completions.create(
        model=_name("flip"), messages=HI, max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            fw.deployments.scale("flip", replica_count=0)
            fw.deployments.scale("flip", replica_count=1)
    _wait(fw, "flip", _ready)
    time.sleep(0.5)  # the old replica's unload reports after the drain
    flip = fw.deployments.get("flip")
    assert _ready(flip) and flip.desired_replica_count == 1, (flip.replica_stats, flip.desired_replica_count)
    assert _chat(served, _name("flip")).status_code == 200
    fw.deployments.delete("flip", hard=True)


def test_scaled_to_zero_while_its_replica_loads(fw, served):
    """A deployment scaled to zero (or PATCHed to maxReplicaCount 0) before its first replica is ready is READY at
    zero replicas, not CREATING for ever; a request then scales it from zero."""
    assert fw.deployments.create(base_model=FW_MODEL, deployment_id="early").state == "CREATING"
    fw.deployments.scale("early", replica_count=0)
    early = _wait(fw, "early", lambda d: d.state != "CREATING", timeout=10)
    assert early.state == "READY" and _at_zero(early)
    time.sleep(1.5)  # the load that was under way ends unused
    assert _at_zero(fw.deployments.get("early"))
    assert _served_until_ok(served, _name("early"))[-1].status_code == 200
    fw.deployments.delete("early", hard=True)

    assert fw.deployments.create(base_model=FW_MODEL, deployment_id="early").state == "CREATING"
    none = fw.deployments.update("early", base_model=FW_MODEL, max_replica_count=0)
    assert none.max_replica_count == 0
    early = _wait(fw, "early", lambda d: d.state != "CREATING", timeout=10)
    assert early.state == "READY" and _at_zero(early)
    r = _chat(served, _name("early"))
    assert r.status_code == 503 and _error(r)["code"] == "deployment_scaled_to_zero", r.text
    fw.deployments.delete("early", hard=True)


# bad input


@pytest.mark.parametrize(("kwargs", "status", "param", "words"), [
    ({"max_replica_count": 2}, 400, "maxReplicaCount", ("maxReplicaCount", "at most 1")),
    ({"min_replica_count": 2}, 400, "minReplicaCount", ("minReplicaCount", "at most 1")),
    ({"min_replica_count": 1, "max_replica_count": 0}, 400, "minReplicaCount", ("maxReplicaCount",)),
    ({"min_replica_count": -1}, 400, "minReplicaCount", ()),
    ({"precision": "FP8"}, 400, "precision", ("FP8",)),
    ({"base_model": "accounts/fireworks/models/no-such-model"}, 400, "baseModel", ("no-such-model",)),
    ({"accelerator_type": "NVIDIA_H100_80GB"}, 400, "acceleratorType", ("not supported",)),
    ({"accelerator_count": 8}, 400, "acceleratorCount", ("not supported",)),
    ({"extra_body": {"bogus": 1}}, 400, "bogus", ()),
    ({"autoscaling_policy": {"scale_to_zero_window": "soon"}}, 400, "autoscalingPolicy.scaleToZeroWindow", ()),
    ({"max_context_length": 0}, 400, "maxContextLength", ()),
    ({"deployment_id": "Upper"}, 400, "deploymentId", ()),
    ({"deployment_id": "a" * 64}, 400, "deploymentId", ()),
    ({"deployment_id": "-lead"}, 400, "deploymentId", ()),
])
def test_bad_create_requests_name_the_field(fw, kwargs, status, param, words):
    kwargs = {"base_model": FW_MODEL, "deployment_id": "bad", **kwargs}
    with pytest.raises(fireworks.APIStatusError) as exc:
        fw.deployments.create(**kwargs)
    error = _error(exc.value)
    assert exc.value.status_code == status and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    with pytest.raises(fireworks.NotFoundError):  # nothing was made
        fw.deployments.get("bad")


def test_bad_changes_to_a_deployment_name_the_field(fw):
    fw.deployments.create(base_model=FW_MODEL, deployment_id="dup", disable_auto_deploy=True)
    with pytest.raises(fireworks.ConflictError) as exc:
        fw.deployments.create(base_model=FW_MODEL, deployment_id="dup")
    assert _error(exc.value)["param"] == "deploymentId"
    with pytest.raises(fireworks.BadRequestError) as exc:
        fw.deployments.scale("dup", replica_count=2)
    assert _error(exc.value)["param"] == "replicaCount" and "at most 1" in _error(exc.value)["message"]
    with pytest.raises(fireworks.BadRequestError) as exc:
        fw.deployments.scale("dup", replica_count=-1)
    assert _error(exc.value)["param"] == "replicaCount"
    for kwargs, param in (({"precision": "FP8"}, "precision"), ({"max_replica_count": 2}, "maxReplicaCount"),
                          ({"min_replica_count": 3}, "minReplicaCount"),
                          ({"accelerator_type": "NVIDIA_H100_80GB"}, "acceleratorType"),
                          ({"base_model": "nope"}, "baseModel"), ({"extra_body": {"bogus": True}}, "bogus")):
        with pytest.raises(fireworks.BadRequestError) as exc:
            fw.deployments.update("dup", **{"base_model": FW_MODEL, **kwargs})
        assert _error(exc.value)["param"] == param, (kwargs, _error(exc.value))
    dup = fw.deployments.get("dup")  # unchanged by the refused changes
    assert dup.precision == "PRECISION_UNSPECIFIED" and dup.max_replica_count == 1 and dup.state == "READY"
    for missing in (fw.deployments.get, fw.deployments.delete):
        with pytest.raises(fireworks.NotFoundError) as exc:
            missing("missing")
        assert _error(exc.value)["code"] == "NOT_FOUND"
    with pytest.raises(fireworks.BadRequestError) as exc:
        fw.deployments.get("Upper")
    assert _error(exc.value)["param"] == "deployment_id"
    fw.deployments.delete("dup", hard=True)


def test_requests_to_a_missing_deployment_are_404(served):
    for model in (_name("missing"), f"{FW_MODEL}#{_name('missing')}"):
        r = _chat(served, model)
        assert r.status_code == 404 and _error(r)["code"] == "model_not_found", r.text
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model=_name("missing"), messages=HI, max_tokens=4)


# a restart


def test_deployments_survive_a_restart(tmp_path):
    data = str(tmp_path / "data")
    with launch("--data-dir", data, log=tmp_path / "first.log") as first:
        fw = _fw(first)
        fw.deployments.create(base_model=FW_MODEL, deployment_id="warm", display_name="warm one",
                              max_context_length=512, autoscaling_policy={"scale_to_zero_window": "900s"})
        fw.deployments.create(base_model=FW_MODEL, deployment_id="cold", display_name="cold one",
                              disable_auto_deploy=True)
        fw.deployments.create(base_model=FW_MODEL, deployment_id="gone", disable_auto_deploy=True)
        fw.deployments.delete("gone")
        _wait(fw, "warm", _ready)
        before = {d.name: d for d in fw.deployments.list(show_deleted=True)}
    with launch("--data-dir", data, log=tmp_path / "second.log") as second:
        fw = _fw(second)
        after = {d.name: d for d in fw.deployments.list()}
        assert list(after) == [_name("warm"), _name("cold")]
        for name, d in after.items():
            was = before[name]
            assert (d.display_name, d.create_time, d.base_model, d.max_context_length, d.autoscaling_policy) == \
                (was.display_name, was.create_time, was.base_model, was.max_context_length, was.autoscaling_policy)
        assert after[_name("warm")].desired_replica_count == 1
        warm = _wait(fw, "warm", _ready)
        assert warm.max_context_length == 512 and warm.display_name == "warm one"
        assert _chat(second, _name("warm")).status_code == 200
        cold = fw.deployments.get("cold")
        assert _at_zero(cold) and cold.state == "READY"
        gone = fw.deployments.get("gone")
        assert gone.state == "DELETED" and gone.delete_time == before[_name("gone")].delete_time
        assert _chat(second, _name("gone")).status_code == 404
        assert [d.name for d in fw.deployments.list(show_deleted=True)] == \
            [_name("warm"), _name("cold"), _name("gone")]


# a server without a store


def test_a_server_without_a_store_has_no_deployments(tmp_path):
    with launch("--no-usage-records", log=tmp_path / "serve.log") as bare:
        fw = _fw(bare)
        calls = (lambda: fw.deployments.list(), lambda: fw.deployments.get("any"),
                 lambda: fw.deployments.create(base_model=FW_MODEL, deployment_id="any"),
                 lambda: fw.deployments.scale("any", replica_count=1), lambda: fw.deployments.delete("any"),
                 lambda: fw.deployments.undelete("any", body={}))
        for call in calls:
            with pytest.raises(fireworks.NotFoundError) as exc:
                call()
            assert _error(exc.value)["code"] == "not_found"
        assert _chat(bare, _name("any")).status_code == 404
        assert _chat(bare, MODEL).status_code == 200
