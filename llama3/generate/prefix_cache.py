"""A prefix cache: keys and values of token prefixes already computed, reused by a later prompt that starts
with the same tokens (the same system prompt, the previous turns of a chat) instead of being recomputed.

The keys and values at position p depend only on tokens 0..p (attention is causal, RoPE is by position), so
a prompt that starts with a prefix computed before can copy that prefix's keys and values into its own row
of the KV cache and compute only the rest. The result is the same computation, exact up to float rounding
of matmuls of another shape (the tests check float32 logits to 1e-5 and greedy tokens equal).

How it is stored: in blocks of `block_size` tokens (16), as vLLM's automatic prefix caching does, in a pool
beside the model's KV cache (grown as it fills): per layer, keys and values of shape (blocks, KVH, block_size, D).
A block is found by its parent block and its own tokens, `(parent id, tokens)`, a dict key compared exactly
(no hash collision can give wrong keys and values), so the blocks form a tree of block-sized edges, like
SGLang's radix tree. Blocks rather than a token-level radix tree because the model's cache is a static
(B, KVH, S, D) tensor per layer, not paged: the cache copies a hit into a row's slots, and fixed-size blocks
make that copy one gather per layer and eviction a free list of equal slots, never a fragmented pool. The
price is that the last partial block of a prefix (at most block_size - 1 tokens) is recomputed.

Eviction: the pool holds at most `max_tokens` tokens; when it is full the least recently used block goes
(a lookup touches a chain's blocks from the root down, so a child is always newer than its parent and the
leaves go first). A block whose parent went stays until it is the oldest, unreachable (its parent's id is
never reused).

The cache never holds the whole prompt for a lookup: at least one token is computed, since the logits of
the last prompt token are what the first new token is sampled from.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 16


@dataclass
class _Block:
    uid: int  # never reused, so a child of an evicted block can never be found again
    slot: int  # where its keys and values are in the pool


class PrefixCache:
    """Keys and values of computed token prefixes, in blocks of `block_size`, at most `max_tokens` tokens.

    `model` is the `Transformer` whose KV cache the blocks are copied from and into: `lookup` finds how much of
    a prompt is cached, `load` copies it into a row of a cache, `store` keeps the full blocks of a row's
    computed tokens. The pool is allocated as blocks are stored (doubling), in the cache's dtype and device.
    """

    def __init__(self, model, max_tokens: int, block_size: int = BLOCK_SIZE):
        if block_size < 1 or max_tokens < block_size:
            raise ValueError(
                f"prefix_cache_tokens must be 0 (off) or at least {block_size} (one block), got {max_tokens}"
            )
        self.model, self.block_size = model, block_size
        self.n_blocks = max_tokens // block_size
        self._blocks: collections.OrderedDict[tuple[int, tuple[int, ...]], _Block] = collections.OrderedDict()
        self._free: list[int] = []
        self._capacity = 0  # blocks allocated: the pool grows (doubling) as it fills, up to n_blocks
        self._uid = 0
        self._k: list[Tensor] = []
        self._v: list[Tensor] = []
        self.hit_tokens = 0  # prompt tokens copied from the cache instead of computed
        self._seen_weights: tuple | None = None
        self.evicted_blocks = 0

    @property
    def max_tokens(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def tokens(self) -> int:
        """Tokens held now (blocks in use, reachable or not)."""
        return len(self._blocks) * self.block_size

    def clear(self) -> None:
        """Forgets every block (the model's weights changed, say); keeps the pool's memory."""
        self._blocks.clear()
        self._free = list(range(self._capacity - 1, -1, -1))

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The pool slots of the longest chain of cached full blocks that `tokens` starts with, root first.
        Touches them (most recently used)."""
        bs, parent, slots = self.block_size, 0, []
        for start in range(0, len(tokens) - bs + 1, bs):
            block = self._blocks.get((parent, tuple(tokens[start : start + bs])))
            if block is None:
                break
            self._blocks.move_to_end((parent, tuple(tokens[start : start + bs])))
            slots.append(block.slot)
            parent = block.uid
        return slots

    def load(self, caches, row: int, slots: list[int], n: int, first: int = 0) -> None:
        """Copies the cached tokens first..n-1 of the chain `slots` (from `lookup`) into slots first..n-1 of
        row `row` of `caches` (one `KVCache` per layer)."""
        if n <= first:
            return
        bs = self.block_size
        b0, b1 = first // bs, -(-n // bs)
        idx = torch.tensor(slots[b0:b1], device=self._k[0].device)
        lo, hi = first - b0 * bs, n - b0 * bs
        for cache, pool_k, pool_v in zip(caches, self._k, self._v, strict=True):
            for dst, pool in ((cache.k, pool_k), (cache.v, pool_v)):
                blocks = pool.index_select(0, idx)  # (m, KVH, bs, D)
                m, kvh, _, d = blocks.shape
                dst[row, :, first:n] = blocks.transpose(0, 1).reshape(kvh, m * bs, d)[:, lo:hi]
        self.hit_tokens += n - first

    def store(self, caches, row: int, tokens: Sequence[int]) -> None:
        """Keeps the full blocks of `tokens`, whose keys and values are in slots 0..len(tokens)-1 of row `row`
        of `caches`: the blocks already cached are touched, the others copied in (evicting the least recently
        used blocks when the pool is full)."""
        c0 = caches[0].k
        if self._k and (self._k[0].dtype, self._k[0].device) != (c0.dtype, c0.device):
            self.clear()  # the model now runs in another dtype or on another device: its old blocks do not apply
            self._k, self._v, self._free, self._capacity = [], [], [], 0
        bs, parent = self.block_size, 0
        new: list[tuple[int, int]] = []  # (block index in tokens, pool slot)
        for i, start in enumerate(range(0, len(tokens) - bs + 1, bs)):
            if i >= self.n_blocks:  # a chain longer than the pool would evict its own first blocks
                break
            key = (parent, tuple(tokens[start : start + bs]))
            block = self._blocks.get(key)
            if block is None:
                slot = self._take_slot(caches[0])
                if slot is None:
                    break
                self._uid += 1
                block = self._blocks[key] = _Block(self._uid, slot)
                new.append((i, slot))
            else:
                self._blocks.move_to_end(key)
            parent = block.uid
        if not new:
            return
        src = torch.tensor([i for i, _ in new], device=c0.device)
        dst = torch.tensor([s for _, s in new], device=self._k[0].device)
        for cache, pool_k, pool_v in zip(caches, self._k, self._v, strict=True):
            for c, pool in ((cache.k, pool_k), (cache.v, pool_v)):
                kvh, _, d = c.shape[1:]
                n_full = len(tokens) // bs
                blocks = c[row, :, : n_full * bs].reshape(kvh, n_full, bs, d).transpose(0, 1)  # (n_full, KVH, bs, D)
                pool.index_copy_(0, dst, blocks.index_select(0, src).to(pool.dtype))

    # -- for `Llama`'s generation loop, whose rows are the model's own cache rows 0..B-1 ---------------------

    def reuse(self, prompts: Sequence[Sequence[int]]) -> int:
        """Copies into each row b of the model's cache the cached start of prompts[b], as many tokens for every
        row (the shortest hit, at most each prompt's length - 1) and returns that number: the batch's prefill
        starts there. Forgets everything first if the model's weights changed since the last call."""
        weights = self._weights()
        if weights != self._seen_weights:
            self.clear()
            self._seen_weights = weights
        hits = [(self.lookup(p), len(p) - 1) for p in prompts]
        n = min(min(len(slots) * self.block_size, most) for slots, most in hits)
        caches = [layer.attention.cache for layer in self.model.layers]
        for row, (slots, _) in enumerate(hits):
            self.load(caches, row, slots, n)
        return n

    def keep(self, prompts: Sequence[Sequence[int]], fed: Sequence[Sequence[int]], stops: Sequence[int]) -> None:
        """Stores each row's prompt and the new tokens fed back into the model after it (fed[b], cut after the
        first stop token: what follows is not the answer)."""
        caches = [layer.attention.cache for layer in self.model.layers]
        stop = set(stops)
        for row, (prompt, new) in enumerate(zip(prompts, fed, strict=True)):
            end = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
            self.store(caches, row, [*prompt, *new[:end]])

    def _weights(self) -> tuple:
        """Which tensors the model computes with, and their in-place version counters: an optimizer step, a
        loaded state dict, a merged adapter or a move to another device changes it."""
        m = self.model
        params = [(id(p), p._version) for p in m.parameters()]
        buffers = [(id(b), b._version) for name, b in m.named_buffers() if ".cache." not in name]
        return (tuple(params), tuple(buffers), m.ops)

    def _take_slot(self, cache) -> int | None:
        if not self._free and self._capacity < self.n_blocks:
            self._grow(cache)
        if self._free:
            return self._free.pop()
        if not self._blocks:
            return None
        _, oldest = self._blocks.popitem(last=False)
        self.evicted_blocks += 1
        return oldest.slot

    def _grow(self, cache) -> None:
        """Twice the blocks (at least 64, at most n_blocks): a large bound costs memory only as the cache fills."""
        _, kvh, _, d = cache.k.shape
        new = min(max(2 * self._capacity, 64), self.n_blocks)
        extra = (new - self._capacity, kvh, self.block_size, d)
        n_layers = len(self.model.layers)
        if not self._k:
            empty = cache.k.new_empty(0, kvh, self.block_size, d)
            self._k, self._v = [empty] * n_layers, [empty] * n_layers
        self._k = [torch.cat([k, k.new_empty(extra)]) for k in self._k]
        self._v = [torch.cat([v, v.new_empty(extra)]) for v in self._v]
        self._free = list(range(new - 1, self._capacity - 1, -1)) + self._free
        self._capacity = new


def block_hashes(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """A hash of each full block of `tokens` with everything before it: equal hashes at block i say (up to a
    hash collision) that two prompts share their first i + 1 blocks. For scheduling only (which request waits
    for another's blocks); the cache itself compares the tokens."""
    out, h = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[start : start + block_size])))
        out.append(h)
    return out
