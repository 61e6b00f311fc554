"""The Llama 3 transformer in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Read top to bottom: the math of each op (`TorchOps`), then the modules in the paper's order. The
Triton backend (`llama3.backends`) subclasses `TorchOps` and swaps in fused kernels; the modules
never ask which backend they run on.

Shapes: B batch, T new tokens, S cache slots, H query heads, KVH key/value heads, D head_dim.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.config import ModelArgs


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/D), fp32, with Llama 3.1's wavelength-dependent scaling.

    Computed on the CPU with the same fp32 ops as transformers, so angles (and logits) agree to the last
    bit, then moved to `device` (on the meta device these ops would also import torch._dynamo: seconds).
    """
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = args.rope_scaling
    if s is None:
        return inv_freq.to(device)
    L = s.original_max_position_embeddings
    wavelen = 2 * torch.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > L / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= L / s.high_freq_factor) & (wavelen <= L / s.low_freq_factor)
    return torch.where(in_band, blended, scaled).to(device)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half convention of HF checkpoints: pairs (x[i], x[i + D/2]).

    x: (B, T, heads, D); cos = cat(cos, cos), sin = cat(-sin, sin) as (B, T, 1, D) fp32 (see
    `TorchOps.rope_tables`). Rotated in fp32, as Meta's reference does; the same products and sums as
    transformers' `x * cos + rotate_half(x) * sin`, so fp32 results agree to the bit.
    """
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer, written in place at slots `input_pos`.

    Fixed shapes and in-place writes keep the decode step free of allocation and host syncs, so a
    CUDA graph can capture it.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, KVH, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class TorchOps:
    """The reference math of the ops a backend may fuse. Subclasses must compute the same function."""

    name = "torch"

    @staticmethod
    def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """How the KV cache stores keys and values computed in `dtype`.

        On the CPU a 16-bit model's cache is kept in fp32: the same (already rounded) values, but attention
        then reads them directly instead of converting the whole cache to fp32 at every layer of every
        step (CPUs without 16-bit units compute in fp32 anyway). Twice the cache memory, for decode
        attention 1.3x faster at 30 cached tokens and 1.7x at 500 (SmolLM2 shapes, 2-core CI CPU).
        """
        return torch.float32 if torch.device(device).type == "cpu" and dtype.itemsize == 2 else dtype

    @staticmethod
    def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles (B, T, D/2), laid out for `rotate`; built once per forward, used by every layer."""
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), dim=-1).unsqueeze(2), torch.cat((-sin, sin), dim=-1).unsqueeze(2)

    @staticmethod
    def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (norm(h) * weight, h) with h = x + residual: the residual add is fused with the norm."""
        h = x if residual is None else x + residual
        # x / sqrt(mean(x^2) + eps) computed in fp32 and rounded once to h's dtype (F.rms_norm does its
        # math in fp32 for 16-bit inputs), then scaled: transformers' order of rounding, bit for bit
        return weight * F.rms_norm(h, (h.shape[-1],), eps=eps), h

    @staticmethod
    def rope_and_cache(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        input_pos: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rotates q and k; with a cache, writes k and v at `input_pos` and returns the whole cache.

        input_pos is (B, T). Returns q (B, T, H, D) and keys, values as (B, KVH, S or T, D).
        """
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            return q, k.transpose(1, 2), v.transpose(1, 2)
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)[:, None]
        # In place (no allocation, capturable in a CUDA graph), through a (B, S, KVH, D) view so the two
        # indexed dimensions are adjacent: `cache.k[rows, :, input_pos] = k` takes a slow path (8 ms per
        # 32-token prefill write on the CI CPU, against 0.25 ms here).
        cache.k.transpose(1, 2).index_put_((rows, input_pos), k.to(cache.k.dtype))
        cache.v.transpose(1, 2).index_put_((rows, input_pos), v.to(cache.v.dtype))
        return q, cache.k[:B], cache.v[:B]

    @staticmethod
    def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """Softmax attention, each group of H/KVH query heads sharing one key/value head.

        q (B, T, H, D); keys, values (B, KVH, S, D); mask (B, 1, T, S) bool, or None for causal.
        Returns (B, T, H, D).
        """
        B, T, H, D = q.shape
        KVH = keys.shape[1]
        if mask is not None:  # the mask covers the slots in use (kv_len); the rest of the cache is empty
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
        dtype = q.dtype
        q = q.to(keys.dtype)  # a cache kept in fp32 (see `cache_dtype`) is attended in fp32
        if T == 1 and mask is not None:
            # Decode: one query per row, so the H/KVH query heads sharing a key/value head can be that
            # head's queries: (B, KVH, H/KVH, D) against (B, KVH, S, D), with no copies of K and V
            out = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), keys, values, attn_mask=mask)
            return out.to(dtype).view(B, 1, H, D)
        q = q.transpose(1, 2)
        if mask is not None and q.is_cuda and H != KVH:
            # Flash attention takes no mask; the memory-efficient kernel takes one but not grouped heads in
            # every torch release, leaving the O(T^2)-memory math kernel. Expanded heads cost one copy of K, V.
            keys, values = keys.repeat_interleave(H // KVH, dim=1), values.repeat_interleave(H // KVH, dim=1)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != keys.shape[1]
        )
        return out.transpose(1, 2).to(dtype)

    @staticmethod
    def swiglu(gate_up: Tensor) -> Tensor:
        """silu(gate) * up, with gate and up side by side in the last dimension (one fused matmul)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def linear(x: Tensor, layer: nn.Module) -> Tensor:
        """x @ weight.T for every projection, so a backend can pick its own matrix-vector product for decode.

        `layer` is an `nn.Linear`, or a module holding a quantized weight (`llama3.quantize`) that runs
        its own kernel."""
        if not isinstance(layer, nn.Linear):
            return layer(x)
        w, rows = layer.weight, x.shape[0]
        if w.device.type == "cpu" and w.dtype == torch.float32 and x.shape[1:-1] == (1,) and 1 < rows <= 64:
            # A decode step of a few rows: MKL computes weight @ x.T 1.2-3.5x faster than x @ weight.T on
            # 2 threads (a 128,256-token output projection for 16 rows: 39 against 58 ms), the same products
            # in another order. The result is that product's transpose, a view. (Prefill keeps F.linear,
            # transformers' kernel, so prompt logits match it to the last bits.)
            return torch.mm(w, x.reshape(rows, -1).t()).t().view(*x.shape[:-1], -1)
        return F.linear(x, w)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one matmul: one read of the input, one launch
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, ops: type[TorchOps]) -> Tensor:
        B, T, _ = x.shape
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = ops.linear(x, self.wqkv).split([H * D, KVH * D, KVH * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, KVH, D), v.view(B, T, KVH, D)
        cache = self.cache if input_pos is not None else None  # a cache-free forward must not touch it
        q, keys, values = ops.rope_and_cache(q, k, v, cos, sin, cache, input_pos)
        out = ops.attention(q, keys, values, mask, input_pos)  # (B, T, H, D)
        return ops.linear(out.reshape(B, T, H * D), self.wo)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # gate (w1) and up (w3), fused
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x: Tensor, ops: type[TorchOps]) -> Tensor:
        return ops.linear(ops.swiglu(ops.linear(x, self.w13)), self.w2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, residual, cos, sin, mask, input_pos, ops) -> tuple[Tensor, Tensor]:
        """Pre-norm block. Returns (block output, residual stream before it) so the next norm can fuse the add."""
        normed, h = ops.rms_norm(x, self.attention_norm.weight, self.attention_norm.eps, residual)
        attn = self.attention(normed, cos, sin, mask, input_pos, ops)
        normed, h = ops.rms_norm(attn, self.ffn_norm.weight, self.ffn_norm.eps, h)
        return self.feed_forward(normed, ops), h


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
    ) -> Transformer:
        """Loads a checkpoint: a local directory or file, or a Hugging Face repo id. See `llama3.checkpoint`.

        `quantize` "int8" or "int4" (with int4's `group_size`) stores the projections quantized, all but
        the output projection with `keep_output`."""
        from llama3.checkpoint import load_model

        return load_model(src, device, dtype, backend, quantize, progress, group_size, keep_output)

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` would round the RoPE frequencies to bf16; recompute them in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.args, self.inv_freq.device)
        return self

    def set_ops(self, ops: type[TorchOps]) -> None:
        """Runs the model with `ops`: `TorchOps` or a backend's subclass, picked by `llama3.backends.get_ops`."""
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
        must serve every step, leaves it None. `run_block(block, *inputs)` runs each block instead of
        calling it: the compiled decode step passes a `torch.compile`d `TransformerBlock.forward`, one
        graph that serves every layer (they differ only in their weights).
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
        cos, sin = self.ops.rope_tables(positions[..., None].float() * self.inv_freq)  # angles (B, T, D/2)

        x, residual = self.tok_embeddings(tokens), None
        run_block = run_block or TransformerBlock.__call__
        for layer in self.layers:
            x, residual = run_block(
                layer, x, residual, cos, sin, mask, positions if mask is not None else None, self.ops
            )
        if logits_pos is not None:
            rows = torch.arange(B, device=tokens.device)
            x, residual = x[rows, logits_pos].unsqueeze(1), residual[rows, logits_pos].unsqueeze(1)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]
