"""Continuous batching with chunked prefill and preemption by recompute.

Every step hands each scheduled sequence a number of new tokens to compute: one for a decoding
sequence, a chunk of its prompt for one in prefill. Decodes are scheduled first so a long prompt
never stalls the sequences already generating; the remaining token budget goes to prefill chunks,
then to newly admitted requests. When the KV cache runs out, the most recently admitted running
sequence is preempted: its blocks are released (their contents stay in the prefix cache, so the
recompute is often cheap) and it goes back to the head of the waiting queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_logit_rows(self) -> int:
        """Positions whose logits are needed: all of a chunk whose prompt is being scored, else the
        last one if it samples."""
        return self.num_new_tokens if self.seq.scores_prompt else int(self.samples)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

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
            self.waiting.appendleft(child)

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
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []

        def budget() -> int:
            return self.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled)

        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SeqStatus.RUNNING or budget() == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget())
            while not self.block_manager.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                scheduled = [s for s in scheduled if s.seq is not victim]
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.block_manager.grow(seq, n)
                scheduled.append(ScheduledSeq(seq, n))
        while self.waiting and budget() > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.admit(seq, budget()):
                break
            self.waiting.popleft()
            if not seq.admitted:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted = True
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, min(seq.num_tokens - seq.num_computed_tokens, budget())))
        scheduled.sort(key=lambda s: s.num_new_tokens > 1)  # the runner batches leading decodes together
        return scheduled
