"""Chooses the implementation of the fused ops: plain PyTorch (`TorchOps`) or Triton kernels.

This is the one place a backend is picked. Both compute the same function; the Triton one fuses
the residual add into RMSNorm, RoPE into the KV-cache write, uses flash-decoding for the
one-token decode step, and a split-K GEMV for the decode step's projections wherever it measures
faster than cuBLAS on the GPU at hand. Quantized projections (`llama3.quantize`, "gpu" layout) run the
int8 / int4 kernels of `llama3.kernels.quant_gemv`, which dequantize inside the matmul.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model import KVCache, TorchOps
from llama3.quantize import Int4Linear, Int8Linear

BACKENDS = ("auto", "torch", "triton")


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
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
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


class TritonOps(TorchOps):
    name = "triton"

    @staticmethod
    def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
        return angles.cos(), angles.sin()  # (B, T, D/2): the kernel pairs x[i] with x[i + D/2] itself

    @staticmethod
    def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        from llama3.kernels.rms_norm import rms_norm

        return rms_norm(x, weight, eps, residual)

    @staticmethod
    def rope_and_cache(q, k, v, cos, sin, cache: KVCache | None, input_pos):
        from llama3.kernels.rope import apply_rope_reference, rope_and_cache

        if cache is None:  # the cache-free forward is not a hot path: the kernel's PyTorch reference
            return (
                apply_rope_reference(q, cos, sin),
                apply_rope_reference(k, cos, sin).transpose(1, 2),
                v.transpose(1, 2),
            )

        B = q.shape[0]
        q = rope_and_cache(q, k, v, cos, sin, cache.k, cache.v, input_pos)
        return q, cache.k[:B], cache.v[:B]

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
