"""RMSNorm, optionally fused with the residual add that precedes it in every transformer block.

A Llama block computes `h = x + attention(norm(x))` and then `norm(h)` for the feed-forward; fusing
the add into the norm reads `x` and the residual once and writes `h` and `norm(h)` in the same pass,
instead of a separate add kernel that writes `h` only for the norm to read it straight back.

Numerics follow Hugging Face's `LlamaRMSNorm` exactly, cast for cast: normalize in fp32, round the
normalized row to the input dtype, then multiply by the weight in the (promoted) dtype.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    hidden_ptr,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    hidden_row_stride,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row: a row (dim <= 16384 for every Llama 3) fits in registers, so the sum of
    # squares and the normalization need a single read of the row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim

    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # PyTorch's `x + residual` rounds the sum to the input dtype; the norm then sees that rounded
        # value, so round here too before normalizing.
        hidden = (x + residual.to(tl.float32)).to(hidden_ptr.dtype.element_ty)
        tl.store(hidden_ptr + row * hidden_row_stride + cols, hidden, mask=mask)
        x = hidden.to(tl.float32)

    variance = tl.sum(x * x, axis=0) / dim
    rstd = tl.rsqrt(variance + eps)
    # HF: `weight * (x.float() * rstd).to(input_dtype)`: the rounding to the input dtype happens
    # before the weight multiply, and the product is rounded once more to the output dtype.
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (normed * weight).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def _num_warps(block: int) -> int:
    """Enough warps that each thread holds a handful of elements, not hundreds, of a long row."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(rms_norm(hidden) * weight, hidden)` where `hidden = x + residual` (or `x`).

    x: [..., dim]; weight: [dim]; residual: same shape and dtype as x, or None. Without a residual
    `hidden` is `x` itself. The output dtype is PyTorch's promotion of x's and weight's dtypes, as in
    `LlamaRMSNorm` (x's dtype whenever the weight has the same dtype, the usual case).
    """
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({dim},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual is {tuple(residual.shape)} {residual.dtype}, "
            f"expected {tuple(x.shape)} {x.dtype} like x"
        )
    x_rows = x.reshape(-1, dim)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out_rows = out.view(-1, dim)

    if residual is None:
        hidden, hidden_rows, residual_rows = x, out_rows, x_rows  # unused by the kernel
    else:
        residual_rows = residual.reshape(-1, dim)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
        hidden = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        hidden_rows = hidden.view(-1, dim)

    n_rows = x_rows.shape[0]
    if n_rows == 0:
        return out, hidden
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(n_rows,)](
        x_rows,
        residual_rows,
        weight,
        out_rows,
        hidden_rows,
        x_rows.stride(0),
        residual_rows.stride(0),
        out_rows.stride(0),
        hidden_rows.stride(0),
        dim,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out, hidden


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in plain PyTorch, written as Hugging Face's `LlamaRMSNorm` computes it."""
    hidden = x if residual is None else x + residual
    h = hidden.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(hidden.dtype), hidden
