"""log p(continuation | context) for many requests at once, each shared context computed once.

In a multiple-choice task (lm-eval's `loglikelihood` requests) every choice of a document comes with the same
context: 100 Hamlet items of 36 context tokens and four 11-token choices are 18,300 tokens run one request at a
time, 7,500 when the context runs once. `token_loglikelihoods` groups the requests whose inputs agree up to
the position that predicts their first continuation token and runs, per batch of groups:

1. the prefix pass: each group's longest common prefix once, written to a KV cache (`KVCache`, the
   generation's); its positions from the first scored one on are shared by every member (a causal model's
   output at position t depends only on tokens 0..t);
2. the suffix passes: each member's tokens after the prefix, its rows of the cache a copy of its group's,
   at positions after the prefix (`Transformer.hidden` with `input_pos`), batched by length.

A request alone in its group is its own prefix: one pass, without a cache, as without sharing. Padding is
on the right (positions after a row's last token, which no real token of the row attends to), and the
output projection runs only at the positions that predict a continuation token.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm import tqdm

from llama3.model.transformer import KVCache, Transformer


@torch.inference_mode()
def token_loglikelihoods(
    model: Transformer,
    pairs: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: (sum of log p(continuation token | what precedes it),
    whether every continuation token is the argmax). The input is context + continuation without its last
    token, cut on the left to `max_length` tokens; the continuation must be 1..max_length tokens. A batch
    is at most `batch_size` rows: groups in the prefix pass, members in a suffix pass."""
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {i}: the continuation is empty")
        if not context:
            raise ValueError(f"request {i}: the context is empty (lm-eval gives it the prefix token)")
        if len(continuation) > max_length:
            raise ValueError(f"request {i}: the continuation is {len(continuation)} tokens, over {max_length}")
        rows.append(((context + continuation)[-(max_length + 1) : -1], continuation))
    # rows whose inputs agree up to the position that predicts the first continuation token share a prefix
    by_key: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, cont) in enumerate(rows):
        by_key.setdefault(tuple(inp[: len(inp) - len(cont) + 1]), []).append(i)
    groups = [(_common_prefix([rows[i][0] for i in members]), members) for members in by_key.values()]
    groups.sort(key=lambda g: -len(g[0]))  # longest first: the least padding
    scores = [[0.0] * len(cont) for _, cont in rows]  # per continuation token
    greedy = [[False] * len(cont) for _, cont in rows]
    chunks = []  # (groups, [(group, request) after its group's prefix]), prefix pass and suffix passes
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        after = [(g, i) for g, (prefix, members) in enumerate(chunk) for i in members if len(rows[i][0]) > len(prefix)]
        after.sort(key=lambda gi: len(chunk[gi[0]][0]) - len(rows[gi[1]][0]))  # longest suffix first
        chunks.append((chunk, after))
    with _own_cache(model), tqdm(total=len(rows), desc="llama3 loglikelihood", disable=not progress) as bar:
        for chunk, after in chunks:
            if after:  # rows for the prefix pass, then for a suffix pass; + 1 slot: a suffix row's padding goes there
                slots = max(len(chunk[0][0]), max(len(rows[i][0]) for _, i in after) + 1)
                _grow_cache(model, len(chunk) + min(batch_size, len(after)), slots)
            _prefix_pass(model, chunk, rows, scores, greedy, use_cache=bool(after))
            bar.update(sum(len(members) for _, members in chunk) - len(after))
            for s in range(0, len(after), batch_size):
                _suffix_pass(model, len(chunk), after[s : s + batch_size], chunk, rows, scores, greedy)
                bar.update(len(after[s : s + batch_size]))
    return [(sum(s), all(g)) for s, g in zip(scores, greedy, strict=True)]


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = next((t for t in range(n) if s[t] != first[t]), n)
    return first[:n]


def _prefix_pass(model, chunk, rows, scores, greedy, use_cache: bool) -> None:
    """Each group's prefix, one row per group (cache rows 0..len(chunk)-1 when members continue after it);
    scores every member's continuation tokens predicted inside the prefix."""
    T = len(chunk[0][0])
    tokens = torch.zeros(len(chunk), T, dtype=torch.long)
    picks, uses = [], []  # (row in batch, position); (request, continuation index, pick, target)
    for b, (prefix, members) in enumerate(chunk):
        tokens[b, : len(prefix)] = torch.tensor(prefix)
        at = {}  # position -> its pick: the members' positions are the group's, computed once
        for i in members:
            inp, cont = rows[i]
            first = len(inp) - len(cont)  # the position that predicts the first continuation token
            for t in range(first, len(prefix)):
                if t not in at:
                    at[t] = len(picks)
                    picks.append((b, t))
                uses.append((i, t - first, at[t], cont[t - first]))
    device = model.tok_embeddings.weight.device
    if use_cache:  # positions 0..T-1 of every row; a shorter prefix's padding lies after it
        hidden = model.hidden(tokens.to(device), input_pos=torch.arange(T, device=device), kv_len=T)
    else:
        hidden = model.hidden(tokens.to(device))
    _score(model, hidden, picks, uses, scores, greedy)


