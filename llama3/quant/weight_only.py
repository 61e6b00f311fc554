"""Weight-only quantization: int8 per output channel, int4 per group of inputs, and the linear layers that run them.

int8 (symmetric): w ~ q * scale with q in -127..127 and one scale per output row.
int4 (asymmetric): w ~ (q - 8) * scale + zero with q in 0..15, one (scale, zero) per group of `group_size`
consecutive inputs of a row: the form PyTorch's int4 kernels take (gpt-fast and torchao use them too), onto
which GGUF's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m, so zero = m + 8d) blocks map with the same codes.

Activations stay in the model's dtype. Each quantized module holds its codes in one of two layouts, chosen
from the device it is built for:
- "cpu": what PyTorch's CPU kernels take (`torch._weight_int8pack_mm`, and for int4 the codes repacked by
  `torch._convert_weight_to_int4pack_for_cpu`), fast with bfloat16 activations;
- "gpu": plain codes the Triton kernels of `llama3.kernels.quant_gemv` read (int8 codes (N, K); int4 two codes
  a byte (N, K / 2), element 2j in the low nibble of byte j, as quantized checkpoints store them), with scales
  and zeros in the activation dtype. The Triton backend sends these layers to those kernels; the module's own
  forward (the PyTorch backend) dequantizes the weight and calls `F.linear`: the same function, slower.
  Tests build this layout on CPU tensors to run the kernels in Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int4")


GROUP_SIZES = (32, 64, 128, 256)


DEFAULT_GROUP_SIZE = 32  # GGUF's Q4 block; on the 2-core CI CPU no larger group was faster (see README)


LAYOUTS = ("cpu", "gpu")


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
            return dequantize_int8(self.codes, self.scales)
        return dequantize_int4(self.codes, self.scales, self.zeros, self.group_size)

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
        return {"qweight": pack_int4(self.codes), "scales": self.scales, "zeros": self.zeros}

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
            codes = unpack_int4(qweight)
            q = QuantizedWeight("int4", codes, scales, parts["zeros"].float(), group_size)
            groups = (codes.shape[0], codes.shape[1] // group_size)
            ok = qweight.dtype == torch.uint8 and scales.shape == groups and q.zeros.shape == groups
        if not ok:
            shapes = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in parts.items()}
            raise QuantizeError(f"{name}: the stored {mode} tensors do not fit together: {shapes}")
        return q


def dequantize_int8(codes: Tensor, scales: Tensor) -> Tensor:
    """w = q * scale, one scale per output row, in float32 (whatever dtype the scales are stored in)."""
    return codes.float() * scales.float()[:, None]


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """w = (q - 8) * scale + zero, one (scale, zero) per group of `group_size` inputs, in float32."""
    N, K = codes.shape
    groups = codes.float().reshape(N, K // group_size, group_size) - 8
    return (groups * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def pack_int4(codes: Tensor) -> Tensor:
    """Two 4-bit codes a byte: (N, K) codes 0..15 -> uint8 (N, K / 2), element 2j in the low nibble of byte j."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: uint8 (N, K / 2) -> uint8 codes (N, K)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


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


