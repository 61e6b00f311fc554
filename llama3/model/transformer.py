"""The Llama 3 transformer in plain PyTorch, read top to bottom like Meta's reference `model.py`:
RMSNorm, RoPE, the KV cache, grouped-query attention, the SwiGLU feed-forward, the pre-norm block.

Each module computes the paper's math in its own `forward`. The few places where a faster form of the
same function may run instead (a projection, RoPE + the cache write, attention, SwiGLU, the block's
residual-fused norms) ask the backend, `ops`, chosen once by `llama3.model.backends.get_ops`; see that module.

Shapes: B batch, T new tokens, S cache slots, H query heads, KVH key/value heads, D head_dim.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.backends import TorchOps, get_ops
from llama3.model.config import ModelArgs
from llama3.model.functional import rope_inv_freq, rope_tables
from llama3.weights.build import load_model
from llama3.weights.hub import parse_device


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019): LayerNorm without the mean or bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalized in fp32 and rounded once to x's dtype (F.rms_norm computes 16-bit inputs in fp32),
        # then scaled: transformers' LlamaRMSNorm rounds in this order, so 16-bit outputs agree to the bit
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer, (B, KVH, S, D) each, written in place at slots `input_pos`.

    Fixed shapes and in-place writes keep the decode step free of allocation and host syncs, so a CUDA
    graph can capture it. `dtype` may be wider than the model's (see `TorchOps.cache_dtype`).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, KVH, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, T, KVH, D) at slots input_pos (B, T); returns the rows' keys, values (B, KVH, S, D)."""
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]
        # in place, through a (B, S, KVH, D) view so the two indexed dimensions are adjacent (the fast
        # path of index_put_, see TorchOps.rope_and_cache)
        self.k.transpose(1, 2).index_put_((rows, input_pos), k.to(self.k.dtype))
        self.v.transpose(1, 2).index_put_((rows, input_pos), v.to(self.v.dtype))
        return self.k[:B], self.v[:B]

    def rows(self, first: int, n: int) -> KVCache:
        """A cache over rows first..first+n-1 of this one, in the same memory (a batch of n writes there)."""
        view = KVCache(0, 0, 0, 0, self.k.dtype, self.k.device)
        view.k, view.v = self.k[first : first + n], self.v[first : first + n]
        return view


