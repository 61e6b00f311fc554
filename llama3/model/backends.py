"""Backends: the one place where faster forms of the model's math live, each equal to the reference.

`llama3.model` computes the paper's math in its modules' `forward`s and consults a backend, `ops`, at five
named seams: `linear` (every projection; the reference is F.linear), `rope_and_cache` (`apply_rope` on q
and k, then `KVCache.update`), `attention` (the reference `attention`), `swiglu` (the reference `swiglu`)
and `run_block` (`TransformerBlock.forward`). A backend is a class of static methods, chosen once by
`get_ops` and stored on the model (`Transformer.set_ops`). `TorchOps`, the PyTorch backend and the default,
runs the reference forms with the CPU's speed-ups: a 16-bit model's cache kept in fp32, the decode step's
projections as weight @ x.T, grouped-query decode attention without copies of K and V. `TritonOps` swaps in
the Triton kernels of `llama3.kernels`: RMSNorm with the block's residual add fused in, RoPE fused into the
cache write, flash-decoding, a split-K GEMV and the int8/int4 GEMVs. tests/test_backends.py proves each
form equal to the reference on random inputs.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.functional import apply_rope, attention, swiglu
from llama3.quant.dot import DotLinear
from llama3.quant.weight_only import Int4Linear, Int8Linear

BACKENDS = ("auto", "torch", "cpu", "triton")


def triton_missing() -> str | None:
    """Why the Triton backend cannot load here, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    if importlib.util.find_spec("llama3.kernels") is None:  # kernels/ ships as llama3.kernels when installed
        return "llama3.kernels is not importable: install this package (pip install -e .), not just its checkout"
    return None


def get_ops(backend: str, device: torch.device | str) -> type[TorchOps]:
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return TorchOps
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs on the CPU, not {device.type}")
        return CpuOps
    if backend == "auto" and device.type != "cuda":
        return TorchOps
    missing = triton_missing()
    if backend == "auto":
        if missing:  # the same numbers, only slower: say so once
            warnings.warn(f"using the PyTorch backend on CUDA (slower): {missing}", stacklevel=3)
            return TorchOps
        return TritonOps
    if missing:
        raise RuntimeError(f"backend='triton' cannot run: {missing}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' runs on CUDA devices, not {device.type}; "
            "set TRITON_INTERPRET=1 before importing llama3 to run the kernels on CPU (slow, for tests)"
        )
    return TritonOps


