"""Request priorities (lower first) on the tiny random model: the waiting order, whom the KV cache and a
better request's admission preempt, steps that prefill live prompts without batch work, and that equal
priorities schedule exactly as plain FIFO."""

from __future__ import annotations

import random

import pytest

from ember.engine import scheduler as scheduler_module
from ember.engine.block_manager import BlockManager
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import SeqStatus, Sequence
from tests.tiny_model import EOS, VOCAB, greedy, make_engine, make_hf_model, run_all, weights_of

LIVE, BATCH = 0, 1


@pytest.fixture(scope="module")
def weights():
    return weights_of(make_hf_model(seed=5))


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _record_steps(engine: LLMEngine) -> list[list[tuple[str, int]]]:
    """Every later step's items as (request id, own tokens computed), in batch order."""
    steps: list[list[tuple[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        steps.append([(item.seq.request_id, item.num_new_tokens) for item in batch])
        return batch

    engine.scheduler.schedule = recorded
    return steps


def _step(engine: LLMEngine, out: dict[str, list[int]]) -> None:
    for o in engine.step():
        out.setdefault(o.request_id, []).extend(o.token_ids)


def _drain(engine: LLMEngine, out: dict[str, list[int]]) -> None:
    while engine.has_work():
        _step(engine, out)
    assert engine.stats()["kv_blocks_used"] == 0


def _alone(weights, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    engine = make_engine(weights)
    return {rid: run_all(engine, {rid: req})[rid] for rid, req in requests.items()}


def _ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_waiting_queue_orders_by_priority_then_arrival():
    """New sequences go behind their priority class; one that must wait again (a fork without room, as a
    preempted sequence) goes to the front of its class, behind better ones."""
    scheduler = Scheduler(BlockManager(64, 4), 4, 64, {EOS}, 256)

    def seq(rid: str, priority: int) -> Sequence:
        return Sequence(rid, [5, 6, 7], 3, greedy(4, priority=priority))

    for rid, priority in [("b1", BATCH), ("l1", LIVE), ("b2", BATCH), ("p1", -1), ("l2", LIVE)]:
        scheduler.add(seq(rid, priority))
    assert _ids(scheduler.waiting) == ["p1", "l1", "l2", "b1", "b2"]
    scheduler.add_fork(seq("b0", BATCH))
    scheduler.add_fork(seq("l0", LIVE))
    scheduler.add(seq("l3", LIVE))
    assert _ids(scheduler.waiting) == ["p1", "l0", "l1", "l2", "l3", "b0", "b1", "b2"]


def test_live_request_added_last_is_admitted_first(weights):
    engine = make_engine(weights, max_num_seqs=1)
    steps = _record_steps(engine)
    requests = {rid: (_prompt(i, 9 + i), greedy(5, priority=priority))
                for i, (rid, priority) in enumerate([("b0", BATCH), ("b1", BATCH), ("b2", BATCH), ("l", LIVE)])}
    out = run_all(engine, requests)
    first_seen = list(dict.fromkeys(rid for step in steps for rid, _ in step))
    assert first_seen == ["l", "b0", "b1", "b2"]
    assert out == _alone(weights, requests)
    assert engine.stats()["kv_blocks_used"] == 0


def test_live_request_preempts_batch_slots_only(weights):
    """With every slot taken by batch work, a live request takes the most recently admitted batch sequence's
    slot; live sequences are never preempted for another live one. The batch work recomputes exactly."""
    engine = make_engine(weights, max_num_seqs=2, enable_prefix_caching=False)
    steps = _record_steps(engine)
    sched = engine.scheduler
    requests = {"b0": (_prompt(10, 10), greedy(24, priority=BATCH)),
                "b1": (_prompt(11, 13), greedy(24, priority=BATCH)),
                "l1": (_prompt(12, 7), greedy(6, priority=LIVE)),
                "l2": (_prompt(13, 11), greedy(6, priority=LIVE)),
                "l3": (_prompt(14, 5), greedy(6, priority=LIVE))}
    out: dict[str, list[int]] = {}
    for rid in ("b0", "b1"):
        engine.add_request(rid, *requests[rid])
    _step(engine, out)
    _step(engine, out)
    engine.add_request("l1", *requests["l1"])
    _step(engine, out)
    assert steps[-1] == [("l1", 7)]
    assert (_ids(sched.running), _ids(sched.waiting), sched.num_preemptions) == (["b0", "l1"], ["b1"], 1)
    engine.add_request("l2", *requests["l2"])
    _step(engine, out)
    assert [rid for rid, _ in steps[-1]] == ["l1", "l2"]
    assert (_ids(sched.running), _ids(sched.waiting), sched.num_preemptions) == (["l1", "l2"], ["b0", "b1"], 2)
    engine.add_request("l3", *requests["l3"])
    _step(engine, out)
    assert [rid for rid, _ in steps[-1]] == ["l1", "l2"]
    assert (_ids(sched.running), _ids(sched.waiting), sched.num_preemptions) == (["l1", "l2"],
                                                                                 ["l3", "b0", "b1"], 2)
    _drain(engine, out)
    assert sched.num_preemptions == 2
    assert out == _alone(weights, requests)


def test_kv_shortage_preempts_worst_priority_first(weights):
    """The live sequence is the most recently admitted, which alone would make it the victim."""
    engine = make_engine(weights, num_kv_blocks=12, block_size=4)
    sched = engine.scheduler
    victims: list[str] = []
    preempt = sched._preempt

    def recorded(seq: Sequence) -> None:
        victims.append(seq.request_id)
        preempt(seq)

    sched._preempt = recorded
    requests = {"b1": (_prompt(20, 8), greedy(14, priority=BATCH)),
                "b2": (_prompt(21, 8), greedy(14, priority=BATCH)),
                "l": (_prompt(22, 8), greedy(14, priority=LIVE))}
    out: dict[str, list[int]] = {}
    for rid in ("b1", "b2"):
        engine.add_request(rid, *requests[rid])
    _step(engine, out)
    engine.add_request("l", *requests["l"])
    _drain(engine, out)
    assert victims and victims[0] == "b2"
    assert "l" not in victims
    assert out == _alone(weights, requests)


def test_live_prefill_steps_carry_no_batch_work(weights):
    """Batch sequences sit out the steps that compute a live prompt (keeping their blocks, not preempted)
    and decode again in the next; a batch prompt does not hold back live decodes."""
    engine = make_engine(weights, max_num_batched_tokens=16)
    steps = _record_steps(engine)
    sched = engine.scheduler
    requests = {"b1": (_prompt(30, 8), greedy(30, priority=BATCH)),
                "b2": (_prompt(31, 8), greedy(30, priority=BATCH)),
                "l": (_prompt(32, 40), greedy(4, priority=LIVE)),
                "b3": (_prompt(33, 8), greedy(4, priority=BATCH))}
    out: dict[str, list[int]] = {}
    for rid in ("b1", "b2"):
        engine.add_request(rid, *requests[rid])
    _step(engine, out)
    _step(engine, out)
    batch = [engine.seqs[rid][0] for rid in ("b1", "b2")]
    tables = [list(s.block_table) for s in batch]
    engine.add_request("l", *requests["l"])
    for _ in range(3):
        _step(engine, out)
        assert [s.status for s in batch] == [SeqStatus.RUNNING] * 2
        assert [s.block_table for s in batch] == tables
    assert steps[-3:] == [[("l", 16)], [("l", 16)], [("l", 8)]]
    _step(engine, out)
    assert steps[-1] == [("l", 1), ("b1", 1), ("b2", 1)]
    engine.add_request("b3", *requests["b3"])
    _step(engine, out)
    assert steps[-1] == [("l", 1), ("b1", 1), ("b2", 1), ("b3", 8)]
    _drain(engine, out)
    assert sched.num_preemptions == 0
    assert out == _alone(weights, requests)


def test_equal_priorities_schedule_as_fifo(weights):
    """One priority for all: the same schedule whatever its value, arrivals admitted in order, preemptions
    under a small KV cache, and every output as if alone."""
    schedules = []
    for priority in (LIVE, BATCH):
        requests = {f"r{i}": (_prompt(40 + i, 6 + 7 * i), greedy(16, priority=priority)) for i in range(6)}
        # no prompt lookup: how many drafts a step verifies follows step times measured at start-up, which differ
        # between two engines by the machine's noise, and the schedules are compared step for step
        engine = make_engine(weights, max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=24, speculation="off")
        steps = _record_steps(engine)
        out = run_all(engine, requests)
        assert engine.stats()["preemptions"] > 0
        assert engine.stats()["kv_blocks_used"] == 0
        assert list(dict.fromkeys(rid for step in steps for rid, _ in step)) == list(requests)
        schedules.append(steps)
    assert schedules[0] == schedules[1]
    assert out == _alone(weights, requests)


def test_worse_work_gets_a_small_share_of_each_step_while_better_work_is_recent(weights, monkeypatch):
    """While a live request was seen within RECENT_S, batch work computes at most YIELD_TOKENS query positions a
    step (decodes, drafts and prompt chunks together), so that its steps stay short; once live traffic is gone
    for that long, batch work takes the whole budget again. Outputs are as if alone either way."""
    engine = make_engine(weights, max_num_batched_tokens=256)
    sched = engine.scheduler
    batch_share: list[tuple[int, int]] = []  # per step: (batch query positions, live query positions)
    schedule = sched.schedule

    def recorded():
        items = schedule()
        batch_share.append((sum(i.num_query_tokens for i in items if i.seq.params.priority == BATCH),
                            sum(i.num_query_tokens for i in items if i.seq.params.priority == LIVE)))
        return items

    sched.schedule = recorded
    requests = {"l": (_prompt(50, 12), greedy(4, priority=LIVE)),
                **{f"b{i}": (_prompt(51 + i, 120), greedy(8, priority=BATCH)) for i in range(3)}}
    out: dict[str, list[int]] = {}
    engine.add_request("l", *requests["l"])
    _step(engine, out)  # the live prompt, alone
    for rid in ("b0", "b1", "b2"):
        engine.add_request(rid, *requests[rid])
    while "l" in engine.seqs:
        _step(engine, out)
    with_live = batch_share[1:]
    assert with_live and max(b for b, _ in with_live) <= scheduler_module.YIELD_TOKENS
    assert sum(b for b, _ in with_live) >= scheduler_module.YIELD_TOKENS  # batch work still moves
    monkeypatch.setattr(scheduler_module, "RECENT_S", 0.0)  # the live request is long gone
    mark = len(batch_share)
    _drain(engine, out)
    assert max(b for b, _ in batch_share[mark:]) > scheduler_module.YIELD_TOKENS
    assert out == _alone(weights, requests)
