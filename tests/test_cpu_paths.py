"""Branches written for CUDA, run on the CPU where a test can force them.

Grouped-query attention with a mask expands the key/value heads with `repeat_interleave` only when the
query is on CUDA (`TorchOps.attention`); a tensor subclass that reports `is_cuda` takes that branch on
the CPU, and the result is checked against grouped-query attention written out from its definition
(query head h reads key/value head h // (H / KVH), Meta's `repeat_kv`). What cannot run here: the CUDA
graph capture and replay itself (`CapturedStep._capture`); its eager path runs on the CPU in test_graphs, and
the body it captures for generation, `DecodeStep._static_body`, in test_generation's graph-form tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from llama3.model.backends import TorchOps


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose `is_cuda` says True, recording the torch functions applied to it."""

    calls: list[str] = []

    @property
    def is_cuda(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def grouped_query_attention(q, keys, values, mask):
    """softmax(q k^T / sqrt(D) + mask) v per query head, head h against key/value head h // (H / KVH).
    q (B, T, H, D); keys, values (B, KVH, S, D); mask (B, 1, T, S) bool. Returns (B, T, H, D)."""
    B, T, H, D = q.shape
    KVH = keys.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for h in range(H):
        k, v = keys[:, h // (H // KVH)].double(), values[:, h // (H // KVH)].double()  # (B, S, D)
        scores = q[:, :, h].double() @ k.transpose(1, 2) / math.sqrt(D)  # (B, T, S)
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        out[:, :, h] = torch.softmax(scores, dim=-1) @ v
    return out


@pytest.mark.parametrize("H, KVH", [(8, 2), (6, 3), (4, 4)])
def test_expanded_heads_branch_equals_grouped_query_attention(H, KVH):
    """The CUDA branch (mask, T > 1, H != KVH: `repeat_interleave` of K and V) on the CPU."""
    g = torch.Generator().manual_seed(0)
    B, T, S, D = 2, 5, 9, 16
    q = torch.randn(B, T, H, D, generator=g)
    keys, values = torch.randn(B, KVH, S, D, generator=g), torch.randn(B, KVH, S, D, generator=g)
    pos = torch.tensor([[2, 3, 4, 5, 6], [4, 5, 6, 7, 8]])  # a prefill continuing a cached prefix
    mask = (torch.arange(S) <= pos[..., None]).unsqueeze(1)  # (B, 1, T, S)
    ReportsCuda.calls = []
    on_cuda = [t.as_subclass(ReportsCuda) for t in (q, keys, values)]
    out = TorchOps.attention(*on_cuda, mask, pos)
    assert ("repeat_interleave" in ReportsCuda.calls) == (H != KVH)  # the branch under test ran
    expected = grouped_query_attention(q, keys, values, mask)
    torch.testing.assert_close(out.as_subclass(torch.Tensor).double(), expected, rtol=1e-5, atol=1e-5)
    # and the CPU branch (SDPA's enable_gqa) computes the same
    torch.testing.assert_close(TorchOps.attention(q, keys, values, mask, pos).double(), expected, rtol=1e-5, atol=1e-5)
