"""Quantized weights times 8-bit activations in integer dot products, as llama.cpp runs Q4 and Q8 weights on CPUs.

PyTorch ships no such CPU kernel: its int4 kernel (`_weight_int4pack_mm_for_cpu`) converts the codes to float
and multiplies them by bfloat16 activations, which costs 3x as long with its AVX2 code as with its AVX-512 code
(96 against 34 us for a 3072x576 call on an AMD EPYC, 2 threads: docs/quantization.md), and fbgemm's int8 kernel has
no 4-bit weights and no per-block scales. So the kernels are written here, in C (dot.c, about 300 lines, with
the math in its header comment), compiled on first use by the machine's C compiler (`$CC`, else `cc`), kept in
`~/.cache/llama3/kernels/` and loaded with ctypes. They run in PyTorch's OpenMP thread pool, and the kernel
choice (`llama3.quant.choice`) times them against PyTorch's kernels on each machine: without a compiler they
are simply not a candidate.

The math (dot.c, and `reference` below, the same formulas in PyTorch):
- every row of x is quantized per block of 32 inputs: d = max|x| / 127, a = round(x * (1 / d)), like llama.cpp's
  Q8_0 activations;
- int4 weights, w = q * s + m per block of 32 with s and m in float16, as GGUF's Q4_1 stores them (a GGUF file's
  own Q4_0 / Q4_1 codes, exactly; larger groups repeat their scale per block), that is w = (q - 8) s + z with
  z = m + 8 s: y = sum over blocks of s * d * (sum q * a - 8 * sum a) + z * sum x (the exact sum of x meets
  the block's middle value z; the other way round, m * sum x, cost 0.73% of perplexity against 0.25%);
- int8 weights, w = q * scale per row: y = scale * sum over blocks of d * sum q * a.
The integer sums are exact; the result differs from the float32 product by the activations' 8-bit rounding,
as llama.cpp's does (perplexity: docs/quantization.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from llama3.quant import isa
from llama3.quant.weight_only import QuantizedWeight, QuantizeError

SOURCE = Path(__file__).with_name("dot.c")
BLOCK = 32  # inputs per activation scale, and per weight scale of int4 codes
MAX_INPUTS = 65536  # dot.c's MAX_BLOCKS * BLOCK: a row's per-block scales live on the stack
FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}  # by the code dot.c compiles to


class DotKernelError(RuntimeError):
    """The C kernels cannot be built or run here (no compiler, a failed build, out of memory)."""


def default_isa() -> str:
    """The build of dot.c for this CPU: "avx2" on x86 with AVX2 (and FMA, which every AVX2 CPU has), else "generic"
    (plain C, vectorized as far as the compiler can)."""
    return "avx2" if isa.isa()["avx2"] and platform.machine().lower() in ("x86_64", "amd64") else "generic"


def cache_dir() -> Path:
    """Beside the kernel choice's cache (`llama3.quant.choice.cache_path`, not imported: choice imports this module
    to time the kernels): `$XDG_CACHE_HOME/llama3/kernels/`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3" / "kernels"


