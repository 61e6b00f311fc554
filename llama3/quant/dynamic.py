"""Dynamic int8: int8 weights per output channel times activations quantized to 8 bits at every call.

The scheme llama.cpp runs on CPUs (8-bit activations, integer dot products), here through fbgemm, PyTorch's x86
int8 GEMM library (`torch.ops.quantized.linear_dynamic`): one call takes the float32 activations, finds their
range, quantizes them to uint8 (asymmetric, one scale and zero point per call), multiplies them by the int8
weight in integer arithmetic and returns float32. There is no dtype round trip around it: the model stays
float32, and the matmul is the only op of a projection. On SmolLM2's shapes it is the fastest CPU kernel
measured, AVX2 and AVX-512 alike (benchmarks/results/kernels-cpu.md, docs/quantization.md).

The math, per row of x (fbgemm quantizes a whole call with one scale; a call of several rows, a prompt, is made
one call per row here, so that a token's result never depends on the other tokens of its batch: measured on
SmolLM2, one scale for a 512-token window took perplexity from 24.4 to 66.5). fbgemm's `ChooseQuantizationParams`:
    lo, hi = min(min(x), 0), max(max(x), 0)
    s = (hi - lo) / qmax,  z = clamp(round(-lo / s), 0, qmax)
    x_q = clamp(round(x / s) + z, 0, qmax)
    y[n] = s * scale[n] * sum_k (x_q[k] - z) * q[n, k]
qmax is 255 where the CPU has AVX512-VNNI, else 127 (`reduce_range`): fbgemm's AVX2 kernel adds pairs of
uint8 x int8 products in saturating int16, and 7-bit activations keep every pair below 2^15 (2 * 127 * 127 =
32258), as PyTorch's own dynamic `nn.quantized.dynamic.Linear` does. The 8th bit matters: on SmolLM2 (Hamlet)
the output projection alone in this form cost 0.29% of perplexity with 8 bits, and 1.7% with 7 (emulated);
every projection 3.4% with 8 bits (`llama3.quant.choice`).

fbgemm's prepack (reordering the codes into its blocked layout) is slow and single-threaded: 0.43 s for SmolLM2's
49152x576 output projection, a tenth of a cold start. It runs in a background thread (the op releases the GIL)
while the rest of the model loads; `packed` waits for it on first use.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from llama3.quant.isa import fbgemm_vnni
from llama3.quant.weight_only import QuantizedWeight, QuantizeError, dequantize_int8, quantize, quantized_linear


class DynInt8Linear(nn.Module):
    """y = dequantize(quantize(x) @ q.T): float32 in, float32 out, one fbgemm call.

    Built from int8 codes (one scale per output row). A 4-bit weight (a GGUF file's Q4 codes) is requantized
    per row to int8 first: fbgemm has no 4-bit kernel. The codes live only in fbgemm's packed form (a
    TorchScript object, not a buffer: the module's state_dict is empty); `dequantize` reads them back.
    """

    mode = "int8"
    kernel = "fbgemm"

    def __init__(self, q: QuantizedWeight, reduce_range: bool | None = None):
        super().__init__()
        # 7-bit activations unless the CPU adds the products in int32 (see the module docstring)
        self.reduce_range = not fbgemm_vnni() if reduce_range is None else reduce_range
        if q.mode != "int8":
            q = quantize(q.dequantize(), "int8")
        self.out_features, self.in_features = q.shape
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # PyTorch deprecates its quantized-tensor constructors for torchao's
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            weight = torch._make_per_channel_quantized_tensor(q.codes.contiguous(), q.scales.double(), zero_points, 0)
        self._weight, self._packed, self._pid = weight, None, os.getpid()
        self._packing: Future | None = _prepacker().submit(torch.ops.quantized.linear_prepack, weight, None)

    @property
    def packed(self) -> torch.ScriptObject:
        """fbgemm's packed weight (waits for the background prepack the first time)."""
        if self._packed is None:
            if os.getpid() != self._pid and not self._packing.done():  # a forked child: the thread is not here
                self._packed = torch.ops.quantized.linear_prepack(self._weight, None)
            else:
                self._packed = self._packing.result()
            self._weight = self._packing = None
        return self._packed

    def __getstate__(self) -> dict:  # copy/pickle the packed weight, never the thread's future
        self.packed  # noqa: B018
        return super().__getstate__()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:  # the output projection of a bfloat16 model (int4 elsewhere)
            x = x.float()
        if x.numel() == self.in_features:  # decode: one row, one call
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        rows = x.reshape(-1, 1, self.in_features)
        out = torch.cat([torch.ops.quantized.linear_dynamic(row, self.packed, self.reduce_range) for row in rows])
        return out.view(*x.shape[:-1], self.out_features)

    def weight_codes(self) -> QuantizedWeight:
        """The int8 codes and per-row scales fbgemm holds."""
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return QuantizedWeight("int8", weight.int_repr(), weight.q_per_channel_scales().float())

    def dequantize(self) -> Tensor:
        """The float32 weight this layer multiplies by."""
        q = self.weight_codes()
        return dequantize_int8(q.codes, q.scales)

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return f"in_features={self.in_features}, out_features={self.out_features}, {bits}-bit activations"


_PREPACKER: ThreadPoolExecutor | None = None


def _prepacker() -> ThreadPoolExecutor:
    """One worker: prepacks queue behind each other and leave the other cores to the loading thread."""
    global _PREPACKER
    if _PREPACKER is None:
        _PREPACKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama3-prepack")
    return _PREPACKER


def check_dynamic_settings(device: torch.device | str, dtype: torch.dtype) -> None:
    """fbgemm runs on x86 CPUs, with float32 activations."""
    if torch.device(device).type != "cpu":
        raise QuantizeError(f"the fbgemm int8 kernel runs on the CPU, not {device}")
    if dtype != torch.float32:
        raise QuantizeError(f"the fbgemm int8 kernel takes float32 activations, got {dtype}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise QuantizeError("this PyTorch build has no fbgemm (x86 CPUs only); choose another kernel")


KERNELS = (
    "torch",
    "fbgemm",
    "dot",
)  # what runs quantized weights on the CPU: PyTorch's weight-only kernels (int8 on fbgemm's dynamic one with
# "fbgemm"), or llama3's own integer dot products for int4 and int8 alike ("dot", `llama3.quant.dot`)


def make_linear(
    q: QuantizedWeight, dtype: torch.dtype, device: torch.device, layout: str | None = None, kernel: str = "torch"
) -> nn.Module:
    """The module that runs `q`: with `kernel="fbgemm"` an int8 weight runs on fbgemm (`DynInt8Linear`), with
    `kernel="dot"` any weight on llama3's dot-product kernels (`DotLinear`), anything else as
    `llama3.quant.weight_only.quantized_linear` builds it."""
    if kernel == "dot":
        from llama3.quant.dot import DotLinear

        return DotLinear(q)
    if kernel == "fbgemm" and q.mode == "int8":
        check_dynamic_settings(device, torch.float32)
        return DynInt8Linear(q)
    return quantized_linear(q, dtype, device, layout)
