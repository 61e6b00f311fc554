from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llama3.model.config import ModelArgs


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/D), fp32, with Llama 3.1's wavelength-dependent scaling.

    Computed on the CPU with the same fp32 ops as transformers, so angles (and logits) agree to the last
    bit, then moved to `device` (on the meta device these ops would also import torch._dynamo: seconds).
    """
    D = args.head_dim
    if args.position_embedding == "none":  # NoPE: every angle 0, so RoPE's rotation is the identity
        return torch.zeros(D // 2, device=device)
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = args.rope_scaling
    if s is None:
        return inv_freq.to(device)
    L = s.original_max_position_embeddings
    wavelen = 2 * torch.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > L / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= L / s.high_freq_factor) & (wavelen <= L / s.low_freq_factor)
    return torch.where(in_band, blended, scaled).to(device)


def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles (B, T, D/2) laid out for `apply_rope`: cat(cos, cos) and cat(-sin, sin),
    each (B, T, 1, D). Built once per forward, used by every layer."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).unsqueeze(2), torch.cat((-sin, sin), dim=-1).unsqueeze(2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (Su et al. 2021): rotates each pair (x[i], x[i + D/2]) by the angle position * inv_freq[i].

    The rotate-half pairing of HF checkpoints (Meta's pairs (x[2i], x[2i+1]) are permuted into it when
    loading). x (B, T, heads, D) is rotated in fp32, as Meta's reference does: x * cos + roll(x) * sin
    is transformers' `x * cos + rotate_half(x) * sin` product for product, so fp32 results agree to the bit.
    """
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, each group of H/KVH query heads sharing one key/value head.

    q (B, T, H, D); keys, values (B, KVH, S, D); mask (B, 1, T, S) bool (True: attend), or None for causal
    attention within the T new tokens. Returns (B, T, H, D) in q's dtype.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
    )  # (B, H, T, D)
    return out.transpose(1, 2).to(q.dtype)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(x w1) * (x w3), from the gate x w1 and up x w3 side by side in the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
