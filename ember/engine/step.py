"""The contract of one engine step, between the scheduler, the runner and the sampler.

The scheduler hands out a list of `StepItem`s. Each item names a sequence and the query positions it
computes this step: `num_new_tokens` of the sequence's own tokens from `start` (a prompt chunk, or the
one token a decode feeds back), then `drafts`, tokens a proposer guessed would follow. The runner feeds
`tokens` at positions `start ..`, writes their K/V into the sequence's blocks and returns the logits of
each item's `num_logit_rows` last positions, items in list order:

    a chunk of a prompt being scored   every position (its last one samples if the prompt ends there)
    a chunk that ends the prompt       the last position: the first output token is sampled from it
    a decode with k drafts             k + 1 positions: row j samples the token after draft j - 1
    any other chunk                    none

After sampling, `Scheduler.append` takes the sampled tokens one at a time (a draft is accepted while it
equals the token sampled at its position) and `Scheduler.computed` commits the step: the sequence's
computed tokens end after its last accepted draft, the K/V written for rejected drafts is dropped with
any block past the new end, and only blocks full of accepted tokens are hashed into the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.sequence import Sequence


@dataclass
class StepItem:
    seq: Sequence
    num_new_tokens: int  # of the sequence's own tokens, from `start`
    drafts: list[int] = field(default_factory=list)  # proposed continuation, verified this step
    start: int = -1  # the sequence's computed tokens when scheduled (set in __post_init__)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.seq.num_computed_tokens

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + len(self.drafts)

    @property
    def tokens(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_new_tokens] + self.drafts

    @property
    def samples(self) -> bool:
        """Whether this item reaches the end of its sequence, so that tokens are sampled after it."""
        return self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_sample_rows(self) -> int:
        """The trailing logit rows tokens are sampled from: one per draft and one after them."""
        return len(self.drafts) + 1 if self.samples else 0

    @property
    def num_logit_rows(self) -> int:
        scored = self.num_new_tokens if self.seq.scores_prompt else int(self.samples)
        return scored + len(self.drafts)