class TorchOps:
    """The reference forms in PyTorch, with the speed-ups measured on the CPU (numbers: the 2-core CI CPU)."""

    name = "torch"

    @staticmethod
    def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """How the KV cache stores keys and values computed in `dtype`.

        On the CPU a 16-bit model's cache is kept in fp32: the same (already rounded) values, but attention
        then reads them directly instead of converting the whole cache to fp32 at every layer of every
        step (CPUs without 16-bit units compute in fp32 anyway). Twice the cache memory, for decode
        attention 1.3x faster at 30 cached tokens and 1.7x at 500 (SmolLM2 shapes).
        """
        return torch.float32 if torch.device(device).type == "cpu" and dtype.itemsize == 2 else dtype

    @staticmethod
    def run_block(layer: nn.Module, x: Tensor, cos, sin, mask, input_pos, ops) -> Tensor:
        """The reference: the block's own `forward` (`TransformerBlock.forward`)."""
        return layer(x, cos, sin, mask, input_pos, ops)

    swiglu = staticmethod(swiglu)

    @staticmethod
    def rope_and_cache(
        q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache: nn.Module | None, input_pos: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """apply_rope(q), and keys, values: KVCache.update(input_pos, apply_rope(k), v), or without a cache
        this sequence's own (B, KVH, T, D).

        The cache writes in place through a (B, S, KVH, D) view so the two indexed dimensions are adjacent:
        `cache.k[rows, :, input_pos] = k` takes a slow path (8 ms per 32-token prefill write, against
        0.25 ms).
        """
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            return q, k.transpose(1, 2), v.transpose(1, 2)
        return (q, *cache.update(input_pos, k, v))

    @staticmethod
    def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """The reference `attention` over the slots the mask covers (kv_len: the rest of the cache is empty)."""
        B, T, H, D = q.shape
        KVH = keys.shape[1]
        if mask is not None:
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
        if T == 1 and mask is not None:
            # Decode: one query per row, so the H/KVH query heads sharing a key/value head can be that
            # head's queries: (B, KVH, H/KVH, D) against (B, KVH, S, D), with no copies of K and V
            out = F.scaled_dot_product_attention(
                q.to(keys.dtype).view(B, KVH, H // KVH, D), keys, values, attn_mask=mask
            )
            return out.to(q.dtype).view(B, 1, H, D)
        if mask is not None and q.is_cuda and H != KVH:
            # Flash attention takes no mask; the memory-efficient kernel takes one but not grouped heads in
            # every torch release, leaving the O(T^2)-memory math kernel. Expanded heads cost one copy of K, V.
            keys, values = keys.repeat_interleave(H // KVH, dim=1), values.repeat_interleave(H // KVH, dim=1)
        return attention(q, keys, values, mask)

    @staticmethod
    def linear(x: Tensor, layer: nn.Module) -> Tensor:
        """F.linear(x, layer.weight); `layer` is an `nn.Linear`, or a module holding a quantized weight
        (`llama3.quant.weight_only`) that runs its own kernel."""
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


class _DecodeStep:
    """What every layer of one decode step shares, built by the step's first layer: the rows written
    (B, 1), the slots (B, 1) and the mask as an additive float tensor (B, 1, 1, kv_len), which SDPA would
    otherwise make from the boolean mask at every layer. A step is recognised by its RoPE table, the one
    tensor `Transformer.hidden` passes to every layer of a step (held here, so its id is not reused). One per
    thread: two threads decoding at once (a server's engine and a caller's `generate`) each keep their own."""

    _current = threading.local()

    def __init__(self, cos: Tensor, mask: Tensor, input_pos: Tensor):
        self.cos = cos
        self.rows = torch.arange(input_pos.shape[0], device=input_pos.device)[:, None]
        self.pos = input_pos
        self.slot = input_pos.view(1) if input_pos.shape[0] == 1 else None  # one row: index_copy_'s index
        self.mask = torch.zeros(mask.shape, dtype=cos.dtype, device=mask.device).masked_fill_(~mask, -torch.inf)

    @classmethod
    def of(cls, cos: Tensor, mask: Tensor, input_pos: Tensor) -> _DecodeStep:
        step = getattr(cls._current, "step", None)
        if step is None or step.cos is not cos:
            step = cls._current.step = cls(cos, mask, input_pos)
        return step


# Bumped whenever any module gets a submodule, parameter or buffer assigned (`setup_cache`'s new caches, a LoRA
# adapter's wrapper, a replaced weight): each block's `_LeanLayer` is then gathered again.
_generation = [0]


def _bump(*_) -> None:
    _generation[0] += 1


class _LeanLayer:
    """What the lean step reads of one block, gathered once instead of at every step: nn.Module's attribute
    lookups (`layer.attention.wqkv.packed`: a submodule, then a buffer, each through `Module.__getattr__`) cost
    about as much as the small ops they feed (with the direct kernel calls and the single-row cache write below:
    15.6 against 13.2 ms a SmolLM2 int4 step, the same logits; docs/benchmarks.md). Valid while `_generation`
    is unchanged, and in the inference mode it was gathered in; the hooks are the modules' own dicts, which
    registering a hook fills in place."""

    _watching = False

    def __init__(self, layer: nn.Module):
        if not _LeanLayer._watching:  # once per process: the module-tree changes that make a gathered block stale
            for register in (
                nn.modules.module.register_module_module_registration_hook,
                nn.modules.module.register_module_buffer_registration_hook,
                nn.modules.module.register_module_parameter_registration_hook,
            ):
                register(_bump)
            _LeanLayer._watching = True
        attn, ffn, cache = layer.attention, layer.feed_forward, layer.attention.cache
        self.generation = _generation[0]
        # views made under inference_mode may not be written outside it (and the reverse is allowed): kept per mode
        self.inference = torch.is_inference_mode_enabled()
        modules = (layer, layer.attention_norm, attn, layer.ffn_norm, ffn)
        self.hooks = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))
        self.heads = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.attention_norm = layer.attention_norm.weight, layer.attention_norm.eps
        self.ffn_norm = layer.ffn_norm.weight, layer.ffn_norm.eps
        self.wqkv, self.wo, self.w13, self.w2 = (_projection(m) for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2))
        self.k, self.v = cache.k, cache.v
        # the first row's cache as (1, S, KVH, D) views: a single row's step writes its slot in one op each
        self.k_slots, self.v_slots = cache.k[:1].transpose(1, 2), cache.v[:1].transpose(1, 2)

    @staticmethod
    def of(layer: nn.Module) -> _LeanLayer | None:
        """The block's gathered form, or None where the reference must run it: a hook waits on a module whose
        `forward` the reference block calls (tensor parallelism's all-reduces, an inspection hook), and the
        lean step calls none of them."""
        lean = layer.__dict__.get("_lean")
        if lean is None or lean.generation != _generation[0] or lean.inference != torch.is_inference_mode_enabled():
            lean = layer._lean = _LeanLayer(layer)
        if any(lean.hooks) or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        return lean


