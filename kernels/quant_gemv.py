"""Weight-only int8 / int4 matmuls: `x @ W.T` with W read as integer codes and dequantized in the loop.

At batch 1 a decode step is bound by reading the weights, so reading 1 byte (int8) or half a byte (int4)
per weight instead of 2 is the whole gain. One kernel serves both modes and every row count:

- int8: codes (N, K) int8, one scale per output row. The codes are exact in any float dtype, so the tensor
  cores multiply x by the codes themselves and the row's scale is applied once to the fp32 sum.
- int4: two codes a byte, uint8 (N, K / 2) with element 2j in the low nibble of byte j (`llama3.quant.weight_only.
  pack_int4`), and one (scale, zero) per group of `group_size` inputs: w = (q - 8) * scale + zero. Each
  weight is dequantized in fp32 and rounded to x's dtype, the tensor cores' input (the weight a float model
  of that dtype would hold). The low and high nibbles are unpacked side by side into the weight tile, so x
  streams into the tensor cores as it lies in memory.

Decode (at most 16 rows of x): the rows are padded to a 16-row tile and K is split as in `gemv.py`, each
split writing an fp32 partial that a second kernel sums in a fixed order (deterministic, no atomics, no
allocation that depends on data: capturable in a CUDA graph). How many splits and how many weight rows per
program is measured on the GPU per shape (`best_decode_tiles`), outside any capture.

Prefill (more rows): the same kernel tiles the rows as well, one pass over K (a GEMM that dequantizes its
tiles); or the weight is dequantized once into x's dtype (`dequantize_layer`) and cuBLAS multiplies. Which
prefill path is faster is measured on the GPU (`best_prefill_path`), not assumed.

The references beside the kernels take the dequantization from `llama3.quant.weight_only`, the one place its
formulas live.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from llama3.kernels.gemv import _median_ms, _num_splits, _sum_splits_kernel

from llama3.quant.weight_only import GROUP_SIZES, QuantizeError, dequantize_int4, dequantize_int8, unpack_int4

DECODE_ROWS = 16  # at most this many rows of x take the split-K GEMV form


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    m,
    n,
    k,
    k_per_split,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_os,
    stride_om,
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    col_mask = cols < n
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + cols.to(tl.int64)[:, None] * stride_qn
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if INT4:
        s_rows = scale_ptr + cols.to(tl.int64)[:, None] * stride_sn
        z_rows = zero_ptr + cols.to(tl.int64)[:, None] * stride_sn
        for k0 in range(k_start, k_end, BLOCK_K):
            nbytes = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds elements 2j (low nibble) and 2j + 1
            if EVEN_K:  # every step is whole: a mask uniform along K lets the codes load 16 bytes at a time
                packed = tl.load(q_rows + nbytes[None, :], mask=col_mask[:, None], other=0)
            else:
                w_mask = col_mask[:, None] & (2 * nbytes < k_end)[None, :]
                packed = tl.load(q_rows + nbytes[None, :], mask=w_mask, other=0)
            if GROUP_SIZE >= BLOCK_K:  # the block lies in one group: one (scale, zero) per weight row
                group = k0 // GROUP_SIZE
                scale = tl.load(s_rows + group, mask=col_mask[:, None], other=0.0).to(tl.float32)
                zero = tl.load(z_rows + group, mask=col_mask[:, None], other=0.0).to(tl.float32)
            else:  # BLOCK_K // GROUP_SIZE groups: each (scale, zero) repeated over its group's bytes
                groups = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
                g_mask = col_mask[:, None] & (groups * GROUP_SIZE < k_end)[None, :]
                scale = _repeat(tl.load(s_rows + groups[None, :], mask=g_mask, other=0.0), GROUP_SIZE // 2)
                zero = _repeat(tl.load(z_rows + groups[None, :], mask=g_mask, other=0.0), GROUP_SIZE // 2)
            w_even = (((packed & 15).to(tl.float32) - 8.0) * scale + zero).to(dtype)
            w_odd = (((packed >> 4).to(tl.float32) - 8.0) * scale + zero).to(dtype)
            w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))  # columns 2j and 2j + 1 side by side
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < k_end)[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_end
            codes = tl.load(q_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0)
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(codes.to(dtype)), input_precision=DOT_PRECISION)
        acc *= tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + split * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _repeat(t, times: tl.constexpr):
    """(R, C) -> (R, C * times), each column repeated `times` times in place, in fp32."""
    R: tl.constexpr = t.shape[0]
    C: tl.constexpr = t.shape[1]
    return tl.reshape(tl.broadcast_to(t.to(tl.float32)[:, :, None], (R, C, times)), (R, C * times))


@triton.jit
def _dequantize_kernel(
    q_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    n,
    k,
    stride_qn,
    stride_sn,
    stride_on,
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    col_mask = (cols < n)[:, None]
    mask = col_mask if EVEN_K else col_mask & (ks < k)[None, :]  # uniform along K: 16-byte loads and stores
    rows64 = cols.to(tl.int64)[:, None]
    if INT4:  # as in the matmul kernel: bytes unpacked side by side, each group's (scale, zero) repeated
        nbytes = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte_mask = col_mask if EVEN_K else col_mask & (2 * nbytes < k)[None, :]
        packed = tl.load(q_ptr + rows64 * stride_qn + nbytes[None, :], mask=byte_mask, other=0)
        groups = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
        g_mask = col_mask & (groups * GROUP_SIZE < k)[None, :]
        scale = _repeat(
            tl.load(scale_ptr + rows64 * stride_sn + groups[None, :], mask=g_mask, other=0.0), GROUP_SIZE // 2
        )
        zero = _repeat(
            tl.load(zero_ptr + rows64 * stride_sn + groups[None, :], mask=g_mask, other=0.0), GROUP_SIZE // 2
        )
        w_even = ((packed & 15).to(tl.float32) - 8.0) * scale + zero
        w_odd = ((packed >> 4).to(tl.float32) - 8.0) * scale + zero
        w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))
    else:
        codes = tl.load(q_ptr + rows64 * stride_qn + ks[None, :], mask=mask, other=0)
        w = codes.to(tl.float32) * tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows64 * stride_on + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# -- host side ----------------------------------------------------------------------------------------------


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, **tiles) -> torch.Tensor:
    """`x @ (weight * scales[:, None]).T` with fp32 accumulation, in x's dtype.

    x: [..., K]; weight: int8 codes (N, K); scales: (N,), one per output row. `tiles` as in `_launch`.
    """
    n, k = weight.shape
    if weight.dtype != torch.int8 or scales.shape != (n,):
        raise ValueError(f"int8_matmul: needs int8 codes (N, K) and N scales, got {_describe(weight, scales)}")
    return _launch(x, weight, scales, scales, k, 0, **tiles)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    **tiles,
) -> torch.Tensor:
    """`x @ W.T` with W = ((q - 8) * scale + zero) rounded to x's dtype, fp32 accumulation, in x's dtype.

    x: [..., K]; qweight: uint8 (N, K / 2), two codes a byte (`pack_int4`); scales, zeros: (N, K / group_size).
    `tiles` as in `_launch`.
    """
    k = _check_int4(qweight, scales, zeros, group_size)
    return _launch(x, qweight, scales, zeros, k, group_size, **tiles)


def _check_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> int:
    """K, after checking that the int4 tensors fit together (a K that groups do not divide is named)."""
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % group_size:
        raise QuantizeError(
            f"int4: the weight's {k} inputs do not split into groups of {group_size}; choose a group size dividing {k}"
        )
    groups = (n, k // group_size)
    if qweight.dtype != torch.uint8 or scales.shape != groups or zeros.shape != groups:
        raise ValueError(
            f"int4_matmul: needs uint8 (N, K/2) codes and (N, K/{group_size}) scales and zeros, "
            f"got {_describe(qweight, scales, zeros)}"
        )
    if scales.stride() != zeros.stride():
        raise ValueError("int4_matmul: scales and zeros must have the same strides")
    return k


def _describe(*tensors: torch.Tensor) -> str:
    return ", ".join(f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" for t in tensors)


def _launch(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    k: int,
    group_size: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Runs the kernel over x's rows (group_size 0: int8).

    At most 16 rows: a 16-row tile, K split `num_splits` ways (default: about four programs per SM), `block_n`
    weight rows per program (default 64). More rows: tiles of `block_m` (default 64) x `block_n` (default
    64), one pass over K unless `num_splits` says otherwise.
    """
    n = codes.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"quantized matmul: x has {x.shape[-1]} features but the weight has {k} inputs")
    if codes.stride(1) != 1 or scales.stride(-1) != 1:
        raise ValueError("quantized matmul: codes and scales must be contiguous along their last dimension")
    if not x.dtype.is_floating_point or scales.dtype != x.dtype:
        raise ValueError(
            f"quantized matmul: x is {x.dtype}; scales must be in the same float dtype, not {scales.dtype}"
        )
    x_rows = x.reshape(-1, k)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    m = x_rows.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out

    decode = m <= DECODE_ROWS
    block_m = 16 if decode else (block_m or 64)
    block_n = block_n or 64
    # Inputs a step: a 64-row tile of weights is 8 KiB either way (int8: 128 inputs; int4: 256). A split of
    # K is a whole number of steps, so an int4 step never straddles a group of 256 (nor a split).
    block_k = 256 if group_size else 128
    n_blocks, m_blocks = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    if num_splits is None:
        num_splits = _num_splits(n_blocks, k, block_k, x.device) if decode else 1
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), block_k) * block_k
    num_splits = triton.cdiv(k, k_per_split)  # no split left without work
    target = out.view(1, m, n)
    if num_splits > 1:
        target = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device)
    _quant_matmul_kernel[(n_blocks, num_splits, m_blocks)](
        x_rows,
        codes,
        scales,
        zeros,
        target,
        m,
        n,
        k,
        k_per_split,
        x_rows.stride(0),
        codes.stride(0),
        scales.stride(0),
        target.stride(0),
        target.stride(1),
        INT4=group_size > 0,
        GROUP_SIZE=max(group_size, 1),
        EVEN_K=k % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        # fp32 activations would otherwise be multiplied in tf32 (10-bit mantissa) on the GPU.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=4 if decode else 3,
    )
    if num_splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, num_splits, m * n, BLOCK=block, num_warps=4)
    return out


