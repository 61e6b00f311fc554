"""The Triton backend computes what the PyTorch backend computes (kernels in the interpreter on CPU,
compiled on a CUDA device when there is one)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fill_cache_with_garbage

from llama3 import Llama, Transformer
from llama3.model.backends import CpuOps, TorchOps, TritonOps, get_ops
from llama3.model.config import ModelArgs
from llama3.model.functional import apply_rope, attention, rope_tables
from llama3.model.transformer import KVCache, RMSNorm, TransformerBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def decode_logits(model: Transformer, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then decode the rest one at a time; the logits of every position."""
    B, T = tokens.shape
    model.setup_cache(B, 64)
    out = [model(tokens[:, :prefill], torch.arange(prefill, device=tokens.device))]
    for t in range(prefill, T):
        out.append(model(tokens[:, t : t + 1], torch.full((B, 1), t, device=tokens.device)))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", ["llama3-gqa", "mqa", "llama3.1-scaled"])
def test_triton_backend_matches_torch_backend(tiny_hf, variant):
    d, _ = tiny_hf(variant)
    torch_model = Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend="torch")
    triton_model = Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend="triton")
    assert torch_model.ops is TorchOps and triton_model.ops is TritonOps
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        expected = decode_logits(torch_model, tokens, prefill=8)
        got = decode_logits(triton_model, tokens, prefill=8)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_ragged_decode_step_matches(tiny_hf):
    """Rows at different cache positions in one decode step (right-padded ragged batch)."""
    d, _ = tiny_hf("llama3-gqa")
    models = [
        Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=b) for b in ("torch", "triton")
    ]
    tokens = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = torch.tensor([[4], [9], [6]], device=DEVICE)
    outs = []
    with torch.no_grad():
        for m in models:
            m.setup_cache(3, 32)
            m(tokens, torch.arange(10, device=DEVICE))
            outs.append(m(tokens[:, :1], pos))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


class TokenIds:
    """Generation on token ids needs only the vocabulary size and the stop tokens of a tokenizer."""

    n_words, stop_tokens = 512, []


def test_graph_form_decode_step_matches_torch_backend(tiny_hf):
    """The triton decode step in the form a CUDA graph captures (fixed buffers, the length read on the
    device by the kernels), with garbage in the cache slots no row has reached yet. On CUDA it is
    captured and replayed."""
    d, _ = tiny_hf("llama3-gqa")
    load = lambda backend: Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=backend)  # noqa: E731
    eager = Llama(load("torch"), TokenIds(), cuda_graphs=False)
    graph_form = Llama(load("triton"), TokenIds(), cuda_graphs=True)
    fill_cache_with_garbage(graph_form.model, batch=2, slots=256)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert graph_form.generate(prompts, 8, temperature=0) == eager.generate(prompts, 8, temperature=0)
    assert all(
        step.static and (step.captured.graph is not None) == (DEVICE == "cuda") for step in graph_form._steps.values()
    )


def test_backend_choice():
    assert get_ops("auto", "cpu") is CpuOps  # the lean decode step: tests/test_cpu_backend.py
    assert get_ops("torch", "cpu") is TorchOps
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        get_ops("cuda", "cpu")


def test_missing_kernels_package_is_explained(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama3.kernels" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install -e"):
        get_ops("triton", "cpu")
    with pytest.warns(UserWarning, match="PyTorch backend on CUDA"):
        assert get_ops("auto", "cuda") is TorchOps


# --- each backend's form against the reference in llama3.model, on random fp32 inputs --------------

B, T, H, KVH, D, DIM, S = 3, 5, 4, 2, 16, 64, 24