class Attention(nn.Module):
    """Multi-head attention with grouped-query attention (GQA, Ainslie et al. 2023): H query heads share
    KVH key/value heads in groups of H/KVH (Llama 3 8B: 32 and 8), so the cache holds KVH heads, not H."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # Meta's wq, wk, wv as one matmul: one read of the input; loaders, LoRA, TP and quantization use the name
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None, ops: type[TorchOps]
    ) -> Tensor:
        B, T, _ = x.shape  # x (B, T, dim)
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = ops.linear(x, self.wqkv)  # (B, T, (H + 2 KVH) D)
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q = q.view(B, T, H, D)  # (B, T, H, D)
        k, v = k.view(B, T, KVH, D), v.view(B, T, KVH, D)  # (B, T, KVH, D)
        # q, k = apply_rope(q), apply_rope(k); then keys, values = self.cache.update(input_pos, k, v), or,
        # without input_pos, this sequence's own k, v (the cache untouched). One call, so that a backend may
        # rotate k as it writes it.
        cache = self.cache if input_pos is not None else None
        q, keys, values = ops.rope_and_cache(q, k, v, cos, sin, cache, input_pos)  # q (B, T, H, D); (B, KVH, S, D)
        out = ops.attention(q, keys, values, mask, input_pos)  # softmax(q k^T / sqrt(D) + mask) v: (B, T, H, D)
        return ops.linear(out.reshape(B, T, H * D), self.wo)  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(x w1) * x w3)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # Meta's w1 (gate) and w3 (up), fused
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x: Tensor, ops: type[TorchOps]) -> Tensor:
        return ops.linear(ops.swiglu(ops.linear(x, self.w13)), self.w2)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None, ops: type[TorchOps]
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, ops)
        return h + self.feed_forward(self.ffn_norm(h), ops)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Passing the weight skips Embedding's init: on the meta device (checkpoint loading) its normal_
        # imports torch._dynamo, 1.5 s of a 2 s load. Real devices get the same N(0, 1) init below.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if self.tok_embeddings.weight.device.type != "meta":
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args, self.tok_embeddings.weight.device), persistent=False)

        self.ops: type[TorchOps] = TorchOps
        self.max_batch_size = self.max_seq_len = 0

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        quantize: str | None = None,
        progress: bool = True,
        group_size: int = 32,
        keep_output: bool = False,
        shard: Any = None,
        kernel: str | None = None,
    ) -> Transformer:
        """Loads a checkpoint: a local directory or file, or a Hugging Face repo id (`llama3.weights`).

        `quantize` "int8" or "int4" (with int4's `group_size`) stores the projections quantized, all but
        the output projection with `keep_output`. `shard`: this rank's part under tensor parallelism
        (`llama3.parallel.tp.TensorParallel`). `quantize="auto"` and `kernel`: the quantized CPU kernels, chosen
        per machine or forced (`llama3.weights.build.load_model`)."""
        ops = get_ops(backend, parse_device(device))  # an unknown or unusable backend is refused before loading
        model = load_model(
            src, device, dtype, quantize, progress, group_size, keep_output, shard, model_cls=cls, kernel=kernel
        )
        model.set_ops(ops)
        return model

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` would round the RoPE frequencies to bf16; recompute them in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.args, self.inv_freq.device)
        return self

    def set_ops(self, ops: type[TorchOps]) -> None:
        """Runs the model with `ops`: `TorchOps` or `TritonOps`, picked by `llama3.model.backends.get_ops`."""
        self.ops = ops
        self.max_batch_size = self.max_seq_len = 0  # the next setup_cache allocates the cache `ops` wants

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocates the static KV cache. Needed before calling the model with `input_pos`."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model's context of {self.args.max_seq_len}")
        if max_batch_size == self.max_batch_size and max_seq_len == self.max_seq_len:
            return
        w = self.tok_embeddings.weight
        dtype = self.ops.cache_dtype(w.dtype, w.device)
        for layer in self.layers:
            layer.attention.cache = KVCache(
                max_batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype, w.device
            )
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def _check_tokens(self, tokens: Tensor, check_ids: bool) -> None:
        """Shape and dtype always; the ids too when asked (a host sync, so not on the cached decode path,
        whose caller, `Llama`, checks the prompts and samples only ids of the vocabulary)."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be an integer tensor of shape (batch, seq_len), got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
            raise TypeError(
                f"tokens must be an integer tensor of shape (batch, seq_len), got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.numel() == 0:
            raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)})")
        if check_ids:
            outside = (tokens < 0) | (tokens >= self.args.vocab_size)
            if outside.any():
                b, t = outside.nonzero()[0].tolist()
                vocab = self.args.vocab_size
                raise ValueError(f"token id {tokens[b, t].item()} at [{b}, {t}] is outside the vocabulary [0, {vocab})")

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        logits_pos: Tensor | None = None,
        kv_len: int | None = None,
        run_block: Callable | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) at `logits_pos`.

        Without `input_pos` the sequence is attended causally from position 0 and no cache is touched.
        With it, token (b, t) is written at cache slot input_pos[b, t] (a (T,) input_pos serves every
        row) and attends to slots 0..input_pos[b, t]. A slot is a position: ragged batches are padded
        on the right, so every row computes exactly what it would compute alone.
        `logits_pos` (B,) picks one position per row (the last real token) so a prefill does not pay
        for the full (B, T, vocab) output projection. `kv_len`, a bound on the slots in use known on the
        host (> every input_pos), lets attention skip the empty rest of the cache; a CUDA graph, which
        must serve every step, leaves it None. `run_block(block, x, cos, sin, mask, input_pos, ops)` runs
        each block instead of the backend's `run_block`: the compiled decode step passes a
        `torch.compile`d `TransformerBlock.forward`, one graph that serves every layer (they differ only
        in their weights).
        """
        return self.ops.linear(self.hidden(tokens, input_pos, logits_pos, kv_len, run_block), self.output)

    def hidden(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        logits_pos: Tensor | None = None,
        kv_len: int | None = None,
        run_block: Callable | None = None,
    ) -> Tensor:
        """`forward` without the output projection: the final-normed hidden states (B, T or 1, dim), for a
        caller that needs logits at only some positions (fine-tuning's loss: the assistant tokens)."""
        self._check_tokens(tokens, check_ids=input_pos is None)
        B, T = tokens.shape
        if input_pos is None:
            positions, mask = torch.arange(T, device=tokens.device).expand(B, T), None
        else:
            if self.max_seq_len == 0:
                raise RuntimeError("call setup_cache(max_batch_size, max_seq_len) before passing input_pos")
            positions = input_pos.expand(B, T).contiguous()  # index_put is 100x slower on stride-0 indices
            slots = torch.arange(kv_len or self.max_seq_len, device=tokens.device)
            mask = (slots <= positions[..., None]).unsqueeze(1)  # (B, 1, T, S): causal over the cache
        cos, sin = rope_tables(positions[..., None].float() * self.inv_freq)  # angles (B, T, D/2) -> (B, T, 1, D)

        x = self.tok_embeddings(tokens)  # (B, T, dim)
        run_block = run_block or self.ops.run_block
        for layer in self.layers:
            x = run_block(layer, x, cos, sin, mask, positions if mask is not None else None, self.ops)
        if logits_pos is not None:
            x = x[torch.arange(B, device=tokens.device), logits_pos].unsqueeze(1)  # (B, 1, dim)
        return self.norm(x)