def dequantize_int8_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight `weight * scales[:, None]` in the scales' dtype, computed in fp32 and rounded once."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or scales.shape != (n,):
        raise ValueError(f"dequantize: needs int8 codes (N, K) and N scales, got {_describe(weight, scales)}")
    return _dequantize(weight, scales, scales, k, 0)


def dequantize_int4_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The (N, K) weight `(q - 8) * scale + zero` in the scales' dtype, computed in fp32 and rounded once."""
    k = _check_int4(qweight, scales, zeros, group_size)
    return _dequantize(qweight, scales, zeros, k, group_size)


def _dequantize(codes, scales, zeros, k: int, group_size: int) -> torch.Tensor:
    n = codes.shape[0]
    out = torch.empty((n, k), dtype=scales.dtype, device=codes.device)
    block_n, block_k = 32, 256  # a step of 256 inputs holds whole groups (K is a multiple of the group)
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        codes,
        scales,
        zeros,
        out,
        n,
        k,
        codes.stride(0),
        scales.stride(0),
        out.stride(0),
        INT4=group_size > 0,
        GROUP_SIZE=max(group_size, 1),
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


# -- the choices measured on the GPU ------------------------------------------------------------------------

PREFILL_PATHS = ("kernel", "dequantize")
_best_prefill: dict[tuple, str] = {}
_best_decode: dict[tuple, tuple[int, int] | None] = {}


