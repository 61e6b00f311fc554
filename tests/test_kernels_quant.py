"""The int8 / int4 Triton kernels (`kernels/quant_gemv.py`) against the float matmul of the same dequantized
weights, and the Triton backend running a quantized model against the PyTorch backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, in fp32 and fp16 (its bf16 is wrong);
the quantized modules are built in their "gpu" layout on the CPU for that. The references dequantize the
codes as `QuantizedWeight` holds them (before any packing), with `llama3.quantize`'s formulas.

Tolerances. The kernel and the reference both sum K fp32 products, in different orders: each sum is within
(K - 1) * 2^-24 * sum_i |x_i w_i| of the exact one (the standard bound for recursive summation), so they
differ by at most twice that; int8 applies its scale after the sum, one more rounding. Then both results
are rounded to x's dtype, which can add one unit in the last place where the two fp32 values straddle a
rounding boundary. A wrong code, nibble, zero or group moves an output by the size of a weight times an
input, orders of magnitude beyond this; even one term of the K dropped (about sum |x_i w_i| / K) is more than
ten times the bound at these K. (Measured: fp32 errors reach about 1/1000 of the bound; fp16 outputs equal
the reference's.)
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before triton decorates the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llama3.kernels.quant_gemv import (  # noqa: E402
    best_decode_tiles,
    dequantize_int4_weight,
    dequantize_int8_weight,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quantized_matmul,
)

from llama3 import Transformer  # noqa: E402
from llama3.model.backends import TorchOps, TritonOps  # noqa: E402
from llama3.quant.weight_only import (
    GROUP_SIZES,
    Int4Linear,
    Int8Linear,
    QuantizeError,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize,
    quantize_model,
    quantized_linear,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="interpreter bf16 is wrong; CUDA only")),
]


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |t| (0 for float32: the outputs are not rounded again)."""
    if dtype == torch.float32:
        return torch.zeros_like(t)
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(info.tiny))))


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """`out` is x @ w.T (w: the float weight the kernel multiplies by) within the bound of the docstring."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    x32, w32 = x.float().reshape(-1, x.shape[-1]), w.float()
    ref = x32 @ w32.T
    k = x.shape[-1]
    bound = 2 * (k + 1) * 2**-24 * (x32.abs() @ w32.abs().T) + ulp(ref, x.dtype)
    err = (out.float().reshape(ref.shape) - ref.to(x.dtype).float()).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g} times the bound (max abs error {err.max().item():.3g})"


def weights(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, k) * torch.logspace(-2, 0, n)[:, None]  # rows of different magnitudes


# -- the kernels ---------------------------------------------------------------------------------------------

# rows: one decode token; a few (padded to the 16-row tile); more than 16 (the tiled prefill form).
ROWS = [(1,), (2, 3), (33,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n, k, tiles", [(37, 300, {}), (50, 512, {"num_splits": 3, "block_n": 16, "block_m": 16})])
def test_int8_kernel_matches_the_matmul_of_its_dequantized_weight(rows, n, k, tiles, dtype):
    """K = 300 ends in a partial block; 3 splits of 512 leave the last one short; N is never a multiple of the
    tile; 33 rows in tiles of 16 leave a last tile of one row."""
    q = quantize(weights(n, k), "int8")
    codes, scales = q.codes.to(DEVICE), q.scales.to(DEVICE, dtype)
    x = torch.randn(*rows, k).to(DEVICE, dtype)
    out = int8_matmul(x, codes, scales, **tiles)
    assert_matmul_close(out, x, dequantize_int8(q.codes, scales.cpu()).to(DEVICE))
    assert torch.equal(
        int8_matmul_reference(x, codes, scales), (x.float() @ (q.codes.float() * scales.float()[:, None]).T).to(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("group_size, k", [*[(g, 768) for g in GROUP_SIZES], *[(g, 640) for g in (32, 64, 128)]])
def test_int4_kernel_matches_the_matmul_of_its_dequantized_weight(rows, group_size, k, dtype):
    """Every group size, N = 37. Decode rows: K in 3 splits of 256 inputs (the kernel's step; splits cross
    groups of 32..128 and cut none of 256); more rows: one pass over K, 3 steps. K = 640 ends in a partial step
    (the kernel's masked form). The weight is dequantized in fp32 and rounded to x's dtype, as the kernel does."""
    n = 37
    q = quantize(weights(n, k), "int4", group_size)
    scales, zeros = q.scales.to(dtype), q.zeros.to(dtype)  # as the module stores them
    x = torch.randn(*rows, k).to(DEVICE, dtype)
    args = [t.to(DEVICE) for t in (pack_int4(q.codes), scales, zeros)]
    out = int4_matmul(x, *args, group_size, num_splits=3 if x.numel() // k <= 16 else 1)
    w = dequantize_int4(q.codes, scales, zeros, group_size).to(dtype)  # from the unpacked codes
    assert_matmul_close(out, x, w.to(DEVICE))
    assert torch.equal(int4_matmul_reference(x, *args, group_size), (x.float() @ w.float().T.to(DEVICE)).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mode, group_size, k",
    [
        *[("int8", None, k) for k in (512, 300)],
        *[("int4", g, 512) for g in GROUP_SIZES],
        *[("int4", g, 640) for g in (32, 64, 128)],
    ],
)
def test_dequantize_kernel_equals_the_reference_dequantization(mode, group_size, k, dtype):
    """The prefill path's dequantize-then-cuBLAS: the weight computed in fp32 and rounded once, bit for bit
    (K = 300 and 640 end in a partial step of the kernel)."""
    n = 45
    q = quantize(weights(n, k), mode, group_size or 32)
    scales = q.scales.to(dtype)
    if mode == "int8":
        expected = dequantize_int8(q.codes, scales).to(dtype)
        got = dequantize_int8_weight(q.codes.to(DEVICE), scales.to(DEVICE))
    else:
        zeros = q.zeros.to(dtype)
        expected = dequantize_int4(q.codes, scales, zeros, group_size).to(dtype)
        got = dequantize_int4_weight(*(t.to(DEVICE) for t in (pack_int4(q.codes), scales, zeros)), group_size)
    assert got.dtype == dtype
    if CUDA:  # the GPU may fuse (q - 8) * scale + zero into one rounding: at most an ulp of the result
        assert ((got.cpu().float() - expected.float()).abs() <= ulp(expected.float(), dtype)).all()
    else:  # the interpreter rounds each fp32 op as PyTorch does
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("prefill_path", ["kernel", "dequantize"])
def test_both_prefill_paths_compute_the_layers_matmul(mode, prefill_path):
    """70 rows (two row tiles of the kernel) through a quantized layer by either prefill path, and 3 through
    the decode GEMV: the same product (the dequantize path multiplies by the weight rounded to x's dtype, as
    the int4 kernel does)."""
    dtype = torch.float16
    layer = quantized_linear(quantize(weights(70, 256), mode, 64), dtype, torch.device(DEVICE), layout="gpu")
    for rows in (70, 3):
        x = torch.randn(1, rows, 256).to(DEVICE, dtype)
        out = quantized_matmul(x, layer, prefill_path)
        # the int8 kernel scales the fp32 sum: its weight is never rounded to x's dtype
        rounded = mode == "int4" or (rows > 16 and prefill_path == "dequantize")
        assert_matmul_close(out, x, layer.dequantize().to(dtype) if rounded else layer.dequantize())


def test_a_dimension_the_groups_do_not_divide_is_named():
    q = quantize(torch.randn(8, 192), "int4", 64)
    qweight, scales, zeros = pack_int4(q.codes), q.scales, q.zeros
    with pytest.raises(QuantizeError, match="192 inputs do not split into groups of 128"):
        int4_matmul(torch.randn(1, 192), qweight, scales, zeros, 128)
    with pytest.raises(QuantizeError, match="192 inputs do not split into groups of 128"):
        dequantize_int4_weight(qweight, scales, zeros, 128)
    with pytest.raises(QuantizeError, match="group size must be one of"):
        int4_matmul(torch.randn(1, 192), qweight, scales, zeros, 48)
    with pytest.raises(QuantizeError, match="layers.0.w2: its 192 inputs do not split into groups of 256"):
        quantize(torch.randn(8, 192), "int4", 256, name="layers.0.w2")
    with pytest.raises(ValueError, match="x has 191 features but the weight has 192 inputs"):
        int4_matmul(torch.randn(1, 191), qweight, scales, zeros, 64)


# -- the modules and the backend -----------------------------------------------------------------------------


def kernel_launches(monkeypatch) -> list[tuple[str, int]]:
    """Records (mode, rows of x) for every launch of the quantized matmul kernel from now on."""
    import llama3.kernels.quant_gemv as quant_gemv

    launches, launch = [], quant_gemv._launch

    def recorded(x, codes, scales, zeros, k, group_size, **tiles):
        launches.append(("int4" if group_size else "int8", x.numel() // x.shape[-1]))
        return launch(x, codes, scales, zeros, k, group_size, **tiles)

    monkeypatch.setattr(quant_gemv, "_launch", recorded)
    return launches


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_triton_backend_runs_a_quantized_layer_as_the_torch_backend_does(mode, group_size, monkeypatch):
    """`TritonOps.linear` sends a "gpu"-layout layer to the kernels; `TorchOps.linear` runs the module's own
    forward (dequantize, then F.linear). Same weights, same function."""
    dtype = torch.float32
    q = quantize(weights(33, 256), mode, group_size or 32)
    layer = quantized_linear(q, dtype, torch.device(DEVICE), layout="gpu")
    assert isinstance(layer, Int8Linear if mode == "int8" else Int4Linear) and layer.layout == "gpu"
    assert torch.equal(layer.dequantize().cpu(), q.dequantize())  # fp32 scales: the exact weight
    for rows in (1, 20):
        x = torch.randn(rows, 256).to(DEVICE, dtype)
        launches = kernel_launches(monkeypatch)
        expected = TorchOps.linear(x, layer)
        assert not launches  # the module's own forward: dequantize, then F.linear
        assert_matmul_close(expected, x, q.dequantize().to(DEVICE))
        assert_matmul_close(TritonOps.linear(x, layer), x, q.dequantize().to(DEVICE))
        assert launches == [(mode, rows)]


def test_the_gpu_layout_is_the_default_on_cuda_and_takes_float32():
    from llama3.quant.weight_only import layout_for

    assert layout_for("cuda") == "gpu" and layout_for("cuda:1") == "gpu" and layout_for("cpu") == "cpu"
    q = quantize(torch.randn(16, 64), "int4", 32)
    layer = quantized_linear(q, torch.float32, torch.device("cpu"), layout="gpu")  # no PyTorch CPU kernel involved
    assert layer.qweight.shape == (16, 32) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == layer.zeros.shape == (16, 2) and layer.scales.dtype == torch.float32
    with pytest.raises(QuantizeError, match="bfloat16"):  # the CPU layout still needs bf16 / fp16
        quantized_linear(q, torch.float32, torch.device("cpu"))
    with pytest.raises(QuantizeError, match="unknown layout"):
        quantized_linear(q, torch.float16, torch.device("cpu"), layout="tinygemm")


def decode_logits(model: Transformer, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then decode the rest one at a time; the logits of every position."""
    B, T = tokens.shape
    model.setup_cache(B, 32)
    out = [model(tokens[:, :prefill], torch.arange(prefill, device=tokens.device))]
    for t in range(prefill, T):
        out.append(model(tokens[:, t : t + 1], torch.full((B, 1), t, device=tokens.device)))
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_quantized_model_through_triton_matches_the_float_model_of_its_dequantized_weights(tiny_hf, monkeypatch):
    """A tiny int4 model (fp32 activations, "gpu" layout; its output projection int8, so both kernels run):
    the Triton backend (a prefill of 2 x 10 rows by the tiled kernel, then decode steps by the GEMV) and the
    PyTorch backend on the same codes, against a float model whose projections hold the dequantized weights.
    (One mode: the interpreter takes about 10 s per model here.)"""
    mode = "int4"
    d, _ = tiny_hf("llama3-gqa")
    load = lambda backend: Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=backend)  # noqa: E731
    float_model = load("torch")
    on_torch, on_triton = (quantize_model(load(b), mode, 32, layout="gpu") for b in ("torch", "triton"))
    for name, module in on_torch.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            assert module.layout == "gpu"
            float_model.get_submodule(name).weight.copy_(module.dequantize())
    assert isinstance(on_torch.layers[0].feed_forward.w2, Int4Linear)
    assert isinstance(on_torch.output, Int8Linear)  # int4 keeps the output projection at int8
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected = decode_logits(float_model, tokens, prefill=10)
    launches = kernel_launches(monkeypatch)
    torch_backend = decode_logits(on_torch, tokens, prefill=10)
    assert not launches
    triton_backend = decode_logits(on_triton, tokens, prefill=10)
    # both kernels, in both forms: the 2 x 10-row prefill (tiled) and the 2-row decode steps (GEMV)
    assert set(launches) == {("int4", 20), ("int4", 2), ("int8", 20), ("int8", 2)}
    # fp32 throughout: only the order of fp32 sums differs (the margin test_backends.py allows)
    torch.testing.assert_close(torch_backend, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(triton_backend, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(triton_backend.argmax(-1), expected.argmax(-1))


class TokenIds:
    """Generation on token ids needs only the vocabulary size and the stop tokens of a tokenizer."""

    n_words, stop_tokens = 512, []


def test_quantized_graph_form_decode_matches_the_torch_backend(tiny_hf):
    """Greedy generation of an int8 model through the Triton backend in the form a CUDA graph captures (fixed
    buffers, lengths read on the device; captured and replayed on CUDA) gives the PyTorch backend's tokens."""
    from llama3 import Llama

    d, _ = tiny_hf("llama3-gqa")

    def load(backend: str) -> Transformer:
        model = Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=backend)
        return quantize_model(model, "int8", layout="gpu")

    eager = Llama(load("torch"), TokenIds(), cuda_graphs=False)
    graph_form = Llama(load("triton"), TokenIds(), cuda_graphs=True)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert graph_form.generate(prompts, 4, temperature=0) == eager.generate(prompts, 4, temperature=0)
    assert all(step.static and (step.captured.graph is not None) == CUDA for step in graph_form._steps.values())


# -- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_gemv_replays_in_a_cuda_graph(mode):
    """The decode GEMV allocates nothing that depends on data and never syncs: captured once, replayed on new
    inputs."""
    torch.manual_seed(0)
    layer = quantized_linear(quantize(weights(6144, 4096).cuda(), mode, 128), torch.bfloat16, torch.device("cuda"))
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    quantized_matmul(x, layer)  # compile and measure the tiles before capture
    tiles = best_decode_tiles(1, layer)
    assert tiles is not None and 1 <= tiles[0] <= 32 and tiles[1] in (16, 32, 64)
    assert best_decode_tiles(1, layer) == tiles  # measured once, remembered
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quantized_matmul(x, layer)
    w = layer.dequantize() if mode == "int8" else layer.dequantize().to(torch.bfloat16)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_matmul_close(out, x, w)
