"""Weight-only quantization: int8 per output channel, int4 per group of inputs, and the linear layers that run them.

int8 (symmetric): w ~ q * scale with q in -127..127 and one scale per output row.
int4 (asymmetric): w ~ (q - 8) * scale + zero with q in 0..15, one (scale, zero) per group of `group_size`
consecutive inputs of a row: the form PyTorch's int4 kernels take (gpt-fast and torchao use them too), onto
which GGUF's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m, so zero = m + 8d) blocks map with the same codes.

Activations stay in the model's dtype; the kernels are PyTorch's (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`), which are fast with bfloat16 activations on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 32  # GGUF's Q4 block; on the 2-core CI CPU no larger group was faster (see README)


class QuantizeError(ValueError):
    """A weight or setting that cannot be quantized as asked (mode, group size, shape, device, dtype)."""


@dataclass
class QuantizedWeight:
    """The integer codes and scales of one (N, K) weight, before they are packed for a kernel."""

    mode: str  # "int8" or "int4"
    codes: Tensor  # int8: int8 (N, K); int4: uint8 (N, K) holding 0..15
    scales: Tensor  # fp32; int8: (N,); int4: (N, K // group_size)
    zeros: Tensor | None = None  # int4: fp32 (N, K // group_size)
    group_size: int | None = None  # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        """The float32 weight these codes stand for."""
        if self.mode == "int8":
            return self.codes.float() * self.scales[:, None]
        g = self.group_size
        scales, zeros = self.scales.repeat_interleave(g, dim=1), self.zeros.repeat_interleave(g, dim=1)
        return (self.codes.float() - 8) * scales + zeros

    def permute_rows(self, order: Tensor) -> QuantizedWeight:
        """The same weight with its output rows reordered (as the q/k RoPE permutation reorders rows)."""
        pick = lambda t: None if t is None else t[order]
        return QuantizedWeight(self.mode, self.codes[order], self.scales[order], pick(self.zeros), self.group_size)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Row blocks stacked into one weight (q, k, v into wqkv; gate and up into w13)."""
        first = parts[0]
        if any((p.mode, p.group_size, p.shape[1]) != (first.mode, first.group_size, first.shape[1]) for p in parts):
            raise QuantizeError("cannot fuse weights quantized differently: " + ", ".join(str(p) for p in parts))
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return QuantizedWeight(
            first.mode,
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            zeros,
            first.group_size,
        )

    def __str__(self) -> str:
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.mode} {self.shape[0]}x{self.shape[1]}{group}"

    def stored(self) -> dict[str, Tensor]:
        """The tensors a quantized checkpoint holds for this weight: `qweight` (int8 codes, or two 4-bit
        codes per byte, element 2j in the low nibble of byte j), `scales` and, for int4, `zeros` (fp32)."""
        if self.mode == "int8":
            return {"qweight": self.codes, "scales": self.scales}
        packed = self.codes[:, 0::2] | (self.codes[:, 1::2] << 4)
        return {"qweight": packed, "scales": self.scales, "zeros": self.zeros}

    @staticmethod
    def from_stored(mode: str, group_size: int | None, parts: dict[str, Tensor], name: str) -> QuantizedWeight:
        """The inverse of `stored`, checking that the parts fit together (`name` is for errors)."""
        expected = {"qweight", "scales"} | ({"zeros"} if mode == "int4" else set())
        if set(parts) != expected:
            raise QuantizeError(f"{name}: a {mode} weight needs {sorted(expected)}, found {sorted(parts)}")
        qweight, scales = parts["qweight"], parts["scales"].float()
        if mode == "int8":
            q = QuantizedWeight("int8", qweight, scales)
            ok = qweight.dtype == torch.int8 and qweight.dim() == 2 and scales.shape == (qweight.shape[0],)
        else:
            codes = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
            q = QuantizedWeight("int4", codes, scales, parts["zeros"].float(), group_size)
            groups = (codes.shape[0], codes.shape[1] // group_size)
            ok = qweight.dtype == torch.uint8 and scales.shape == groups and q.zeros.shape == groups
        if not ok:
            shapes = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in parts.items()}
            raise QuantizeError(f"{name}: the stored {mode} tensors do not fit together: {shapes}")
        return q