def random_tables(g: torch.Generator, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return rope_tables(positions[..., None].float() * inv_freq)


def hand_attention(q, keys, values, mask):
    """softmax(q k^T / sqrt(D) + mask) v written out, each key/value head repeated for its H/KVH query heads."""
    groups = q.shape[2] // keys.shape[1]
    k, v = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = q.transpose(1, 2) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(q.shape[1], k.shape[2], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D)


def test_kv_cache_update_writes_each_token_at_its_slot():
    """KVCache.update's in-place write through a transposed view, against a loop over (row, token)."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache(B + 1, S, KVH, D, torch.float32, "cpu")
    k, v = torch.randn(B, T, KVH, D, generator=g), torch.randn(B, T, KVH, D, generator=g)
    input_pos = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])  # (B, T), any slots
    keys, values = cache.update(input_pos, k, v)
    expected_k, expected_v = torch.zeros(B + 1, KVH, S, D), torch.zeros(B + 1, KVH, S, D)
    for b in range(B):
        for t in range(T):
            expected_k[b, :, input_pos[b, t]] = k[b, t]
            expected_v[b, :, input_pos[b, t]] = v[b, t]
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
    assert torch.equal(keys, expected_k[:B]) and torch.equal(values, expected_v[:B])


def test_kv_cache_rows_write_into_the_whole_cache():
    """KVCache.rows(first, n): a batch of n rows written through the view lands in rows first..first+n-1."""
    g = torch.Generator().manual_seed(6)
    cache = KVCache(B + 2, S, KVH, D, torch.float32, "cpu")
    k, v = torch.randn(B, T, KVH, D, generator=g), torch.randn(B, T, KVH, D, generator=g)
    input_pos = torch.arange(T).expand(B, T).contiguous()
    cache.rows(2, B).update(input_pos, k, v)
    expected = KVCache(B, S, KVH, D, torch.float32, "cpu")
    expected.update(input_pos, k, v)
    assert torch.equal(cache.k[2:], expected.k) and torch.equal(cache.v[2:], expected.v)
    assert not cache.k[:2].any() and not cache.v[:2].any()


@pytest.mark.parametrize("ops", [TorchOps, TritonOps], ids=["torch", "triton"])
@torch.no_grad()
def test_rope_and_cache_is_apply_rope_then_cache_update(ops):
    """The backends' rope_and_cache (Triton: one kernel) against apply_rope on q and k, then KVCache.update."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, n, D, generator=g) for n in (H, KVH, KVH))
    input_pos = torch.arange(T)[None] + torch.tensor([[0], [7], [3]])  # (B, T): each row at its own offset
    cos, sin = random_tables(g, input_pos)
    ref = KVCache(B, S, KVH, D, torch.float32, "cpu")
    ref_keys, ref_values = ref.update(input_pos, apply_rope(k, cos, sin), v)
    cache = KVCache(B, S, KVH, D, torch.float32, "cpu")
    got_q, keys, values = ops.rope_and_cache(q, k, v, cos, sin, cache, input_pos)
    torch.testing.assert_close(got_q, apply_rope(q, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(keys, ref_keys, atol=1e-6, rtol=1e-6)
    assert torch.equal(values, ref_values)
    # without a cache: this sequence's own keys and values, (B, KVH, T, D)
    got_q, keys, values = ops.rope_and_cache(q, k, v, cos, sin, None, None)
    torch.testing.assert_close(keys, apply_rope(k, cos, sin).transpose(1, 2), atol=1e-6, rtol=1e-6)
    assert torch.equal(values, v.transpose(1, 2))


@pytest.mark.parametrize("ops", [TorchOps, TritonOps], ids=["torch", "triton"])
@pytest.mark.parametrize("kv_heads", [KVH, 1, H], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("step", ["decode", "prefill", "causal"])
@torch.no_grad()
def test_attention_is_softmax_attention(ops, kv_heads, step):
    """The backends' attention (the CPU's copy-free grouped decode, Triton's flash-decoding) and the
    reference `attention`, against softmax(q k^T / sqrt(D) + mask) v written out."""
    g = torch.Generator().manual_seed(2)
    n_new = 1 if step == "decode" else T
    q = torch.randn(B, n_new, H, D, generator=g)
    keys, values = torch.randn(B, kv_heads, S, D, generator=g), torch.randn(B, kv_heads, S, D, generator=g)
    if step == "causal":  # no cache: the T new tokens attend causally among themselves
        keys, values, input_pos, mask = keys[:, :, :T], values[:, :, :T], None, None
    else:
        input_pos = torch.tensor([[9], [2], [14]]) + torch.arange(n_new)  # (B, T)
        kv_len = 20  # slots kv_len..S are never read
        mask = (torch.arange(kv_len) <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T, kv_len)
    n = T if mask is None else mask.shape[-1]  # the slots the mask covers
    expected = hand_attention(q, keys[:, :, :n], values[:, :, :n], mask)
    torch.testing.assert_close(ops.attention(q, keys, values, mask, input_pos), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, keys[:, :, :n], values[:, :, :n], mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65])
def test_cpu_decode_linear_is_f_linear(rows):
    """TorchOps.linear's decode form (weight @ x.T for 2-64 fp32 rows on the CPU) against F.linear."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(DIM, 3 * DIM, bias=False)
    torch.nn.init.normal_(layer.weight, generator=g)
    x = torch.randn(rows, 1, DIM, generator=g)
    got = TorchOps.linear(x, layer)
    assert got.shape == (rows, 1, 3 * DIM)
    torch.testing.assert_close(got, F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_triton_residual_fused_norm_is_add_then_rms_norm():
    """The Triton norm with the residual add fused in returns (RMSNorm(x + r), x + r)."""
    from llama3.kernels.rms_norm import rms_norm

    g = torch.Generator().manual_seed(4)
    x, r = torch.randn(B, T, DIM, generator=g), torch.randn(B, T, DIM, generator=g)
    norm = RMSNorm(DIM, 1e-5)
    norm.weight.copy_(torch.randn(DIM, generator=g))
    out, h = rms_norm(x, norm.weight, norm.eps, r)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(out, norm(x + r), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ops", [TorchOps, TritonOps], ids=["torch", "triton"])
@torch.no_grad()
def test_run_block_is_the_pre_norm_block(ops):
    """A backend's run_block (Triton: its norms fused with the residual add) against the block written
    out from the reference modules: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""
    g = torch.Generator().manual_seed(5)
    args = ModelArgs(dim=DIM, n_layers=1, n_heads=H, n_kv_heads=KVH, vocab_size=32, ffn_dim=96, max_seq_len=S)
    block = TransformerBlock(args)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2, generator=g)
    block.attention.cache = KVCache(B, S, KVH, D, torch.float32, "cpu")
    x = torch.randn(B, T, DIM, generator=g)
    input_pos = torch.arange(T).expand(B, T).contiguous()
    cos, sin = random_tables(g, input_pos)
    mask = (torch.arange(T) <= input_pos[..., None]).unsqueeze(1)

    def reference_attention(a: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = block.attention.wqkv.weight.split([H * D, KVH * D, KVH * D])
        q = apply_rope((a @ wq.T).view(B, T, H, D), cos, sin)
        k = apply_rope((a @ wk.T).view(B, T, KVH, D), cos, sin).transpose(1, 2)
        v = (a @ wv.T).view(B, T, KVH, D).transpose(1, 2)
        return hand_attention(q, k, v, mask).reshape(B, T, H * D) @ block.attention.wo.weight.T

    def reference_feed_forward(a: torch.Tensor) -> torch.Tensor:
        w1, w3 = block.feed_forward.w13.weight.chunk(2)
        return (F.silu(a @ w1.T) * (a @ w3.T)) @ block.feed_forward.w2.weight.T

    h = x + reference_attention(block.attention_norm(x))
    expected = h + reference_feed_forward(block.ffn_norm(h))
    got = ops.run_block(block, x, cos, sin, mask, input_pos, ops)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
