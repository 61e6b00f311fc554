"""Split-K GEMV: `x @ weight.T` for the few rows of a decode step (M <= 16).

At batch 1 a linear layer is a matrix-vector product bound by reading the weight once. cuBLAS
reaches 2.0-2.4 TB/s on the large Llama-3-8B matrices but only 0.6-1.0 TB/s on the small ones
(qkv 6144x4096, o 4096x4096; measured on an H100, docs/llama3-facts.md): with one output tile per
program there are too few programs to keep every SM streaming. Splitting K as well gives a few waves of programs for any
shape; each split writes an fp32 partial and a small kernel sums them in a fixed order, so results
are deterministic (no atomics).

Narrower tiles (`block_n` 16 or 32 weight rows per program) are the other way to more programs,
with no second kernel. Which way wins, and whether either beats cuBLAS, depends on the GPU and the
shape, so it is measured, not assumed: `best_gemv_config` times cuBLAS and a few (split, tile)
choices on the device the first time a shape is seen (outside any CUDA-graph capture) and
remembers the winner.
"""

import warnings

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    m,
    n,
    k,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    col_mask = cols < n
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)

    # The few rows of x are padded to BLOCK_M = 16 so the product runs on tensor cores; the weight
    # tile is the only real traffic, and the padding costs compute that a memory-bound op has spare.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wn
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sum_splits_kernel(
    partial_ptr,
    out_ptr,
    num_splits,
    numel,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(num_splits):
        total += tl.load(partial_ptr + split * numel + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


def _num_splits(n_blocks: int, k: int, block_k: int, device: torch.device) -> int:
    """Split K until there are about four programs per SM, keeping at least one block per split."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128
    return max(1, min(triton.cdiv(4 * n_sm, n_blocks), triton.cdiv(k, block_k)))


def gemv(x: torch.Tensor, weight: torch.Tensor, num_splits: int | None = None, block_n: int = 64) -> torch.Tensor:
    """Return `x @ weight.T` with fp32 accumulation, in x's dtype.

    x: [..., K] with at most 16 rows in all (a decode step); weight: [N, K] in x's dtype, contiguous
    along K (an nn.Linear weight). num_splits overrides the split of K chosen from the shape;
    block_n (16, 32 or 64) is the number of weight rows a program reads: narrower tiles give more
    programs, which can replace splitting K (and the second kernel that sums the splits).
    """
    if block_n not in (16, 32, 64):
        raise ValueError(f"gemv: block_n must be 16, 32 or 64, got {block_n}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"gemv: x has {x.shape[-1]} features but weight is {tuple(weight.shape)} ([N, K])")
    if x.dtype != weight.dtype:
        raise ValueError(f"gemv: x is {x.dtype} but weight is {weight.dtype}")
    if weight.stride(1) != 1:
        raise ValueError("gemv: weight must be contiguous along K")
    x_rows = x.reshape(-1, k)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    m = x_rows.shape[0]
    if m > 16:
        raise ValueError(f"gemv: {m} rows of x; this kernel is for decode steps of at most 16 (use a matmul)")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out

    # A 64 x 128 bf16 weight tile is 16 KiB: four pipeline stages in flight per program hide the
    # HBM latency; 64-wide output tiles give lm_head 2004 programs and o_proj 64 x splits.
    block_k = 128
    n_blocks = triton.cdiv(n, block_n)
    if num_splits is None:
        num_splits = _num_splits(n_blocks, k, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), block_k) * block_k
    num_splits = triton.cdiv(k, k_per_split)  # no split left without work
    target = out.view(1, m, n)
    if num_splits > 1:
        target = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, num_splits)](
        x_rows,
        weight,
        target,
        m,
        n,
        k,
        k_per_split,
        x_rows.stride(0),
        weight.stride(0),
        target.stride(0),
        target.stride(1),
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        # fp32 weights would otherwise be multiplied in tf32 (10-bit mantissa) on the GPU.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=4,
    )
    if num_splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, num_splits, m * n, BLOCK=block, num_warps=4)
    return out


_best: dict[tuple, tuple[int, int] | None] = {}


def best_gemv_config(rows: int, weight: torch.Tensor) -> tuple[int, int] | None:
    """(num_splits, block_n) with which `gemv` is fastest for `rows` rows of x against `weight`, or
    None where cuBLAS (`F.linear`) is faster. Measured once per (rows rounded up to a power of two,
    weight shape, dtype, device) with CUDA events, the L2 cache flushed before every call so the
    weight streams from HBM as it does in a decode step. During a CUDA-graph capture nothing can be
    timed: an unmeasured shape gets cuBLAS.
    """
    rows = triton.next_power_of_2(rows)  # 1, 2, 4, 8, 16: both sides' times barely move within a bucket
    key = (rows, *weight.shape, weight.dtype, weight.device)
    if key in _best:
        return _best[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    n, k = weight.shape
    x = torch.ones(rows, k, dtype=weight.dtype, device=weight.device)  # values do not change the time
    candidates = {None: lambda: torch.nn.functional.linear(x, weight)}
    for block_n in (16, 32, 64):
        default = _num_splits(triton.cdiv(n, block_n), k, 128, weight.device)
        for s in {1, default // 2, default} & set(range(1, triton.cdiv(k, 128) + 1)):
            candidates[(s, block_n)] = lambda s=s, block_n=block_n: gemv(x, weight, s, block_n)
    try:  # 256 MiB: more than any L2, and zeroing it leaves the host ample time to queue the timed launch
        l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=weight.device)
    except torch.cuda.OutOfMemoryError:  # a full GPU: no room to measure, so no reason to leave cuBLAS
        _best[key] = None
        return None
    times = {}
    for choice, run in candidates.items():
        try:
            times[choice] = _median_ms(run, l2_flush)
        except Exception as e:  # noqa: BLE001  a kernel this GPU or Triton cannot build is simply not a candidate
            warnings.warn(f"gemv {choice} on {tuple(weight.shape)} failed ({e}); not used", stacklevel=2)
    _best[key] = min(times, key=times.get)  # cuBLAS is always among them
    return _best[key]


def _median_ms(run, l2_flush: torch.Tensor, repeats: int = 15) -> float:
    for _ in range(3):
        run()  # compile, autotune, lazy initialization
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        l2_flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[repeats // 2]


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 matmul rounded to x's dtype: the exact result the kernel's fp32 accumulation approximates."""
    return (x.float() @ weight.float().T).to(x.dtype)