def _suffix_pass(model, first_row, batch, chunk, rows, scores, greedy) -> None:
    """The members' tokens after their group's prefix; `batch` is [(group, request)], longest suffix first.
    Their cache rows (from `first_row` on) start as copies of their groups' prefix rows."""
    device = model.tok_embeddings.weight.device
    starts = [len(chunk[g][0]) for g, _ in batch]
    suffixes = [rows[i][0][start:] for (_, i), start in zip(batch, starts, strict=True)]
    T = len(suffixes[0])
    tokens = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    picks, uses = [], []
    for b, ((_, i), start, suffix) in enumerate(zip(batch, starts, suffixes, strict=True)):
        tokens[b, : len(suffix)] = torch.tensor(suffix)
        # the row's positions, then its padding all at the slot after its last token: attended by no real token
        positions[b] = start + torch.arange(T).clamp(max=len(suffix))
        inp, cont = rows[i]
        first = len(inp) - len(cont)
        for j in range(max(first - start, 0), len(suffix)):  # a group's prefix ends after `first`: from 0
            picks.append((b, j))
            uses.append((i, start + j - first, len(picks) - 1, cont[start + j - first]))
    src = torch.tensor([g for g, _ in batch], device=device)
    prefix_len = max(starts)
    for layer in model.layers:
        c = layer.attention.cache
        for store in (c.k, c.v):
            store[first_row : first_row + len(batch), :, :prefix_len] = store[src, :, :prefix_len]
    with _rows(model, first_row, len(batch)):
        hidden = model.hidden(tokens.to(device), input_pos=positions.to(device), kv_len=int(positions.max()) + 1)
    _score(model, hidden, picks, uses, scores, greedy)


def _score(model, hidden, picks, uses, scores, greedy) -> None:
    """log_softmax of the output projection at `picks` only; each use reads its target's log-probability."""
    b, t = zip(*picks, strict=True)
    log_probs = model.ops.linear(hidden[torch.tensor(b), torch.tensor(t)], model.output).float().log_softmax(-1)
    request, k, pick, target = zip(*uses, strict=True)
    pick_t = torch.tensor(pick, device=log_probs.device)
    target_t = torch.tensor(target, device=log_probs.device)
    got = log_probs[pick_t, target_t].tolist()
    best = (log_probs.argmax(-1)[pick_t] == target_t).tolist()
    for i, kk, lp, g in zip(request, k, got, best, strict=True):
        scores[i][kk], greedy[i][kk] = lp, g


@contextmanager
def _own_cache(model: Transformer):
    """The model's layers get a KV cache of our own while inside (`_grow_cache`); the model's own (a `Llama`'s,
    which its prefix cache reuses) is put back untouched."""
    saved = [layer.attention.cache for layer in model.layers], model.max_batch_size, model.max_seq_len
    model.max_batch_size = model.max_seq_len = 0
    try:
        yield
    finally:
        for layer, cache in zip(model.layers, saved[0], strict=True):
            layer.attention.cache = cache
        model.max_batch_size, model.max_seq_len = saved[1], saved[2]


def _grow_cache(model: Transformer, batch: int, slots: int) -> None:
    """At least `batch` rows of `slots` slots (chunks come longest first: the first is usually the largest)."""
    if model.max_batch_size >= batch and model.max_seq_len >= slots:
        return
    batch, slots = max(batch, model.max_batch_size), max(slots, model.max_seq_len)
    w, a = model.tok_embeddings.weight, model.args
    dtype = model.ops.cache_dtype(w.dtype, w.device)
    for layer in model.layers:
        layer.attention.cache = KVCache(batch, slots, a.n_kv_heads, a.head_dim, dtype, w.device)
    model.max_batch_size, model.max_seq_len = batch, slots


@contextmanager
def _rows(model: Transformer, first: int, n: int):
    """The layers' caches narrowed to rows first..first+n-1 (a batch of n writes and reads there)."""
    full = [layer.attention.cache for layer in model.layers]
    for layer, cache in zip(model.layers, full, strict=True):
        layer.attention.cache = cache.rows(first, n)
    try:
        yield
    finally:
        for layer, cache in zip(model.layers, full, strict=True):
            layer.attention.cache = cache