def _projection(layer: nn.Module) -> tuple | nn.Module:
    """An int4 layer packed for the CPU whose rows need no padding: its kernel's arguments, called without the
    module's reshapes and slice (Int4Linear.forward, the same call); anything else: the layer, for `ops.linear`."""
    if type(layer) is Int4Linear and layer.layout == "cpu" and layer.out_features % 16 == 0:
        return layer.packed, layer.group_size, layer.scales_and_zeros
    return layer


def _project(x: Tensor, layer: tuple | nn.Module, ops) -> Tensor:
    if type(layer) is tuple:
        return torch._weight_int4pack_mm_for_cpu(x, *layer)
    if type(layer) is DotLinear:  # its forward without nn.Module's call, as the int4 kernel's above
        return layer.forward(x)
    return ops.linear(x, layer)


class CpuOps(TorchOps):
    """The PyTorch backend with a lean decode step: `run_block` computes one new token per row (T = 1, with a
    cache) in about 28 aten ops per layer in float32 and 33 with bfloat16 activations (the embedded SmolLM2,
    benchmarks/cpu_defaults.py), against the reference's ~50 (tests/test_cpu_backend.py holds the lean step to 40
    and the reference above it), with the same products in the same order and the reference's
    roundings, so its logits equal the reference's. Everything else (prefill, a cache-free forward, a block with
    hooks) is the reference. The default on the CPU."""

    name = "cpu"

    @staticmethod
    def run_block(layer: nn.Module, x: Tensor, cos, sin, mask, input_pos, ops) -> Tensor:
        B, T, dim = x.shape
        lean = None
        if T == 1 and mask is not None and x.dtype in (torch.float32, torch.bfloat16):
            lean = _LeanLayer.of(layer)
        if lean is None:
            return layer(x, cos, sin, mask, input_pos, ops)
        step = _DecodeStep.of(cos, mask, input_pos)
        x = x.view(B, dim)  # rows: the int4 kernel takes 2-d activations
        H, KVH, D = lean.heads
        qkv = _project(_rms_norm(x, *lean.attention_norm), lean.wqkv, ops).view(B, 1, H + 2 * KVH, D)
        if qkv.dtype != lean.k.dtype:  # 16-bit activations: RoPE in fp32 (apply_rope), the cache in fp32
            qkv = qkv.to(lean.k.dtype)
        qk, v = qkv.split([H + KVH, KVH], dim=2)
        # apply_rope on q and k together, cos and sin (B, 1, 1, D) broadcast over their heads; (a * b).add_(c * d)
        # rounds as a * b + c * d does (addcmul fuses the last multiply-add: 1 ulp away)
        qk = (qk * cos).add_(qk.roll(D // 2, dims=-1).mul_(sin))
        if x.dtype != qk.dtype:  # apply_rope returns x's dtype: the reference's rounding, then the cache's dtype
            qk = qk.to(x.dtype).to(qk.dtype)
        q, k = qk.split([H, KVH], dim=2)
        # KVCache.update: cache[rows, :, pos] = k (B, 1, KVH, D), without the per-layer index tensor. One row:
        # index_copy_ into the row's (1, S, KVH, D) view (0.6 ms faster a SmolLM2 step); several: aten's index_put_,
        # which takes the open dimension as None (Python's [] adds a view)
        if step.slot is not None:
            lean.k_slots.index_copy_(1, step.slot, k)
            lean.v_slots.index_copy_(1, step.slot, v)
        else:
            torch.ops.aten.index_put_(lean.k, (step.rows, None, step.pos), k)
            torch.ops.aten.index_put_(lean.v, (step.rows, None, step.pos), v)
        kv_len = mask.shape[-1]
        keys, values = lean.k[:B, :, :kv_len], lean.v[:B, :, :kv_len]
        # TorchOps.attention's decode form: the H/KVH query heads of a key/value head as its queries
        out = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), keys, values, attn_mask=step.mask)
        x = x + _project(out.view(B, H * D).to(x.dtype), lean.wo, ops)
        gate_up = _project(_rms_norm(x, *lean.ffn_norm), lean.w13, ops)
        return (x + _project(ops.swiglu(gate_up), lean.w2, ops)).view(B, 1, dim)

    @staticmethod
    def linear(x: Tensor, layer: nn.Module) -> Tensor:
        """TorchOps.linear, taking the lean step's rows (B, dim) as TorchOps takes (B, 1, dim): a few rows of
        float32 as weight @ x.T, the same product. An int4 layer packed for the CPU whose rows need no padding
        runs its kernel here, without the module's reshapes and slice (Int4Linear.forward, the same call)."""
        if x.dim() == 2:
            if type(layer) is Int4Linear and layer.layout == "cpu" and layer.out_features % 16 == 0:
                return torch._weight_int4pack_mm_for_cpu(x, layer.packed, layer.group_size, layer.scales_and_zeros)
            if type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and 1 < x.shape[0] <= 64:
                return torch.mm(layer.weight, x.t()).t()
        return TorchOps.linear(x, layer)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm.forward: in float32 with the weight inside F.rms_norm (the same products, one op); in 16 bits
    as RMSNorm rounds, normalized then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class TritonOps(TorchOps):
    name = "triton"

    @staticmethod
    def run_block(layer: nn.Module, x: Tensor, cos, sin, mask, input_pos, ops) -> Tensor:
        """`TransformerBlock.forward` with the residual add inside the second norm's kernel:
        (norm(h), h) with h = x + attention(norm(x)) in one pass over h."""
        from llama3.kernels.rms_norm import rms_norm

        normed, _ = rms_norm(x, layer.attention_norm.weight, layer.attention_norm.eps)
        attn = layer.attention(normed, cos, sin, mask, input_pos, ops)
        normed, h = rms_norm(attn, layer.ffn_norm.weight, layer.ffn_norm.eps, x)
        return h + layer.feed_forward(normed, ops)

    @staticmethod
    def rope_and_cache(q, k, v, cos, sin, cache: nn.Module | None, input_pos):
        if cache is None:  # the cache-free forward is not a hot path
            return TorchOps.rope_and_cache(q, k, v, cos, sin, None, None)
        from llama3.kernels.rope import rope_and_cache

        # the kernel pairs x[i] with x[i + D/2] itself: it takes cos and sin once, (B, T, D/2) views of
        # the reference tables cat(cos, cos) and cat(-sin, sin)
        half = q.shape[-1] // 2
        q = rope_and_cache(q, k, v, cos[:, :, 0, :half], sin[:, :, 0, half:], cache.k, cache.v, input_pos)
        return q, cache.k[: q.shape[0]], cache.v[: q.shape[0]]

    @staticmethod
    def attention(q, keys, values, mask, input_pos):
        if q.shape[1] != 1 or mask is None:  # prefill: PyTorch SDPA (flash attention on CUDA)
            return TorchOps.attention(q, keys, values, mask, input_pos)
        from llama3.kernels.decode_attention import decode_attention

        # one new token per row: row b attends to cache slots 0..input_pos[b]
        return decode_attention(q[:, 0], keys, values, input_pos[:, 0]).unsqueeze(1)

    @staticmethod
    def swiglu(gate_up: Tensor) -> Tensor:
        from llama3.kernels.swiglu import swiglu

        return swiglu(gate_up)

    @staticmethod
    def linear(x: Tensor, layer: nn.Module) -> Tensor:
        from llama3.kernels.gemv import best_gemv_config, gemv

        if not isinstance(layer, nn.Linear):
            if isinstance(layer, (Int8Linear, Int4Linear)) and layer.layout == "gpu":  # codes our kernels read
                from llama3.kernels.quant_gemv import quantized_matmul

                return quantized_matmul(x, layer)
            return layer(x)  # codes packed for PyTorch's CPU kernels (the interpreter, in tests) run those
        weight = layer.weight
        rows = x.numel() // x.shape[-1]
        if rows > 16:  # prefill: a matrix-matrix product, cuBLAS's home ground
            return F.linear(x, weight)
        if x.device.type != "cuda":  # the interpreter (tests): always the kernel, nothing to time
            return gemv(x, weight)
        config = best_gemv_config(rows, weight)  # (num_splits, block_n), or None: cuBLAS is faster here
        return F.linear(x, weight) if config is None else gemv(x, weight, *config)
