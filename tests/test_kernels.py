"""Each Triton kernel against an independent reference (transformers' code, or PyTorch written from the
definition), on odd shapes.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, in fp32 and fp16 (the
interpreter computes bf16 wrongly); bf16 cases run only on CUDA and are skipped here. Shapes are
small because the interpreter costs about 2 ms per program.

RMSNorm and SwiGLU promise transformers' rounding order, cast for cast. A wrong order moves a 16-bit
result by one ulp, well inside any tolerance, so those tests compare bit for bit on inputs chosen to
make the fp32 math exact, and check in the test that the wrong order would differ on those inputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must be set before triton decorates the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llama3.kernels.decode_attention import decode_attention  # noqa: E402
from llama3.kernels.gemv import best_gemv_config, gemv  # noqa: E402
from llama3.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from llama3.kernels.rope import rope_and_cache  # noqa: E402
from llama3.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="interpreter bf16 is wrong; CUDA only")),
]
# Room for a one-ulp difference in a rounded intermediate (fp32 sums in another order, exp2 vs exp).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
EPS = 1e-5


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_wrong_order_would_fail(ref: torch.Tensor, wrong_order: torch.Tensor) -> None:
    """The inputs expose the rounding order: rounding the other way changes many elements (measured ~25%)."""
    differs = (wrong_order != ref).float().mean().item()
    assert differs >= 0.1, f"the wrong rounding order differs in only {differs:.1%} of elements: inputs too weak"


# --- RMSNorm ------------------------------------------------------------------------------------


def hf_rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm holding `weight`: fp32 norm, cast to the input dtype, then `weight * x`."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden.shape[-1], eps=eps).to(device=hidden.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(hidden)


GRID_SPAN = 64  # on_grid values are k / 16 for integers |k| <= GRID_SPAN


def on_grid(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/16 up to 4 in magnitude: exact in fp16 and bf16, and their squares (multiples of
    2^-8) sum exactly in fp32, in any order, while dim * (2 * GRID_SPAN)^2 < 2^24 (a sum of two rows
    included). So the variance is the same float whatever order a kernel reduces in, every later fp32 op
    is correctly rounded in the interpreter as in PyTorch, and only the rounding order can differ."""
    k = torch.randint(-GRID_SPAN, GRID_SPAN + 1, shape, device=DEVICE)
    return (k / 16).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 80), (1, 1, 256)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf_rounding(shape: tuple[int, ...], dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(0)
    assert shape[-1] * (2 * GRID_SPAN) ** 2 < 2**24  # the sum of squares is exact (see on_grid)
    x = on_grid(*shape, dtype=dtype)
    residual = on_grid(*shape, dtype=dtype) if with_residual else None
    weight = randn(shape[-1], dtype=dtype, scale=4.0)  # not near 1: the product's rounding matters
    out, hidden = rms_norm(x, weight, EPS, residual)
    assert out.dtype == dtype and out.shape == x.shape
    if with_residual:
        torch.testing.assert_close(hidden, x + residual, atol=0, rtol=0)
    else:
        assert hidden is x
    ref = hf_rms_norm(x if residual is None else x + residual, weight, EPS)
    assert torch.equal(rms_norm_reference(x, weight, EPS, residual)[0], ref)  # the kernel file's own reference

    if not CUDA:  # exact: the sum of squares is exact, and the interpreter's fp32 ops round as PyTorch's do
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        # On the GPU tl.rsqrt is the hardware's approximate rsqrt (not correctly rounded, nor is CUDA's
        # rsqrtf), so the fp32 results may be an ulp apart, and a 16-bit value next to a rounding boundary
        # one ulp off: a few elements per thousand at most, against ~25% for the wrong rounding order.
        if dtype != torch.float32:
            assert (out != ref).float().mean().item() <= 0.01
        torch.testing.assert_close(out, ref, **TOL[dtype])
    if dtype != torch.float32:
        wrong_order = (weight * fp32_normalized(hidden)).to(dtype)  # weight applied before the cast
        assert_wrong_order_would_fail(ref, wrong_order)


def fp32_normalized(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_add_normalizes_the_rounded_sum(dtype: torch.dtype) -> None:
    """`x + residual` is rounded to the input dtype (as PyTorch's add is) before it is normalized: the
    fused kernel gives bit for bit what the kernel gives on the sum PyTorch computed. (Same kernel, same
    reduction order, so exact even on random inputs; the unfused kernel is checked against HF above.)"""
    torch.manual_seed(0)
    x, residual = randn(4, 96, dtype=dtype, scale=3.0), randn(4, 96, dtype=dtype)
    weight = randn(96, dtype=dtype, scale=4.0)
    out, hidden = rms_norm(x, weight, EPS, residual)
    torch.testing.assert_close(hidden, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, rms_norm(x + residual, weight, EPS)[0], atol=0, rtol=0)
    if dtype != torch.float32:  # normalizing the unrounded sum would show in the output
        unrounded = x.float() + residual.float()
        assert not torch.equal(weight * fp32_normalized(unrounded).to(dtype), hf_rms_norm(x + residual, weight, EPS))


# --- SwiGLU -------------------------------------------------------------------------------------


def gates_with_unambiguous_silu(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Random gate values whose exact silu lies at least 2^-16 (relative) from a rounding boundary of the
    16-bit dtype. Any fp32 silu, however its exp is computed (PyTorch's vectorized exp, numpy's in the
    interpreter, exp2 or the approximate ex2 on a GPU: all within a few fp32 ulps, 2^-24 each), then rounds
    to the same 16-bit value, and the 16-bit product act * up is exact in fp32 before its one rounding: the
    two orders of rounding are the only thing left that can differ."""
    gate = randn(*shape, dtype=dtype, scale=3.0)
    for _ in range(50):
        exact = F.silu(gate.double())
        ambiguous = (exact * (1 - 2**-16)).to(dtype) != (exact * (1 + 2**-16)).to(dtype)
        if not ambiguous.any():
            return gate
        gate[ambiguous] = randn(int(ambiguous.sum()), dtype=dtype, scale=3.0)
    raise AssertionError("could not draw gates away from rounding boundaries")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 123), (2, 3, 2 * 80), (1, 2 * 1500)])  # 1500: two column blocks
def test_swiglu_matches_silu_gate_times_up(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    n_cols = shape[-1] // 2
    if dtype == torch.float32:
        gate = randn(*shape[:-1], n_cols, dtype=dtype, scale=3.0)
    else:
        gate = gates_with_unambiguous_silu(*shape[:-1], n_cols, dtype=dtype)
    up = randn(*shape[:-1], n_cols, dtype=dtype, scale=3.0)
    gate_up = torch.cat([gate, up], dim=-1)
    out = swiglu(gate_up)
    assert out.shape == (*shape[:-1], n_cols) and out.dtype == dtype

    # transformers' LlamaMLP: `act_fn(gate_proj(x)) * up_proj(x)`, the activation rounded to the dtype first
    ref = ACT2FN["silu"](gate) * up
    if dtype == torch.float32:
        # Nothing is rounded between silu and the product, but exp is computed differently by the kernel
        # (and by PyTorch itself on strided and contiguous rows): fp32 silu differs by an ulp in ~15% of
        # elements. There is no rounding order to check in fp32.
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(swiglu_reference(gate_up), ref, **TOL[dtype])
    else:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        assert torch.equal(swiglu_reference(gate_up), ref)  # the kernel file's own reference
        assert_wrong_order_would_fail(ref, (F.silu(gate.float()) * up.float()).to(dtype))  # rounded once


def _qkv_views(batch: int, seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the model makes them: strided views into one fused qkv projection output."""
    qkv = randn(batch, seq_len, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return (
        q.view(batch, seq_len, n_heads, head_dim),
        k.view(batch, seq_len, n_kv_heads, head_dim),
        v.view(batch, seq_len, n_kv_heads, head_dim),
    )


def hf_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (rotate-half, cos/sin = cat(freqs, freqs)) in fp32, rounded once.
    x: (B, T, heads, D); cos, sin: (B, T, D/2)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = torch.cat((cos, cos), dim=-1).float(), torch.cat((sin, sin), dim=-1).float()
    rotated, _ = apply_rotary_pos_emb(x.float(), x.float(), cos, sin, unsqueeze_dim=2)
    return rotated.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, max_batch, seq_len, n_heads, n_kv_heads, head_dim, max_seq_len, per_row_pos",
    [
        (2, 3, 3, 8, 2, 24, 11, False),  # prefill chunk, GQA, fewer rows than the cache holds
        (3, 3, 1, 4, 1, 80, 20, True),  # decode, MQA, D/2 = 40 not a power of two, per-row slots
        (2, 2, 5, 4, 4, 16, 9, True),  # MHA, per-row slots
    ],
)
def test_rope_and_cache_rotates_and_writes_only_input_pos(
    batch: int,
    max_batch: int,
    seq_len: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    per_row_pos: bool,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    q, k, v = _qkv_views(batch, seq_len, n_heads, n_kv_heads, head_dim, dtype)
    if per_row_pos:  # each row at its own slots, as in a right-padded ragged batch
        input_pos = torch.stack([torch.arange(seq_len) + 2 * b + 1 for b in range(batch)]).to(DEVICE)
    else:
        input_pos = torch.arange(2, 2 + seq_len, device=DEVICE)
    angles = input_pos.expand(batch, seq_len)[..., None].float() * torch.rand(head_dim // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    k_cache = randn(max_batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
    v_cache = randn(max_batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_old, v_old = k_cache.clone(), v_cache.clone()

    q_rot = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, input_pos)
    q_ref = hf_rotate(q, cos, sin)
    rows, slots = torch.arange(batch, device=DEVICE)[:, None], input_pos.expand(batch, seq_len)
    k_ref[rows, :, slots] = hf_rotate(k, cos, sin)  # indexed as (B, T, KVH, D): advanced indices first
    v_ref[rows, :, slots] = v

    assert q_rot.shape == q.shape and q_rot.dtype == dtype
    torch.testing.assert_close(q_rot, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_cache, k_ref, **TOL[dtype])
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)  # v is copied, not computed
    # every slot not named by input_pos, and every row beyond the batch, keeps its old contents
    written = torch.zeros(max_batch, max_seq_len, dtype=torch.bool, device=DEVICE)
    written[torch.arange(batch, device=DEVICE)[:, None], input_pos.expand(batch, seq_len)] = True
    untouched = (~written)[:, None, :].expand(max_batch, n_kv_heads, max_seq_len)
    assert torch.equal(k_cache[untouched], k_old[untouched])
    assert torch.equal(v_cache[untouched], v_old[untouched])


def sdpa_over_valid_slots(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention in fp32 over slots seq_start[b]..input_pos[b] of each row,
    query head h reading KV head h // (H / KVH) (transformers' repeat_kv)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    batch, n_heads, _ = q.shape
    n_kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    keys = repeat_kv(k_cache[:batch].float(), n_heads // n_kv_heads)  # (B, H, S, D)
    values = repeat_kv(v_cache[:batch].float(), n_heads // n_kv_heads)
    slots = torch.arange(max_seq_len, device=q.device)
    first = torch.zeros(batch, dtype=torch.long, device=q.device) if seq_start is None else seq_start
    valid = (slots >= first[:, None]) & (slots <= input_pos.expand(batch)[:, None])  # (B, S)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=valid[:, None, None, :])
    return out[:, :, 0].to(q.dtype)


def _poison_outside(cache: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> None:
    """Fill slots outside [first[b], last[b]] with large values, so any leak into the output shows."""
    slots = torch.arange(cache.shape[2], device=cache.device)
    outside = (slots[None, :] < first[:, None]) | (slots[None, :] > last[:, None])
    cache[: len(first)].masked_fill_(outside[:, None, :, None], 300.0)
    cache[len(first) :] = 300.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, n_heads, n_kv_heads, head_dim, max_seq_len, last, first, num_splits",
    [
        (2, 8, 2, 24, 37, [30, 30], None, None),  # GQA (4 heads per KV head), shared position
        (3, 4, 4, 80, 100, [99, 40, 70], None, 3),  # MHA, D = 80, per-row positions, 3 splits
        (2, 4, 1, 16, 70, [0, 69], None, 2),  # MQA; a row with one valid slot, a split with none
        (2, 6, 2, 32, 45, [44, 44], [0, 9], 8),  # 3 heads per group; left padding; more splits than blocks
        (3, 8, 2, 16, 90, [89, 10, 50], [5, 3, 50], 4),  # left padding with per-row positions
    ],
)
def test_decode_attention_matches_softmax_over_valid_slots(
    batch: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    last: list[int],
    first: list[int] | None,
    num_splits: int | None,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    q = randn(batch, n_heads, head_dim, dtype=dtype)
    k_cache = randn(batch + 1, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
    v_cache = randn(batch + 1, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
    input_pos = torch.tensor(last[:1] if len(set(last)) == 1 else last, device=DEVICE)
    seq_start = None if first is None else torch.tensor(first, device=DEVICE)
    valid_first = torch.zeros(batch, dtype=torch.long, device=DEVICE) if seq_start is None else seq_start
    _poison_outside(k_cache, valid_first, input_pos.expand(batch))
    _poison_outside(v_cache, valid_first, input_pos.expand(batch))

    out = decode_attention(q, k_cache, v_cache, input_pos, seq_start=seq_start, num_splits=num_splits)
    ref = sdpa_over_valid_slots(q, k_cache, v_cache, input_pos, seq_start)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_decode_attention_with_one_valid_slot_returns_its_value() -> None:
    q = randn(1, 4, 16, dtype=torch.float32)
    k_cache = randn(1, 2, 20, 16, dtype=torch.float32)
    v_cache = randn(1, 2, 20, 16, dtype=torch.float32)
    out = decode_attention(
        q, k_cache, v_cache, torch.tensor([7], device=DEVICE), seq_start=torch.tensor([7], device=DEVICE)
    )
    expected = v_cache[0, :, 7].repeat_interleave(2, dim=0)  # heads 0, 1 read KV head 0; 2, 3 head 1
    torch.testing.assert_close(out[0], expected)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_decode_attention_replays_in_a_cuda_graph_at_new_positions() -> None:
    torch.manual_seed(0)
    q = randn(2, 8, 64, dtype=torch.bfloat16)
    k_cache = randn(2, 2, 300, 64, dtype=torch.bfloat16)
    v_cache = randn(2, 2, 300, 64, dtype=torch.bfloat16)
    input_pos = torch.tensor([5, 17], device=DEVICE)
    decode_attention(q, k_cache, v_cache, input_pos)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, input_pos)
    for positions in ([5, 17], [123, 299], [0, 64]):
        input_pos.copy_(torch.tensor(positions))
        graph.replay()
        ref = sdpa_over_valid_slots(q, k_cache, v_cache, input_pos)
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, n, k, num_splits",
    [((1,), 100, 300, None), ((3,), 70, 80, 1), ((8,), 33, 513, 3), ((2, 1), 129, 1000, 2)],
)
@pytest.mark.parametrize("block_n", [16, 64])
def test_gemv_matches_fp32_matmul(
    rows: tuple[int, ...], n: int, k: int, num_splits: int | None, block_n: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = randn(*rows, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    out = gemv(x, weight, num_splits, block_n)
    assert out.shape == (*rows, n) and out.dtype == dtype
    torch.testing.assert_close(out, F.linear(x.float(), weight.float()).to(dtype), **TOL[dtype])


@pytest.mark.skipif(not CUDA, reason="the GEMV / cuBLAS choice is timed on a CUDA device")
def test_decode_projection_takes_the_measured_choice_and_either_is_right() -> None:
    from llama3.model.backends import TritonOps

    torch.manual_seed(0)
    x = randn(1, 1, 4096, dtype=torch.bfloat16)
    weight = randn(6144, 4096, dtype=torch.bfloat16, scale=4096**-0.5)  # Llama-3-8B's fused qkv
    choice = best_gemv_config(1, weight)
    assert choice is None or (1 <= choice[0] <= 32 and choice[1] in (16, 32, 64))
    assert best_gemv_config(1, weight) == choice  # measured once, remembered
    expected = F.linear(x.float(), weight.float()).to(x.dtype)
    layer = torch.nn.Linear(4096, 6144, bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data = weight
    torch.testing.assert_close(TritonOps.linear(x, layer), expected, **TOL[torch.bfloat16])


def test_transformers_imports_beside_the_kernels_directory() -> None:
    """The repo root (first on sys.path under pytest or `python -m`) holds a `kernels/` directory,
    the name of Hugging Face's kernel hub package that transformers probes for and imports."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is not None and spec.origin.startswith({str(REPO_ROOT)!r}), spec\n"
        "import kernels\n"
        "assert 'triton' not in sys.modules, 'importing kernels must not import triton'\n"
        "import transformers\n"
        "from transformers import LlamaConfig\n"
        "LlamaConfig()\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