def quantize(w: Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of a float (N, K) weight; every code error is at most half a scale step."""
    if w.dim() != 2:
        raise QuantizeError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    w = w.float()
    if mode == "int8":
        scales = w.abs().amax(dim=1) / 127
        codes = (w / scales.where(scales > 0, 1)[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", codes, scales)
    if mode != "int4":
        raise QuantizeError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    check_group_size(group_size, w.shape[1], name)
    N, K = w.shape
    groups = w.reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low) / 15
    codes = ((groups - low[..., None]) / scales.where(scales > 0, 1)[..., None]).round().clamp(0, 15)
    zeros = low + 8 * scales  # (q - 8) * scale + zero == q * scale + low
    return QuantizedWeight("int4", codes.reshape(N, K).to(torch.uint8), scales, zeros, group_size)


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise QuantizeError(
            f"{name}: its {in_features} inputs do not split into groups of {group_size}; "
            f"choose a group size dividing {in_features}"
        )


def check_settings(mode: str, group_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Everything about a quantized load that can be refused before a checkpoint is read."""
    if mode not in MODES:
        raise QuantizeError(f"unknown quantize={mode!r}; choose None or one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")
    if torch.device(device).type != "cpu":
        raise QuantizeError(
            f"quantized weights run on the CPU for now (PyTorch's int8/int4 CPU kernels); {device} is not supported yet"
        )
    if dtype not in (torch.bfloat16, torch.float16):
        raise QuantizeError(
            f"quantized weights need bfloat16 (or float16) activations, got {dtype}: PyTorch's int4 kernel takes "
            "its scales in the activation dtype and refuses float32"
        )


class Int8Linear(nn.Module):
    """x @ (q * scale).T with int8 codes, one scale per output row (PyTorch's `_weight_int8pack_mm`)."""

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q.codes.contiguous())
        self.register_buffer("scales", q.scales.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return out.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """x @ ((q - 8) * scale + zero).T with 4-bit codes packed for PyTorch's CPU int4 kernel.

    The kernel takes its scales and zeros in the activation dtype, so they are rounded to it (bfloat16:
    a relative error of at most 2^-8 in each, far below the half-step error of the 4-bit codes). It also
    packs rows in sixteens: other row counts are padded with zero rows, cut off the output again.
    """

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = q.group_size
        codes, scales, zeros = q.codes, q.scales, q.zeros
        pad = -self.out_features % 16
        if pad:  # zero rows: code 8 with scale 0 and zero 0
            codes = torch.cat([codes, codes.new_full((pad, self.in_features), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        pairs = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (K // group_size, N, 2): the kernel's layout
        self.register_buffer("scales_and_zeros", pairs.to(dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        out = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)


def quantized_linear(q: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The module that runs `q` on `device` with activations of `dtype` (see `check_settings`)."""
    check_settings(q.mode, q.group_size or DEFAULT_GROUP_SIZE, device, dtype)
    return Int8Linear(q, dtype) if q.mode == "int8" else Int4Linear(q, dtype)


# the layers `quantize` applies to: every projection; embeddings (gathered, not multiplied) and norms stay
QUANTIZED_LAYERS = ("wqkv", "wo", "w13", "w2", "output")


def is_quantized_layer(name: str) -> bool:
    """Whether a module or parameter path (`layers.3.attention.wqkv`, `output.weight`) is one `quantize` applies to."""
    return _layer(name) in QUANTIZED_LAYERS


def _layer(name: str) -> str:
    return name.removesuffix(".weight").rpartition(".")[2]


def mode_for(layer: str, mode: str) -> str:
    """The mode a layer gets under `mode`: int4 keeps the output projection at int8, as llama.cpp's 4-bit
    presets keep it at 6-8 bits. Measured on the embedded SmolLM2 (Hamlet, windows of 512): a 4-bit output
    took perplexity from 24.45 to 26.26; int8 there costs 0.8 ms a token more than int4 on the CI CPU."""
    return "int8" if mode == "int4" and _layer(layer) == "output" else mode


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantizes a built `Transformer`'s projections in place (random-weight benchmarks, experiments).

    Loading with `from_pretrained(..., quantize=mode)` does the same while reading, never holding the
    float model. A tied output projection gets its own quantized copy; the embedding stays float.
    """
    weight = model.tok_embeddings.weight
    check_settings(mode, group_size, weight.device, weight.dtype)
    linears = [(n, m) for n, m in model.named_modules() if is_quantized_layer(n)]
    for name, layer in linears:
        parent, _, attr = name.rpartition(".")
        q = quantize(layer.weight, mode_for(name, mode), group_size, name)
        setattr(model.get_submodule(parent), attr, quantized_linear(q, weight.dtype, weight.device))
    return model
