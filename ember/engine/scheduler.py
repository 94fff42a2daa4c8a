"""Continuous batching with chunked prefill, preemption by recompute, and speculative drafts.

Every step hands each scheduled sequence the tokens it computes (see ember.engine.step): one for a
decoding sequence, plus any drafts worth verifying, or a chunk of its prompt. Decodes are scheduled
first so a long prompt never stalls the sequences already generating; the remaining token budget goes
to prefill chunks, then to newly admitted requests. When the KV cache runs out, the most recently
admitted running sequence of the worst priority is preempted: its blocks are released (their contents
stay in the prefix cache, so the recompute is often cheap) and it goes back to the head of its priority
in the waiting queue. Drafts only ever use blocks that are free: they never preempt anything.

Priorities (SamplingParams.priority, lower first) let batch jobs yield to live traffic. The waiting queue
is ordered by priority, then arrival; a waiting head that finds no free slot or blocks preempts running
sequences of strictly worse priority. A step that computes a prompt chunk of priority p carries no work
of a worse one: those sequences keep their blocks and sit the step out, so a live request's time to first
token stays close to idle. And while better work has been seen in the last RECENT_S seconds, worse work
computes at most YIELD_TOKENS query positions a step (decodes, drafts, prompt chunks; the rest sit the step
out), so that no long step holds up the next better request.
With equal priorities all of this is plain FIFO.

Every change to a sequence's state happens here: admission, growth, preemption, the tokens a step
appends (`append`), what it leaves computed (`computed`) and removal.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import SeqStatus, Sequence
from ember.engine.spec.policy import DraftPriors, StepCost, allocate
from ember.engine.step import StepItem

RECENT_S = 2.0  # how long better work counts as present after it was last seen
YIELD_TOKENS = 32  # query tokens per step for work worse than recent better work


def _priority(seq: Sequence) -> int:
    return seq.params.priority


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: set[int], max_model_len: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.step_cost = StepCost()  # a step's seconds by query positions, for the draft policy
        self.draft_priors = DraftPriors()
        self._seen: dict[int, float] = {}  # priority -> when it was last the best running or waiting

    def add(self, seq: Sequence) -> None:
        self._enqueue(seq, front=False)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """Queue seq behind every waiting sequence of its priority or a better one, or, with `front` (it ran
        before), ahead of those of its own. Each scan starts from the end it usually stops next to."""
        p, waiting = seq.params.priority, self.waiting
        if front:
            i = 0
            while i < len(waiting) and waiting[i].params.priority < p:
                i += 1
        else:
            i = len(waiting)
            while i and waiting[i - 1].params.priority > p:
                i -= 1
        waiting.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_fork(self, child: Sequence) -> None:
        """A sample split off a running sequence: it runs alongside if it got its blocks and there is
        room, else it waits to recompute its prompt (mostly from the prefix cache)."""
        child.admitted = True
        if child.block_table and len(self.running) < self.max_num_seqs:
            child.status = SeqStatus.RUNNING
            self.running.append(child)
        else:
            self.block_manager.release(child)
            child.status = SeqStatus.WAITING
            self._enqueue(child, front=True)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and release its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.release(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = SeqStatus.WAITING
        self._enqueue(seq, front=True)
        self.num_preemptions += 1

    def _victim(self) -> Sequence | None:
        """The running sequence to preempt first: the worst priority, the most recently admitted among equals."""
        return max(reversed(self.running), key=_priority, default=None)

    def _recent_best(self) -> float:
        """The best priority running or waiting within the last RECENT_S seconds."""
        now = time.perf_counter()
        present = [s.params.priority for s in self.running]
        if self.waiting:
            present.append(self.waiting[0].params.priority)
        if present:
            self._seen[min(present)] = now
        return min((p for p, at in self._seen.items() if now - at < RECENT_S), default=math.inf)

    def _prefill_level(self) -> float:
        """The best priority whose prompt this step may compute: running sequences with prompt left and the
        waiting head. The head counts even if it may not be admitted: it is, by preempting, whenever something
        worse runs, and otherwise excluding work worse than it excludes nothing."""
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        if self.waiting:
            prefilling.append(self.waiting[0])
        return min(map(_priority, prefilling), default=math.inf)

    def _add_drafts(self, scheduled: list[StepItem], share: Callable[[Sequence], int],
                    spend: Callable[[Sequence, int], None]) -> None:
        """Give decoding sequences the drafts that pay (ember.engine.spec.policy), within what is left of the
        token budget and of the sequence's `share` of it, max_tokens (the token sampled after them must fit),
        the context, the free blocks and their grammar."""
        budget = self.max_num_batched_tokens - sum(item.num_query_tokens for item in scheduled)
        decodes = [item for item in scheduled if item.num_new_tokens == 1 and item.samples
                   and item.seq.num_output_tokens and item.seq.drafting is not None]
        if budget <= 0 or not decodes:
            return
        tokens, sampled = self.max_num_batched_tokens - budget, sum(item.samples for item in scheduled)
        cost = self.step_cost
        bar = sampled * cost.cheapest_draft(tokens) / cost.seconds(tokens)  # below it, no draft can pay
        proposals = []
        for item in decodes:
            seq = item.seq
            room = min(budget, seq.params.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - seq.num_tokens - 1)
            drafts = seq.drafting.drafts(seq.token_ids, seq.num_prompt_tokens, room, bar) if room > 0 else []
            if drafts and seq.matcher is not None:
                drafts = drafts[:seq.matcher.validate(drafts)]
            proposals.append(drafts)
        odds = [(item.seq.drafting.acceptance(), len(p)) for item, p in zip(decodes, proposals, strict=True)]
        counts = allocate(odds, tokens, sampled, cost)
        for item, drafts, count in zip(decodes, proposals, counts, strict=True):
            item.drafts = drafts[:min(count, budget, self.block_manager.room(item.seq) - 1, share(item.seq))]
            spend(item.seq, len(item.drafts))
            item.seq.drafting.using(len(item.drafts))
            budget -= len(item.drafts)
            self.block_manager.grow(item.seq, 1 + len(item.drafts))

    def schedule(self) -> list[StepItem]:
        scheduled: list[StepItem] = []

        def budget() -> int:
            return self.max_num_batched_tokens - sum(s.num_query_tokens for s in scheduled)

        def preempt(victim: Sequence) -> None:
            self._preempt(victim)
            scheduled[:] = [s for s in scheduled if s.seq is not victim]

        # while better work is recent, worse work gets a small share of each step (its decodes, drafts and prompt
        # chunks): the steps stay short, and a better request arriving mid-step waits less for the step to end
        best = self._recent_best()
        worse_left = [YIELD_TOKENS]

        def room(seq: Sequence) -> int:
            """Query tokens seq may compute this step."""
            return min(budget(), worse_left[0]) if seq.params.priority > best else budget()

        def spend(seq: Sequence, tokens: int) -> None:
            if seq.params.priority > best:
                worse_left[0] -= tokens

        def admit(seq: Sequence) -> bool:
            """Admit seq, preempting strictly worse running sequences while it finds no slot or blocks."""
            while not (len(self.running) < self.max_num_seqs and self.block_manager.admit(seq, room(seq))):
                victim = self._victim()
                if victim is None or victim.params.priority <= seq.params.priority:
                    return False
                preempt(victim)
            return True

        # decided before any budget is spent: work worse than the prompts computed sits this step out
        level = self._prefill_level()
        work = sorted((s for s in self.running if s.params.priority <= level), key=_priority)
        decodes = [s for s in work if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in work if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SeqStatus.RUNNING or budget() == 0:
                continue
            left = seq.num_tokens - seq.num_computed_tokens
            n = min(left, room(seq))
            if n == 0:
                continue
            while not self.block_manager.can_grow(seq, n):
                victim = self._victim()
                preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.block_manager.grow(seq, n)
                scheduled.append(StepItem(seq, n))
                spend(seq, n)
        while self.waiting and budget() > 0 and self.waiting[0].params.priority <= level:
            seq = self.waiting[0]
            if room(seq) == 0 or not admit(seq):
                break
            self.waiting.popleft()
            if not seq.admitted:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted = True
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, room(seq))
            scheduled.append(StepItem(seq, n))
            spend(seq, n)
        self._add_drafts(scheduled, room, spend)
        now = time.perf_counter()
        for item in scheduled:
            if item.seq.timings.scheduled is None:
                item.seq.timings.scheduled = now
        return scheduled

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.matcher is not None and (not seq.matcher.accept(token) or seq.matcher.is_terminated()):
            return "stop"  # the grammar is complete (or, defensively, refused the token)
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def append(self, seq: Sequence, token: int, mirostat_mu: float | None) -> str | None:
        """One sampled token joins the sequence; returns why the sequence finished with it, if it did
        (it is then removed and its blocks released)."""
        if seq.num_output_tokens == 0:
            seq.timings.first_token = time.perf_counter()
        seq.token_ids.append(token)
        seq.mirostat_mu = mirostat_mu
        if seq.drafting is not None:
            seq.drafting.observe(token)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            seq.timings.finished = time.perf_counter()
            self.remove(seq)
        return reason

    def computed(self, item: StepItem, accepted: int = 0) -> None:
        """Commit what an item computed: its own tokens and its first `accepted` drafts. K/V written past
        them is rolled back (blocks past the new end freed) and never enters the prefix cache."""
        seq = item.seq
        if item.drafts:
            seq.drafting.verified(len(item.drafts), accepted)
        if seq.status is SeqStatus.FINISHED:
            return
        old = seq.num_computed_tokens
        seq.num_computed_tokens = item.start + item.num_new_tokens + accepted
        if item.drafts:
            self.block_manager.truncate(seq)
        self.block_manager.commit(seq, old)