def quantized_matmul(x: torch.Tensor, layer: torch.nn.Module, prefill_path: str | None = None) -> torch.Tensor:
    """`x @ W.T` for a quantized layer of `llama3.quant.weight_only` in its "gpu" layout: the split-K GEMV for a
    decode step (its tiles as `best_decode_tiles` measured them), the faster prefill path for more rows
    (`prefill_path` forces one: "kernel" or "dequantize")."""
    rows = x.numel() // x.shape[-1]
    if rows > DECODE_ROWS:
        path = prefill_path or best_prefill_path(rows, layer)
        if path == "dequantize":
            return F.linear(x, dequantize_layer(layer))
        return _layer_matmul(x, layer)
    tiles = best_decode_tiles(rows, layer)
    return _layer_matmul(x, layer) if tiles is None else _layer_matmul(x, layer, *tiles)


def _layer_matmul(x: torch.Tensor, layer: torch.nn.Module, num_splits: int | None = None, block_n: int | None = None):
    if layer.mode == "int8":
        return int8_matmul(x, layer.weight, layer.scales, num_splits=num_splits, block_n=block_n)
    return int4_matmul(
        x, layer.qweight, layer.scales, layer.zeros, layer.group_size, num_splits=num_splits, block_n=block_n
    )


def dequantize_layer(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight (N, K) in its activation dtype, by the dequantize kernel."""
    if layer.mode == "int8":
        return dequantize_int8_weight(layer.weight, layer.scales)
    return dequantize_int4_weight(layer.qweight, layer.scales, layer.zeros, layer.group_size)


def _key(rows: int, layer: torch.nn.Module) -> tuple:
    """Rows rounded up to a power of two (times barely move within a bucket), the weight's shape and scheme."""
    scheme = (layer.mode, getattr(layer, "group_size", None), layer.scales.dtype, layer.scales.device)
    return (triton.next_power_of_2(rows), layer.out_features, layer.in_features, *scheme)


def best_decode_tiles(rows: int, layer: torch.nn.Module) -> tuple[int, int] | None:
    """(num_splits, block_n) with which the GEMV is fastest for `rows` rows of x through `layer`, measured once
    per `_key` with CUDA events, the L2 cache flushed before each call (as `gemv.best_gemv_config` does, but
    among our own tiles only: there is no cuBLAS for quantized weights). None: the default tiles, which is
    what the interpreter (nothing to time) and an unmeasured shape during a CUDA-graph capture get."""
    device = layer.scales.device
    if device.type != "cuda":
        return None
    key = _key(rows, layer)
    if key in _best_decode:
        return _best_decode[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    n, k = layer.out_features, layer.in_features
    x = torch.ones(key[0], k, dtype=layer.scales.dtype, device=device)  # values do not change the time
    block_k = 256 if layer.mode == "int4" else 128
    candidates = set()
    for block_n in (16, 32, 64):
        default = _num_splits(triton.cdiv(n, block_n), k, block_k, device)
        candidates |= {(s, block_n) for s in {1, default // 2, default} if 1 <= s <= triton.cdiv(k, block_k)}
    l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    times = {}
    for tiles in sorted(candidates):
        try:
            times[tiles] = _median_ms(lambda t=tiles: _layer_matmul(x, layer, *t), l2_flush)
        except Exception as e:  # noqa: BLE001  tiles this GPU or Triton cannot build are simply not a candidate
            warnings.warn(f"quantized gemv {tiles} on {n}x{k} {layer.mode} failed ({e}); not used", stacklevel=2)
    _best_decode[key] = min(times, key=times.get) if times else None
    return _best_decode[key]


def best_prefill_path(rows: int, layer: torch.nn.Module) -> str:
    """ "kernel" (the tiled kernel) or "dequantize" (dequantize, then cuBLAS), whichever is faster for `rows`
    rows of x through `layer`, measured once per `_key` with CUDA events. The interpreter (no GPU to time) and
    a CUDA-graph capture (nothing can be timed; prefill is not captured by the model, but a caller may) take
    the kernel, which allocates no weight-sized buffer."""
    device = layer.scales.device
    if device.type != "cuda":
        return "kernel"
    key = _key(rows, layer)
    if key in _best_prefill:
        return _best_prefill[key]
    if torch.cuda.is_current_stream_capturing():
        return "kernel"
    x = torch.ones(key[0], layer.in_features, dtype=layer.scales.dtype, device=device)
    l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    times = {path: _median_ms(lambda p=path: quantized_matmul(x, layer, p), l2_flush) for path in PREFILL_PATHS}
    _best_prefill[key] = min(times, key=times.get)
    return _best_prefill[key]


# -- references ----------------------------------------------------------------------------------------------


def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 `x @ (q * scale).T` rounded to x's dtype: what the kernel's fp32 accumulation approximates."""
    return (x.float() @ dequantize_int8(weight, scales).T).to(x.dtype)


def int4_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """fp32 `x @ W.T`, W dequantized in fp32 and rounded to x's dtype as the kernel rounds it, the result
    rounded to x's dtype."""
    w = dequantize_int4(unpack_int4(qweight), scales, zeros, group_size).to(x.dtype)
    return (x.float() @ w.float().T).to(x.dtype)