def layout_for(device: torch.device | str) -> str:
    """The layout of codes a quantized module on `device` holds (see the module docstring)."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def check_settings(
    mode: str,
    group_size: int,
    device: torch.device,
    dtype: torch.dtype,
    layout: str | None = None,
    kernel: str = "torch",
) -> None:
    """Everything about a quantized load that can be refused before a checkpoint is read. `kernel`: what runs
    the quantized layers on the CPU, "torch" (PyTorch's kernels), "fbgemm" (int8 layers on fbgemm,
    `llama3.quant.dynamic`) or "dot" (every layer on llama3's own, `llama3.quant.dot`)."""
    if kernel not in ("torch", "fbgemm", "dot"):
        raise QuantizeError(f"unknown kernel {kernel!r}; choose torch, fbgemm or dot")
    if kernel in ("fbgemm", "dot") and torch.device(device).type != "cpu":
        raise QuantizeError(f"the {kernel} kernels run on the CPU, not {device}")
    if kernel == "fbgemm" and mode == "int8":  # fbgemm takes float32 activations: every projection runs it
        if dtype != torch.float32:
            raise QuantizeError(f"the fbgemm int8 kernel takes float32 activations, got {dtype}")
        return
    if mode not in MODES:
        raise QuantizeError(f"unknown quantize={mode!r}; choose None or one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")
    if torch.device(device).type not in ("cpu", "cuda"):
        raise QuantizeError(
            f"quantized weights run on the CPU (PyTorch's int8/int4 kernels) or on CUDA (Triton kernels); "
            f"{device} is not supported"
        )
    if kernel == "dot":  # its own layout, float32 activations (llama3.quant.dot)
        if dtype != torch.float32:
            raise QuantizeError(f"the dot-product kernels take float32 activations, got {dtype}")
        return
    layout = layout or layout_for(device)
    if layout not in LAYOUTS:
        raise QuantizeError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "cpu" and dtype not in (torch.bfloat16, torch.float16):
        raise QuantizeError(
            f"quantized weights on the CPU need bfloat16 (or float16) activations, got {dtype}: PyTorch's int4 "
            "kernel takes its scales in the activation dtype and refuses float32"
        )
    if not dtype.is_floating_point:
        raise QuantizeError(f"quantized weights need floating-point activations, got {dtype}")


class Int8Linear(nn.Module):
    """x @ (q * scale).T with int8 codes (N, K) and one scale per output row, in the activation dtype.

    Both layouts hold the same tensors. The "cpu" one runs PyTorch's `_weight_int8pack_mm`; the "gpu" one is
    read by the Triton backend's kernel, and its own forward (the PyTorch backend) dequantizes to `F.linear`.
    """

    mode = "int8"

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype, layout: str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.layout = layout
        self.register_buffer("weight", q.codes.contiguous())
        self.register_buffer("scales", q.scales.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "gpu":  # q * scale rounded once to x's dtype, as dequantize().to(x.dtype) would be
            return F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        """The float32 weight this layer multiplies by (its scales as stored, in the activation dtype)."""
        return dequantize_int8(self.weight, self.scales)


class Int4Linear(nn.Module):
    """x @ ((q - 8) * scale + zero).T with 4-bit codes, one (scale, zero) per group of `group_size` inputs.

    Scales and zeros are kept in the activation dtype, as PyTorch's CPU kernel takes them (bfloat16: a
    relative error of at most 2^-8 in each, far below the half-step error of the 4-bit codes).

    "cpu" layout: the codes packed for PyTorch's CPU int4 kernel, which packs rows in sixteens: other row
    counts are padded with zero rows, cut off the output again. "gpu" layout: `qweight` uint8 (N, K / 2), two
    codes a byte (`pack_int4`), `scales` and `zeros` (N, K / group_size), read by the Triton backend's kernel;
    its own forward dequantizes to `F.linear`.
    """

    mode = "int4"

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype, layout: str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = q.group_size
        self.layout = layout
        codes, scales, zeros = q.codes, q.scales, q.zeros
        if layout == "gpu":
            self.register_buffer("qweight", pack_int4(codes).contiguous())
            self.register_buffer("scales", scales.to(dtype).contiguous())
            self.register_buffer("zeros", zeros.to(dtype).contiguous())
            return
        pad = -self.out_features % 16
        if pad:  # zero rows: code 8 with scale 0 and zero 0
            codes = torch.cat([codes, codes.new_full((pad, self.in_features), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        # packed a block of rows at a time: the op takes int32 codes, 4 bytes each, and a whole-weight int32
        # copy would be twice the size of a bf16 copy of the weight. It packs rows in tiles of 32 (measured:
        # blocks of 16 rows pack differently from the whole), so blocks are multiples of 256 rows.
        packed = torch.empty(codes.shape[0], self.in_features // 2, dtype=torch.uint8)
        step = max(256, 2**20 // self.in_features // 256 * 256)  # about 1M codes: 4 MB as int32
        for start in range(0, codes.shape[0], step):
            rows = codes[start : start + step].to(torch.int32)
            packed[start : start + step] = torch._convert_weight_to_int4pack_for_cpu(rows, 1)
        self.register_buffer("packed", packed)
        pairs = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (K // group_size, N, 2): the kernel's layout
        self.register_buffer("scales_and_zeros", pairs.to(dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "gpu":
            return F.linear(x, self.dequantize().to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        out = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        """The float32 weight this layer multiplies by (its scales and zeros as stored); "gpu" layout only."""
        if self.layout != "gpu":
            raise QuantizeError(
                "Int4Linear.dequantize reads the gpu layout; the cpu one is packed for PyTorch's kernel"
            )
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, self.group_size)


def quantized_linear(
    q: QuantizedWeight, dtype: torch.dtype, device: torch.device, layout: str | None = None
) -> nn.Module:
    """The module that runs `q` on `device` with activations of `dtype`, its codes in `layout` (by default
    the device's own: "gpu" on CUDA, "cpu" elsewhere; see `check_settings`)."""
    layout = layout or layout_for(device)
    check_settings(q.mode, q.group_size or DEFAULT_GROUP_SIZE, device, dtype, layout)
    module = Int8Linear(q, dtype, layout) if q.mode == "int8" else Int4Linear(q, dtype, layout)
    return module.to(device)


# the layers `quantize` applies to: every projection; embeddings (gathered, not multiplied) and norms stay
QUANTIZED_LAYERS = ("wqkv", "wo", "w13", "w2", "output")


def is_quantized_layer(name: str) -> bool:
    """Whether a module or parameter path (`layers.3.attention.wqkv`, `output.weight`) is one `quantize` applies to."""
    return _layer(name) in QUANTIZED_LAYERS


def _layer(name: str) -> str:
    return name.removesuffix(".weight").rpartition(".")[2]


def mode_for(layer: str, mode: str, keep_output: bool = False) -> str | None:
    """The mode a layer gets under `mode`, None where it stays float (the output projection with
    `keep_output`). int4 keeps the output projection at int8, as llama.cpp's 4-bit presets keep it at 6-8
    bits. Measured on the embedded SmolLM2 (Hamlet, windows of 512): a 4-bit output took perplexity from
    24.45 to 26.26; int8 there costs 0.8 ms a token more than int4 on the CI CPU."""
    if _layer(layer) != "output":
        return mode
    return None if keep_output else "int8" if mode == "int4" else mode


def quantize_model(
    model: nn.Module,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    layout: str | None = None,
    keep_output: bool = False,
) -> nn.Module:
    """Quantizes a built `Transformer`'s projections in place (random-weight benchmarks, experiments).

    Loading with `from_pretrained(..., quantize=mode)` does the same while reading, never holding the
    float model. A tied output projection gets its own quantized copy; the embedding stays float.
    `layout` overrides the device's own (tests run the "gpu" one on the CPU, in Triton's interpreter).
    `keep_output` leaves the output projection float.
    """
    weight = model.tok_embeddings.weight
    check_settings(mode, group_size, weight.device, weight.dtype, layout)
    linears = [(n, m) for n, m in model.named_modules() if is_quantized_layer(n) and mode_for(n, mode, keep_output)]
    for name, layer in linears:
        parent, _, attr = name.rpartition(".")
        q = quantize(layer.weight, mode_for(name, mode, keep_output), group_size, name)
        setattr(model.get_submodule(parent), attr, quantized_linear(q, weight.dtype, weight.device, layout))
    return model
