"""Paged KV blocks with automatic prefix caching.

A full block is identified by a SHA-256 digest chained over the digest of the block before it and its
own token ids, starting from the request's cache namespace (its prompt_cache_isolation_key), so equal
prefixes in one namespace map to equal blocks and nothing else does: Python's hash() of a tuple of ints
can be steered by a crafted prompt into another user's prefix (vLLM moved to SHA-256 for this).
Blocks are reference counted; a block whose count drops to zero keeps its contents and its digest and
waits in an LRU free list, where a later request with the same prefix can revive it, until the
allocator needs it for something else.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from ember.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks  # digest of each cached full block
        self.cached: dict[bytes, int] = {}  # digest -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def _chain(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Digests of seq's first `num_blocks` full blocks, extending the ones already computed (a sequence's
        tokens never change, so each block is hashed once, not at every commit)."""
        chain, bs = seq.block_hashes, self.block_size
        for i in range(len(chain), num_blocks):
            parent = chain[-1] if chain else hashlib.sha256(
                b"ember-kv\0" + (seq.params.cache_salt or "").encode("utf-8", "surrogatepass")).digest()
            chain.append(hashlib.sha256(parent + array("i", seq.token_ids[i * bs:(i + 1) * bs]).tobytes()).digest())
        return chain[:num_blocks]

    def _cacheable_blocks(self, seq: Sequence, num_blocks: int) -> int:
        """How many of the first num_blocks full blocks the request lets the cache read or store."""
        limit = seq.params.prompt_cache_max_len
        return num_blocks if limit is None else min(num_blocks, limit // self.block_size)

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of seq, leaving at least one token to compute."""
        if not self.enable_prefix_caching or seq.scores_prompt:  # scoring needs every prompt position
            return []
        hits = []
        for digest in self._chain(seq, self._cacheable_blocks(seq, (seq.num_tokens - 1) // self.block_size)):
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        digest = self.block_keys[block]
        if digest is not None:  # evicting cached contents
            if self.cached.get(digest) == block:
                del self.cached[digest]
            self.block_keys[block] = None
        self.ref_counts[block] = 1
        return block

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Attach cached prefix blocks and allocate room for the first chunk, or change nothing."""
        hits = self._lookup(seq)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        computed = len(hits) * self.block_size
        new_tokens = min(num_new_tokens, seq.num_tokens - computed)
        needed = -(-(computed + new_tokens) // self.block_size) - len(hits)
        if needed > self.num_free_blocks - revived:
            return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = hits + [self._take_free() for _ in range(needed)]
        seq.num_computed_tokens = computed
        return True

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give child parent's blocks: full ones shared, the partly filled last one copied, since both
        will write into it. Returns the (source, destination) block to copy, or None if none is needed.
        The caller checks that a block is free when the last one is partial."""
        bs, computed = self.block_size, parent.num_computed_tokens
        shared = parent.block_table[:computed // bs]
        for b in shared:
            self.ref_counts[b] += 1
        child.block_table = list(shared)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = computed
        if computed % bs == 0:
            return None
        copy = self._take_free()
        child.block_table.append(copy)
        return parent.block_table[computed // bs], copy

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens)):
            seq.block_table.append(self._take_free())

    def room(self, seq: Sequence) -> int:
        """Tokens seq could compute from its computed end with its blocks and every free one."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed_tokens

    def truncate(self, seq: Sequence) -> None:
        """Free seq's blocks past its computed tokens (those held rejected drafts only): first in line for
        reuse, since they hold nothing worth keeping."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        for block in seq.block_table[keep:]:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)
        del seq.block_table[keep:]

    def commit(self, seq: Sequence, old_computed: int) -> None:
        """Publish blocks that became full (and so immutable) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        first = old_computed // self.block_size
        last = self._cacheable_blocks(seq, seq.num_computed_tokens // self.block_size)
        if last <= first:
            return
        for i, digest in enumerate(self._chain(seq, last)[first:], start=first):
            block = seq.block_table[i]
            if self.block_keys[block] is None:
                self.block_keys[block] = digest
                self.cached.setdefault(digest, block)

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; freed blocks keep their cached contents until reused (LRU)."""
        for block in reversed(seq.block_table):  # tail first: the prefix is the likelier reuse
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