@functools.cache
def library(code: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for `code` ("avx2" or "generic"; default `default_isa()`), built once per machine."""
    code = code or default_isa()
    if code not in FLAGS:
        raise DotKernelError(f"unknown kernel code {code!r}; choose one of {', '.join(FLAGS)}")
    compiler = os.environ.get("CC") or "cc"
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", *FLAGS[code]]
    source = SOURCE.read_bytes()
    ident = hashlib.sha256(source + repr((compiler, flags, platform.machine())).encode()).hexdigest()[:16]
    path = cache_dir() / f"dot-{code}-{ident}.so"
    if not path.is_file():
        if shutil.which(compiler) is None:
            raise DotKernelError(f"the dot-product kernels need a C compiler: {compiler!r} was not found (set CC)")
        _compile(compiler, flags, path)
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dot_q4.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.dot_q8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.dot_q4.restype = lib.dot_q8.restype = ctypes.c_int
    lib.dot_isa.restype = ctypes.c_char_p
    return lib


def _compile(compiler: str, flags: list[str], path: Path) -> None:
    """Builds dot.c into `path`: into a temporary name beside it, renamed, so another process never loads half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise DotKernelError(f"cannot write the compiled kernels to {path.parent}: {e}") from None
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise DotKernelError(f"{compiler} could not build {SOURCE.name}:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def available() -> bool:
    """Whether the kernels build and load here (compiled on the first call)."""
    try:
        library()
    except (DotKernelError, OSError):
        return False
    return True


def to_rows(codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """int4 codes (N, K) in 0..15 with a float16 scale and min per block of 32 (N, K / 32), as dot.c reads them:
    (N, K / 32 * 20) bytes, each row its codes (16 bytes a block, byte j holding element j in its low nibble and
    element j + 16 in its high one, GGUF's order), then its scales, then its minimums."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // BLOCK, BLOCK)
    packed = (c[..., :16] | (c[..., 16:] << 4)).reshape(n, -1)
    halves = [t.to(torch.float16).contiguous().view(torch.uint8).view(n, -1) for t in (scales, mins)]
    return torch.cat([packed, *halves], dim=-1).contiguous()


def from_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(codes (N, K), scales, mins (N, K / 32), float32): the inverse of `to_rows`."""
    n, groups = rows.shape[0], rows.shape[1] // 20
    packed, scales, mins = rows.split([16 * groups, 2 * groups, 2 * groups], dim=1)
    scales, mins = (t.contiguous().view(torch.float16).float() for t in (scales, mins))
    packed = packed.reshape(n, groups, 16)
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1)
    return codes, scales, mins


def half_scales(q: QuantizedWeight, name: str = "weight") -> tuple[Tensor, Tensor]:
    """A 4-bit weight's (scale, min) per block of 32 in float16, w = q * s + m: exact for GGUF's Q4_0 and Q4_1
    blocks, whose scales are float16 (the zero z = m + 8 s is computed in float64 back to m); other scales are
    rounded to float16 (2^-11 of the scale, a 2^-8 of a 4-bit step for the min). Refused past float16's range."""
    repeat = q.group_size // BLOCK
    s = q.scales.double().repeat_interleave(repeat, dim=1)
    m = q.zeros.double().repeat_interleave(repeat, dim=1) - 8 * s
    halves = s.to(torch.float16), m.to(torch.float16)
    if not all(torch.isfinite(t).all() for t in halves):
        raise QuantizeError(f"{name}: a scale or minimum of its 4-bit blocks is beyond float16's range (65504)")
    return halves


class DotLinear(nn.Module):
    """x @ W.T for a quantized W (int4 per group, or int8 per row) through dot.c: float32 in, float32 out.

    Its buffers, plain tensors: int4 `rows` (N, K / 32 * 20) bytes (`to_rows`, `half_scales`: a group larger
    than 32 has its scale repeated per block of 32); int8 `codes` (N, K) int8 and `scales` (N,) float32. `code` is which
    build of dot.c runs it ("avx2" or "generic")."""

    kernel = "dot"

    def __init__(self, q: QuantizedWeight, code: str | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.mode = q.mode
        self.code = code or default_isa()
        if self.in_features % BLOCK or self.in_features > MAX_INPUTS:
            raise QuantizeError(
                f"the dot-product kernels take inputs in blocks of {BLOCK}, at most {MAX_INPUTS}; this weight has "
                f"{self.in_features}"
            )
        library(self.code)  # built (or its error raised) before the codes are laid out
        if q.mode == "int4":
            self.register_buffer("rows", to_rows(q.codes, *half_scales(q)))
        else:
            self.register_buffer("codes", q.codes.contiguous())
            self.register_buffer("scales", q.scales.float().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        # a decode step makes 121 of these calls for SmolLM2: kept to plain attribute reads (the buffers straight
        # from nn.Module's dict) and one ctypes call, about 3 us of Python a call
        if x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != self.in_features:
            return self._convert(x)
        if not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // self.in_features
        y = torch.empty(rows, self.out_features)
        buffers, lib, threads = self._buffers, library(self.code), torch.get_num_threads()
        if self.mode == "int4":
            weight = (buffers["rows"].data_ptr(),)
            status = lib.dot_q4(x.data_ptr(), rows, self.in_features, *weight, self.out_features, y.data_ptr(), threads)
        else:
            weight = (buffers["codes"].data_ptr(), buffers["scales"].data_ptr())
            status = lib.dot_q8(x.data_ptr(), rows, self.in_features, *weight, self.out_features, y.data_ptr(), threads)
        if status != 0:
            raise DotKernelError(f"out of memory for the activations of {rows} rows x {self.in_features}")
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _convert(self, x: Tensor) -> Tensor:
        """Input that is not float32 rows on the CPU: converted (16-bit activations), or refused."""
        if x.device.type != "cpu":
            raise QuantizeError(f"the dot-product kernels run on the CPU; the input is on {x.device}")
        if x.shape[-1] != self.in_features:
            raise QuantizeError(f"an input of {x.shape[-1]} features for a layer of {self.in_features}")
        if not x.dtype.is_floating_point:
            raise QuantizeError(f"the dot-product kernels take floating-point input, got {x.dtype}")
        return self(x.float()).to(x.dtype)

    def weight_codes(self) -> QuantizedWeight:
        """The codes and scales this layer holds (int4: per block of 32, the zero m + 8 s rounded to float32)."""
        if self.mode == "int4":
            codes, scales, mins = from_rows(self.rows)
            return QuantizedWeight("int4", codes, scales, mins + 8 * scales, BLOCK)
        return QuantizedWeight("int8", self.codes, self.scales)

    def dequantize(self) -> Tensor:
        """The float32 weight the codes stand for: q * s + m (int4), q * scale (int8)."""
        if self.mode == "int4":
            codes, scales, mins = from_rows(self.rows)
            blocks = codes.view(codes.shape[0], -1, BLOCK).float() * scales[..., None] + mins[..., None]
            return blocks.reshape(codes.shape)
        return self.weight_codes().dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}, {self.code} code"


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of float32 x (M, K) as dot.c quantizes them: int8 codes (M, K / 32, 32) and scales (M, K / 32)."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(blocks * inverse[..., None]).clamp(-127, 127).to(torch.int8), scale


def reference(x: Tensor, q: QuantizedWeight) -> Tensor:
    """What dot.c computes, in float64 from the same integer sums: the test's independent PyTorch reference."""
    a, d = quantize_activations(x)
    a, d = a.double(), d.double()
    sums = x.double().reshape(*a.shape).sum(-1)  # (M, G)
    if q.mode == "int4":
        repeat = q.group_size // BLOCK
        s, z = (t.double().repeat_interleave(repeat, dim=1) for t in (q.scales, q.zeros))  # (N, G)
        codes = q.codes.double().view(q.shape[0], -1, BLOCK)  # (N, G, 32)
        dots = torch.einsum("mgj,ngj->mng", a, codes) - 8 * a.sum(-1)[:, None, :]  # the centred codes, q - 8
        return (s[None] * d[:, None, :] * dots + z[None] * sums[:, None, :]).sum(-1)
    codes = q.codes.double().view(q.shape[0], -1, BLOCK)
    dots = torch.einsum("mgj,ngj->mng", a, codes)
    return q.scales.double()[None] * (d[:, None, :] * dots).sum(-1)
