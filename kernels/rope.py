"""Rotary position embedding for q and k, fused with the write of k and v into the static KV cache.

In every attention layer the new keys are rotated and then copied into the cache; doing both in one
kernel reads k once and writes it once, and the same launch rotates q and copies v. Cache slots come
from `input_pos`, a device tensor, so the launch is the same at every decode step (CUDA graphs).

Convention: Hugging Face's rotate-half, pairs (x[i], x[i + D/2]) with cos/sin of frequency i, so HF
checkpoints load without permuting wq/wk. The rotation is computed in fp32 and rounded once.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    src_row,
    stride_h,
    stride_d,
    n_heads,
    cos,
    sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Load the [n_heads, D] rows of one token and return the two rotated halves in fp32."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    ptrs = src_ptr + src_row + heads * stride_h + cols * stride_d
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, heads, cols, mask


@triton.jit
def _rope_and_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    input_pos_ptr,
    stride_pb,
    stride_pt,
    seq_len,
    n_heads,
    n_kv_heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token (b, t) handles all of its heads: cos/sin are loaded once and shared by
    # the H query heads and the KVH key heads, and the cache slot is looked up once.
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = pid % seq_len

    freq = tl.arange(0, BLOCK_HALF)[None, :]
    freq_mask = freq < HALF
    cos = tl.load(cos_ptr + b * stride_cb + t * stride_ct + freq * stride_cd, mask=freq_mask, other=0.0)
    sin = tl.load(sin_ptr + b * stride_cb + t * stride_ct + freq * stride_cd, mask=freq_mask, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)

    # q -> a fresh output tensor, rounded to q's dtype.
    q_row = b * stride_qb + t * stride_qt
    q1, q2, heads, cols, mask = _rotate_heads(
        q_ptr, q_row, stride_qh, stride_qd, n_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF
    )
    out_ptrs = q_out_ptr + b * stride_ob + t * stride_ot + heads * stride_oh + cols
    tl.store(out_ptrs, q1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=mask)

    # k -> rotated, rounded to k's dtype (what the unfused code would hold), stored at its slot.
    slot = tl.load(input_pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    k_row = b * stride_kb + t * stride_kt
    k1, k2, heads, cols, mask = _rotate_heads(
        k_ptr, k_row, stride_kh, stride_kd, n_kv_heads, cos, sin, HALF, BLOCK_KVH, BLOCK_HALF
    )
    k_dtype = k_ptr.dtype.element_ty
    cache_ptrs = k_cache_ptr + b * stride_kcb + heads * stride_kch + slot * stride_kcs + cols
    tl.store(cache_ptrs, k1.to(k_dtype).to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptrs + HALF, k2.to(k_dtype).to(k_cache_ptr.dtype.element_ty), mask=mask)

    # v -> copied to its slot unchanged.
    dims = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    v_mask = (heads < n_kv_heads) & (dims < 2 * HALF)
    v = tl.load(v_ptr + b * stride_vb + t * stride_vt + heads * stride_vh + dims * stride_vd, mask=v_mask)
    v_cache_ptrs = v_cache_ptr + b * stride_vcb + heads * stride_vch + slot * stride_vcs + dims
    tl.store(v_cache_ptrs, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k, write k and v into the caches at slots `input_pos`, return the rotated q.

    q: [B, T, H, D]; k, v: [B, T, KVH, D] (views of a fused qkv output are fine: any strides);
    cos, sin: [B, T, D/2] float32, per row so that each row of a ragged batch gets its own
    positions (the model pads ragged batches on the right: every row starts at position 0, and in a
    decode step each row is at its own position); k_cache, v_cache: [B_max, KVH, S, D] with
    B <= B_max (rows 0..B-1 are written);
    input_pos: LongTensor of cache slots, [T] (shared by every row) or [B, T] (per row, e.g. an
    expanded view: any strides); read on the device, so no host sync.
    """
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    half = head_dim // 2
    if head_dim % 2:
        raise ValueError(f"rope_and_cache: head_dim {head_dim} must be even")
    if k.shape != (batch, seq_len, n_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"rope_and_cache: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
            f"({batch}, {seq_len}, n_kv_heads, {head_dim}) to match q {tuple(q.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (batch, seq_len, half):
            raise ValueError(f"rope_and_cache: {name} is {tuple(table.shape)}, expected {(batch, seq_len, half)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] < batch or cache.shape[1] != n_kv_heads or cache.shape[3] != head_dim:
            raise ValueError(
                f"rope_and_cache: {name} is {tuple(cache.shape)}, expected "
                f"(>={batch}, {n_kv_heads}, max_seq_len, {head_dim})"
            )
        if cache.stride(3) != 1:
            raise ValueError(f"rope_and_cache: {name} must be contiguous in its last dimension")
    if input_pos.shape not in ((seq_len,), (batch, seq_len)):
        raise ValueError(
            f"rope_and_cache: input_pos is {tuple(input_pos.shape)}, expected ({seq_len},) or ({batch}, {seq_len})"
        )
    input_pos = input_pos.expand(batch, seq_len)  # a [T] input_pos gets batch stride 0

    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return q_out
    block_half = triton.next_power_of_2(half)
    block_h = triton.next_power_of_2(n_heads)
    # A token of the 8B model is 32 x 64 q pairs: 4 warps hold it in a few registers per thread.
    num_warps = 4 if block_h * block_half <= 4096 else 8
    _rope_and_cache_kernel[(batch * seq_len,)](
        q,
        k,
        v,
        cos,
        sin,
        q_out,
        k_cache,
        v_cache,
        input_pos,
        *input_pos.stride(),
        seq_len,
        n_heads,
        n_kv_heads,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *cos.stride(),
        *q_out.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_KVH=triton.next_power_of_2(n_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in PyTorch. x: [B, T, heads, D]; cos, sin: [B, T, D/2]; fp32 math."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    cos, sin = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_and_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
) -> torch.Tensor:
    """The unfused PyTorch version: rotate, then index the caches with input_pos (in place)."""
    batch, seq_len = q.shape[:2]
    rows = torch.arange(batch, device=q.device)[:, None]
    slots = input_pos.expand(batch, seq_len)
    # cache[rows, :, slots] is indexed as (B, T, KVH, D): the advanced indices come first
    k_cache[rows, :, slots] = apply_rope_reference(k, cos, sin).to(k_cache.dtype)
    v_cache[rows, :, slots] = v.to(v_cache.dtype)
    return apply_rope_reference(q, cos, sin)
