"""Paged KV blocks with automatic prefix caching.

A full block is identified by a SHA-256 digest chained over the digest of the block before it and its
own token ids, starting from the request's cache namespace (its prompt_cache_isolation_key), so equal
prefixes in one namespace map to equal blocks and nothing else does: Python's hash() of a tuple of ints
can be steered by a crafted prompt into another user's prefix (vLLM moved to SHA-256 for this).
Blocks are reference counted; a block whose count drops to zero keeps its contents and its digest and
waits in an LRU free list, where a later request with the same prefix can revive it, until the
allocator needs it for something else.

Sliding-window layers (Gemma 3's five in six) read only their last `window` positions, so their KV older than
that need not stay. Such a model's layers are grouped (vLLM's hybrid allocator): the full-attention layers form
the first group, the window layers the others, each as many layers as the first, so that a block (a page) of
any group has the same bytes and every group draws from one pool. A sequence has a table per group
(`block_table`, then `window_tables`); as its window moves on, a window group's blocks behind it go back to the
pool (to the LRU, still cached) and their entries point at NULL_BLOCK, a block nothing reads. A prefix hit then
needs the full groups' blocks of the whole prefix and the window groups' blocks of its last window.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from ember.engine.sequence import Sequence

NULL_BLOCK = 0  # with window groups: what a window table holds for blocks behind the window (never read)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, window_groups: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window if window_groups else None  # a window group's positions a query reads
        self.window_groups = window_groups
        self.groups = 1 + window_groups  # blocks a sequence takes per block of tokens
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks  # digest of each cached full block
        self.cached: dict[bytes, int] = {}  # digest (and group, for window groups) -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        if window_groups:
            del self.free[NULL_BLOCK]
            self.ref_counts[NULL_BLOCK] = 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free) - (1 if self.window_groups else 0)

    @staticmethod
    def _tables(seq: Sequence) -> list[list[int]]:
        return [seq.block_table, *seq.window_tables]

    def _first_read(self, position: int) -> int:
        """The first block a window group's query at `position` reads (0 without window groups)."""
        return max(0, position - self.window + 1) // self.block_size if self.window else 0

    @staticmethod
    def _key(digest: bytes, group: int) -> bytes:
        return digest if group == 0 else digest + bytes([group])

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

    def _lookup(self, seq: Sequence) -> list[list[int]]:
        """Per group, cached blocks that hold a prefix of seq, leaving at least one token to compute: the full
        group's from block 0, a window group's from the first its next query reads (NULL_BLOCK before)."""
        if not self.enable_prefix_caching or seq.scores_prompt:  # scoring needs every prompt position
            return [[] for _ in range(self.groups)]
        chain = self._chain(seq, self._cacheable_blocks(seq, (seq.num_tokens - 1) // self.block_size))
        hits = []
        for digest in chain:
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        count = len(hits)
        window_hits: list[list[int | None]] = [
            [self.cached.get(self._key(d, g)) for d in chain[:count]] for g in range(1, self.groups)]
        while count and any(None in blocks[self._first_read(count * self.block_size):count] for blocks in window_hits):
            count -= 1  # a window group lacks a block the next query would read: a shorter prefix
        first = self._first_read(count * self.block_size)
        return [hits[:count], *([NULL_BLOCK] * first + blocks[first:count] for blocks in window_hits)]

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
        attached = [b for blocks in hits for b in blocks if not self._null(b)]
        revived = sum(1 for b in attached if self.ref_counts[b] == 0)
        computed = len(hits[0]) * self.block_size
        new_tokens = min(num_new_tokens, seq.num_tokens - computed)
        needed = -(-(computed + new_tokens) // self.block_size) - len(hits[0])
        if needed * self.groups > self.num_free_blocks - revived:
            return False
        for b in attached:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table, *seq.window_tables = [blocks + [self._take_free() for _ in range(needed)] for blocks in hits]
        seq.num_computed_tokens = computed
        return True

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Give child parent's blocks: full ones shared, the partly filled last one copied (one per group), since
        both will write into it. Returns the (source, destination) blocks to copy. The caller checks that
        `groups` blocks are free when the last one is partial."""
        bs, computed = self.block_size, parent.num_computed_tokens
        tables, copies = [], []
        for table in self._tables(parent):
            shared = table[:computed // bs]
            for b in shared:
                self.ref_counts[b] += 1
            tables.append(list(shared))
            if computed % bs:
                copies.append((table[computed // bs], self._take_free()))
                tables[-1].append(copies[-1][1])
        child.block_table, *child.window_tables = tables
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = computed
        return copies

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens)
        return needed * self.groups <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens)):
            for table in self._tables(seq):
                table.append(self._take_free())

    def room(self, seq: Sequence) -> int:
        """Tokens seq could compute from its computed end with its blocks and every free one."""
        return (len(seq.block_table) + self.num_free_blocks // self.groups) * self.block_size - seq.num_computed_tokens

    def _null(self, block: int) -> bool:
        return block == NULL_BLOCK and self.window_groups > 0

    def _unref(self, block: int, first_in_line: bool = False) -> None:
        if self._null(block):
            return
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if first_in_line:
                self.free.move_to_end(block, last=False)

    def truncate(self, seq: Sequence) -> None:
        """Free seq's blocks past its computed tokens (those held rejected drafts only): first in line for
        reuse, since they hold nothing worth keeping."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        for table in self._tables(seq):
            for block in table[keep:]:
                self._unref(block, first_in_line=True)
            del table[keep:]

    def commit(self, seq: Sequence, old_computed: int) -> None:
        """Publish blocks that became full (and so immutable) in the prefix cache; window groups then let go of
        the blocks their next query no longer reads."""
        first = old_computed // self.block_size
        last = self._cacheable_blocks(seq, seq.num_computed_tokens // self.block_size)
        if self.enable_prefix_caching and last > first:
            for i, digest in enumerate(self._chain(seq, last)[first:], start=first):
                for group, table in enumerate(self._tables(seq)):
                    block = table[i]
                    if not self._null(block) and self.block_keys[block] is None:
                        key = self._key(digest, group)
                        self.block_keys[block] = key
                        self.cached.setdefault(key, block)
        if self.window_groups:
            behind = self._first_read(seq.num_computed_tokens)
            for table in seq.window_tables:
                for i in range(self._first_read(old_computed), behind):
                    self._unref(table[i])
                    table[i] = NULL_BLOCK

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; freed blocks keep their cached contents until reused (LRU)."""
        for table in reversed(self._tables(seq)):
            for block in reversed(table):  # tail first: the prefix is the likelier reuse
                self._unref(block)
        seq.block_table = []
        seq.window_tables = [[] for _ in range(self.window_groups)]
        seq.num_computed_tokens = 0
