"""Flash-decoding: attention of one new query token per row over a static KV cache.

Decode attention is memory-bound: every step reads the whole valid part of the K and V cache once.
To keep an H100 busy when the batch is small, the cache length is split among `num_splits`
programs per (row, KV head) ("split-K"); each writes a partial softmax (running max, running sum,
unnormalized output) and a second small kernel combines the splits. With grouped-query attention
one program serves all H / KVH query heads that share a KV head, so each K/V block is read once.

CUDA graphs: the number of valid slots changes every step (and per row, in a ragged batch) but is
read inside the kernel from the device tensor `input_pos`, and the grid depends only on
(B, KVH, S), so one captured graph replays at every step. The valid span of a row is divided among
its splits at run time, so the work stays balanced whether 10 or 100,000 slots are filled, and
splits with nothing to do exit at once.

Numerics: q @ k^T and p @ v run on tensor cores with fp32 accumulation; the softmax statistics
and the output accumulator are fp32. As in FlashAttention, the probabilities are rounded to the
cache dtype for the p @ v product (exact when the cache is fp32).
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seq_start_ptr,
    input_pos_ptr,
    stride_pos,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    scale_log2e,
    n_kv_heads,
    head_dim,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    HAS_SEQ_START: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kv_head = pid_bh % n_kv_heads

    # Valid slots of this row: [seq_start[b] (or 0), input_pos[b]]; the rest is never read.
    lo = 0
    if HAS_SEQ_START:
        lo = tl.load(seq_start_ptr + b).to(tl.int32)
    hi = tl.load(input_pos_ptr + b * stride_pos).to(tl.int32) + 1
    # This split's share of them, in whole blocks so that only the last block of a split is partial.
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    # The query heads of this KV group, padded to BLOCK_H >= 16 rows (the smallest tensor-core tile).
    group_rows = tl.arange(0, BLOCK_H)
    head_mask = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    b64 = b.to(tl.int64)
    q = tl.load(
        q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)

    k_base = k_cache_ptr + b64 * stride_kb + kv_head * stride_kh
    v_base = v_cache_ptr + b64 * stride_vb + kv_head * stride_vh
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for block_start in range(start, end, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        slot_mask = slots < end
        kv_mask = slot_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
        # Scores in log2 units, so that exp2 (one instruction) replaces exp.
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        scores = tl.where(slot_mask[None, :], scores, float("-inf"))
        # Every block holds at least one valid slot (block_start < end), so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        v = tl.load(v_base + slots[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    # Partials are [B, H, num_splits, (D)]; an idle split writes max -inf, sum 0, acc 0.
    row = (b64 * n_kv_heads * GROUP + heads) * num_splits + split
    tl.store(partial_max_ptr + row, running_max, mask=head_mask)
    tl.store(partial_sum_ptr + row, running_sum, mask=head_mask)
    tl.store(
        partial_acc_ptr + row[:, None] * head_dim + dims[None, :],
        acc,
        mask=head_mask[:, None] & dim_mask[None, :],
    )


@triton.jit
def _decode_attention_combine_kernel(
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    out_ptr,
    n_heads,
    head_dim,
    num_splits,
    stride_ob,
    stride_oh,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (row, query head) rescales each split's partial to the global max and sums.
    pid = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    rows = pid * num_splits + splits
    split_max = tl.load(partial_max_ptr + rows, mask=split_mask, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + rows, mask=split_mask, other=0.0)
    split_acc = tl.load(
        partial_acc_ptr + rows[:, None] * head_dim + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    weight = tl.exp2(split_max - tl.max(split_max, axis=0))  # 0 for idle splits (max -inf)
    out = tl.sum(split_acc * weight[:, None], axis=0) / tl.sum(split_sum * weight, axis=0)
    b = pid // n_heads
    head = pid % n_heads
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def _default_num_splits(batch: int, n_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits for a few waves of programs over the GPU, but at least a block per split.

    Depends only on shapes (not on how many slots are filled), so the grid is fixed for a CUDA graph.
    """
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128
    wanted = triton.cdiv(4 * n_sm, batch * n_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_seq_len, block_n), 128))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float | None = None,
    *,
    seq_start: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over cache slots seq_start[b] .. input_pos[b], inclusive.

    q: [B, H, D] (already rotated); k_cache, v_cache: [B_max, KVH, S, D], rows 0..B-1 used;
    input_pos: LongTensor [B] (per row: right-padded ragged batches) or [1] (shared), on the device:
    the slot of the current token. seq_start: optional LongTensor [B], the first valid slot of each
    row (default 0, which is what the model uses: it pads ragged batches on the right, so every row
    starts at slot 0 and only its input_pos differs); must be <= input_pos. scale defaults to 1/sqrt(D).
    num_splits overrides the split count chosen from B, KVH and S.
    Returns [B, H, D] in q's dtype. No host synchronization: safe to capture in a CUDA graph.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] < batch or cache.shape[1:] != (n_kv_heads, max_seq_len, head_dim):
            raise ValueError(
                f"decode_attention: {name} is {tuple(cache.shape)}, expected "
                f"(>={batch}, {n_kv_heads}, {max_seq_len}, {head_dim}) to match q {tuple(q.shape)}"
            )
        if cache.stride(3) != 1:
            raise ValueError(f"decode_attention: {name} must be contiguous in its last dimension")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"decode_attention: k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if n_heads % n_kv_heads:
        raise ValueError(f"decode_attention: {n_heads} query heads is not a multiple of {n_kv_heads} KV heads")
    if input_pos.numel() not in (1, batch) or input_pos.dim() != 1:
        raise ValueError(f"decode_attention: input_pos is {tuple(input_pos.shape)}, expected ({batch},) or (1,)")
    if seq_start is not None and seq_start.shape != (batch,):
        raise ValueError(f"decode_attention: seq_start is {tuple(seq_start.shape)}, expected ({batch},)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = n_heads // n_kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    # tl.dot needs every tile dimension >= 16.
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    # A 64-slot K block of D = 128 in bf16 is 16 KiB: three pipeline stages of K and V fit in
    # shared memory, and 4 warps cover the [16, 64] score tile and the [16, 128] accumulator.
    block_n = 64 if block_d <= 128 else 32
    if num_splits is None:
        num_splits = _default_num_splits(batch, n_kv_heads, max_seq_len, block_n, q.device)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    partial_acc = torch.empty((batch, n_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    partial_max = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)
    partial_sum = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)

    _decode_attention_split_kernel[(batch * n_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        input_pos if seq_start is None else seq_start,  # not read without a seq_start
        input_pos,
        0 if input_pos.numel() == 1 else input_pos.stride(0),
        partial_acc,
        partial_max,
        partial_sum,
        scale * math.log2(math.e),
        n_kv_heads,
        head_dim,
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        HAS_SEQ_START=seq_start is not None,
        GROUP=group,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        # fp32 caches would otherwise be multiplied in tf32 (10-bit mantissa) on the GPU.
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    _decode_attention_combine_kernel[(batch * n_heads,)](
        partial_acc,
        partial_max,
        partial_sum,
        out,
        n_heads,
        head_dim,
        num_splits,
        out.stride(0),
        out.stride(1),
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float | None = None,
    *,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: fp32 softmax over the valid slots of each row, every query head its KV head."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    keys = k_cache[:batch].float().repeat_interleave(n_heads // n_kv_heads, dim=1)  # (B, H, S, D)
    values = v_cache[:batch].float().repeat_interleave(n_heads // n_kv_heads, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys) * scale
    slots = torch.arange(max_seq_len, device=q.device)
    first = 0 if seq_start is None else seq_start[:, None]
    valid = (slots[None, :] >= first) & (slots[None, :] <= input_pos[:, None])  # (B or 1, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), values).to(q.dtype)
