"""Weight-only int8 / int4: the quantization formulas' error bounds, PyTorch's kernels against the float matmul of
the same dequantized weights, and whole models against transformers (float weights, and the dequantized ones)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llama3 import Llama, Transformer
from llama3.checks import CheckpointError
from llama3.quant.weight_only import GROUP_SIZES, QuantizedWeight, QuantizeError, quantize, quantized_linear


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2**-100))) - 7)


# -- the formulas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, group_size", [("int8", None), *[("int4", g) for g in GROUP_SIZES]])
def test_round_trip_error_is_at_most_half_a_step(mode, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 512) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    w[3] = 0.0  # an all-zero row: scale 0 must not divide by zero
    w[5, :256] = 0.25  # constant groups: reproduced exactly
    q = quantize(w, mode, group_size or 32)
    if mode == "int8":
        assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
        step = q.scales[:, None].expand_as(w)
        assert torch.allclose(q.scales, w.abs().amax(dim=1) / 127)  # symmetric, per output row
    else:
        assert q.codes.dtype == torch.uint8 and q.codes.max() <= 15 and q.scales.shape == (48, 512 // group_size)
        step = q.scales.repeat_interleave(group_size, dim=1)
        groups = w.reshape(48, -1, group_size)
        assert torch.allclose(q.scales, (groups.amax(-1) - groups.amin(-1)) / 15)  # asymmetric, per group
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert (err[3] == 0).all()
    if mode == "int4":
        assert (err[5, :256] == 0).all()


def test_int4_codes_of_representable_weights_are_exact():
    """Weights that are (q - 8) * scale + zero for power-of-two scales come back bit for bit."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (16, 64))
    codes[:, ::32] = 0  # every group spans the full 0..15 range, so its scale is exactly (max - min) / 15
    codes[:, 1::32] = 15
    scale, zero = 2.0**-6, 0.375
    w = (codes.float() - 8) * scale + zero
    q = quantize(w, "int4", 32)
    assert torch.equal(q.codes.long(), codes) and torch.equal(q.dequantize(), w)


def test_fused_rows_and_permutations_keep_each_rows_codes():
    torch.manual_seed(2)
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    fused = QuantizedWeight.cat([quantize(a, "int4", 32), quantize(b, "int4", 32)])
    assert torch.equal(
        fused.dequantize(), torch.cat([quantize(a, "int4", 32).dequantize(), quantize(b, "int4", 32).dequantize()])
    )
    order = torch.randperm(48)
    assert torch.equal(fused.permute_rows(order).dequantize(), fused.dequantize()[order])
    with pytest.raises(QuantizeError, match="differently"):
        QuantizedWeight.cat([quantize(a, "int4", 32), quantize(b, "int8")])


@pytest.mark.parametrize(
    "w, mode, group_size, message",
    [
        (torch.randn(16, 96), "int4", 64, "96 inputs do not split into groups of 64"),
        (torch.randn(16, 64), "int4", 48, "group size must be one of"),
        (torch.randn(64), "int8", 32, "only 2-D weights"),
        (torch.randn(16, 64), "int2", 32, "unknown quantization mode"),
    ],
)
def test_weights_that_cannot_be_quantized_are_named(w, mode, group_size, message):
    with pytest.raises(QuantizeError, match=message):
        quantize(w, mode, group_size, name="layers.0.w2")


# -- the kernels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, group_size", [("int8", None), *[("int4", g) for g in GROUP_SIZES]])
# 17, 5: padded to sixteens; 2056: packed in two blocks of rows (2048 + 16 with the padding) for K = 512
@pytest.mark.parametrize("rows, out_features", [(1, 64), (7, 96), (64, 48), (3, 17), (1, 5), (2, 2056)])
def test_kernel_equals_the_float_matmul_of_its_dequantized_weight(mode, group_size, rows, out_features):
    """PyTorch's int8/int4 CPU kernels against fp32 `x @ w.T` over the dequantized weight, with the scales
    rounded to bfloat16 as the kernels take them: the only other difference is the bf16 rounding of the output."""
    torch.manual_seed(3)
    K = 512
    q = quantize(torch.randn(out_features, K), mode, group_size or 32)
    x = torch.randn(rows, K).to(torch.bfloat16)
    layer = quantized_linear(q, torch.bfloat16, torch.device("cpu"))
    out = layer(x.view(1, rows, K))
    assert out.shape == (1, rows, out_features) and out.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16).float()
    if mode == "int8":
        w = q.codes.float() * bf(q.scales)[:, None]
    else:
        g = group_size
        w = (q.codes.float() - 8) * bf(q.scales).repeat_interleave(g, 1) + bf(q.zeros).repeat_interleave(g, 1)
    ref = x.float() @ w.T
    # fp32 accumulation in another order moves a result by far less than one bf16 step
    assert ((out[0].float() - ref).abs() <= bf16_ulp(ref)).all()


@pytest.mark.parametrize("out_features, in_features", [(2000, 576), (600, 1536), (300, 8192), (264, 8192)])
def test_int4_packing_in_blocks_of_rows_equals_packing_the_whole_weight(out_features, in_features):
    """Int4Linear packs its codes a block of rows at a time (to bound the int32 copy the op wants); the
    result must be PyTorch's packing of the whole (padded) weight. Each shape spans several blocks."""
    torch.manual_seed(0)
    q = quantize(torch.randn(out_features, in_features), "int4", 32)
    layer = quantized_linear(q, torch.bfloat16, torch.device("cpu"))
    codes = torch.cat([q.codes, q.codes.new_full((-out_features % 16, in_features), 8)]).to(torch.int32)
    assert torch.equal(layer.packed, torch._convert_weight_to_int4pack_for_cpu(codes, 1))


def test_quantized_layers_need_bf16_activations_and_the_cpu():
    q = quantize(torch.randn(16, 64), "int4", 32)
    with pytest.raises(QuantizeError, match="bfloat16"):
        quantized_linear(q, torch.float32, torch.device("cpu"))
    with pytest.raises(QuantizeError, match="CPU"):
        quantized_linear(q, torch.bfloat16, torch.device("meta"))


# -- whole models -------------------------------------------------------------------------------------------


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.2-tied"])
@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_stay_close_to_transformers(tiny_hf, variant, mode, bound):
    """The issue's bounds on the norm of the logit error relative to the float model (transformers, fp32)."""
    d, hf = tiny_hf(variant)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens).logits
    model = Transformer.from_pretrained(d, device="cpu", quantize=mode)
    assert rel_error(model(tokens), ref) < bound
    assert type(model.layers[0].attention.wqkv).__name__ == ("Int8Linear" if mode == "int8" else "Int4Linear")
    assert type(model.output).__name__ == "Int8Linear"  # int4 keeps the output projection at int8
    assert model.tok_embeddings.weight.dtype == torch.bfloat16  # the embedding is gathered, not quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantized_model_computes_transformers_over_its_dequantized_weights(tiny_hf, mode):
    """Quantization is the only change: transformers run on the dequantized weights gives the same logits
    up to the bf16 activations (the same margin as our bf16 float model against transformers' fp32)."""
    d, hf = tiny_hf("llama3-gqa")
    for name, p in hf.named_parameters():
        if name.endswith("proj.weight") or name == "lm_head.weight":
            p.copy_(quantize(p, mode, 32).dequantize())
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens).logits
    bf16_margin = rel_error(
        Transformer.from_pretrained(d, device="cpu", dtype=torch.bfloat16)(tokens), hf(tokens).logits
    )
    quantized = Transformer.from_pretrained(d, device="cpu", quantize=mode)(tokens)
    assert rel_error(quantized, ref) < 2 * max(bf16_margin, 0.005)


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.2-tied"])
@torch.no_grad()
def test_keep_output_leaves_the_output_projection_float(tiny_hf, tmp_path, variant):
    """keep_output: every other projection quantized, the output the float weight itself (tied: the very
    embedding Parameter), so the logits are transformers' over dequantized projections and a float lm_head;
    a checkpoint saved that way loads the same, its output stored as a float tensor."""
    from torch import nn

    from llama3.weights.save import save_quantized

    d, hf = tiny_hf(variant)
    for name, p in hf.named_parameters():
        if name.endswith("proj.weight"):
            p.copy_(quantize(p, "int4", 32).dequantize())
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    model = Transformer.from_pretrained(d, device="cpu", quantize="int4", keep_output=True)
    assert type(model.output) is nn.Linear and type(model.layers[1].feed_forward.w2).__name__ == "Int4Linear"
    if hf.config.tie_word_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    bf16_margin = rel_error(
        Transformer.from_pretrained(d, device="cpu", dtype=torch.bfloat16)(tokens), hf(tokens).logits
    )
    assert rel_error(model(tokens), hf(tokens).logits) < 2 * max(bf16_margin, 0.005)

    out = save_quantized(d, tmp_path / "q", "int4", progress=False, keep_output=True)
    loaded = Transformer.from_pretrained(out, device="cpu")
    assert type(loaded.output) is nn.Linear
    assert torch.equal(loaded(tokens), model(tokens))


def test_quantized_greedy_generation_decodes_through_the_cache(tiny_hf, llama3_tokenizer_path):
    """Prefill + one-token decode steps of the quantized model give the tokens of its own full forward."""
    d, _ = tiny_hf("llama3-gqa")
    model = Transformer.from_pretrained(d, device="cpu", quantize="int4")
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 32)
        step = [model(tokens[:, :8], torch.arange(8))[:, -1]]
        for t in range(8, 12):
            step.append(model(tokens[:, t : t + 1], torch.tensor([t]))[:, -1])
    assert torch.equal(torch.stack(step[:-1], 1).argmax(-1), full[:, 7:11].argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize": "int3"}, "unknown quantize"),
        ({"quantize": "int4", "dtype": torch.float32}, "bfloat16"),
        ({"quantize": "int4", "group_size": 48}, "group size"),
    ],
)
def test_bad_quantize_settings_are_refused_before_reading(tmp_path, kwargs, message):
    with pytest.raises(QuantizeError, match=message):  # not FileNotFoundError: nothing was looked up
        Transformer.from_pretrained(tmp_path / "does-not-exist", device="cpu", **kwargs)


def test_a_group_size_the_model_cannot_split_names_the_tensor(tiny_hf):
    d, _ = tiny_hf("llama3-gqa")  # ffn 96: down_proj has 96 inputs
    with pytest.raises(CheckpointError, match=r"down_proj.weight: its 96 inputs do not split into groups of 64"):
        Transformer.from_pretrained(d, device="cpu", quantize="int4", group_size=64)


@pytest.fixture(scope="module")
def smollm2_fp32():
    return Llama.from_pretrained(dtype=torch.float32)


# Measured on this file (2-core CI CPU): bf16 floats 3.0%, int8 9.0%, int4 5.7% of the logits' norm. Its
# weights are Q4_1 already: int4 group 32 keeps the file's own codes (only scales rounded to bf16), int8 per
# row re-rounds them.
@pytest.mark.parametrize("mode, bound", [("int8", 0.12), ("int4", 0.08)])
@torch.inference_mode()
def test_embedded_model_quantized_still_answers_paris(smollm2_fp32, mode, bound):
    llm = Llama.from_pretrained(quantize=mode)
    assert "Paris" in llm.text_completion(["The capital of France is"], 8, temperature=0)[0]
    ids = torch.tensor([llm.tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=True)])
    assert rel_error(llm.model(ids), smollm2_fp32.model(ids)) < bound


class FloatShapes(TorchDispatchMode):
    """Records the shape of every floating-point tensor with storage (not on the meta device, where the
    loader builds the model's skeleton) that an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


def projection_shapes(args) -> set[tuple[int, int]]:
    """Every (out, in) shape a projection weight, one of its fused parts, or its transpose could take."""
    D, H, KVH, F = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    shapes = {(H, D), (KVH, D), (H + 2 * KVH, D), (D, H), (F, D), (2 * F, D), (D, F)}
    return shapes | {s[::-1] for s in shapes}


@pytest.mark.parametrize("source", ["saved int4", "saved int8", "embedded gguf int4"])
@torch.inference_mode()
def test_loading_quantized_weights_never_makes_a_float_copy_of_a_projection(tiny_hf, tmp_path, source):
    """Every float tensor any op makes during the load is recorded: none has the shape of a projection
    weight (or a fused part), so no projection is ever dequantized, whole or per part, on the way in. (The
    tied output projection is quantized from the float embedding, whose shape is no projection's.)"""
    from llama3.weights.hub import default_model
    from llama3.weights.save import save_quantized

    if source.startswith("saved"):
        d, _ = tiny_hf("llama3-gqa", hidden_size=128, intermediate_size=384)
        src = save_quantized(d, tmp_path / "q", source.split()[1], progress=False)
    else:
        src = default_model()
    with FloatShapes() as seen:
        model = Transformer.from_pretrained(src, device="cpu", quantize="int4" if "gguf" in source else None)
    assert type(model.layers[0].feed_forward.w13).__name__ in ("Int4Linear", "Int8Linear")
    assert any(len(s) == 2 and s[0] > 16 for s in seen.shapes)  # the recorder sees the load's float tensors
    assert not seen.shapes & projection_shapes(model.args)


def test_embedded_q4_1_projections_load_as_their_own_codes(monkeypatch):
    """int4 group 32 takes the GGUF file's Q4_1 codes as they are: only the tied output projection (made
    from the Q8_0 embedding) goes through our quantizer."""
    import llama3.weights.build

    quantized_from_float = []
    real = llama3.weights.build.quantize_weight
    monkeypatch.setattr(
        llama3.weights.build, "quantize_weight", lambda t, *a: quantized_from_float.append(a[-1]) or real(t, *a)
    )
    llm = Llama.from_pretrained(quantize="int4")
    assert len(quantized_from_float) == 1 and quantized_from_float[0].endswith("model.embed_tokens.weight")
    assert type(llm.model.layers[29].feed_forward.w2).__name__ == "Int4Linear"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_quantizing_a_built_model_equals_quantizing_while_loading(tiny_hf, tmp_path, mode):
    """`quantize_model` on a loaded bf16 model and `from_pretrained(quantize=...)` of the same bf16 checkpoint
    quantize the same numbers, so their logits are identical."""
    from llama3.quant.weight_only import quantize_model

    _, hf = tiny_hf("llama3.2-tied")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = Transformer.from_pretrained(tmp_path / "bf16", device="cpu", quantize=mode)
    built = quantize_model(Transformer.from_pretrained(tmp_path / "bf16", device="cpu"), mode)
    assert type(built.output).__name__ == type(loaded.output).__name__ != "Linear"
    assert built.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(built(tokens), loaded(tokens))


# -- quantized checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.2-tied"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_saved_quantized_checkpoint_loads_the_same_codes(tiny_hf, tmp_path, monkeypatch, variant, mode):
    import llama3.weights.build
    from llama3.weights.save import save_quantized

    d, hf = tiny_hf(variant)
    out = save_quantized(d, tmp_path / "q", mode, progress=False)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = Transformer.from_pretrained(d, device="cpu", quantize=mode)(tokens)
    calls = []
    real = llama3.weights.build.quantize_weight
    monkeypatch.setattr(llama3.weights.build, "quantize_weight", lambda t, *a: calls.append(a[-1]) or real(t, *a))
    loaded = Transformer.from_pretrained(out, device="cpu")  # the scheme comes from config.json
    assert torch.equal(loaded(tokens), expected)
    # only a tied output projection is made at load (from the float embedding); everything else is read as codes
    assert calls == ([f"{out}: model.embed_tokens.weight"] if hf.config.tie_word_embeddings else [])
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert qweight.shape == ((64, 48) if mode == "int4" else (64, 96))  # two 4-bit codes a byte
    assert qweight.dtype == (torch.uint8 if mode == "int4" else torch.int8)


def test_quantized_checkpoint_errors_are_named(tiny_hf, tmp_path):
    import json

    from llama3.weights.save import save_quantized

    d, _ = tiny_hf("llama3-gqa")
    out = save_quantized(d, tmp_path / "q", "int4", progress=False)
    with pytest.raises(CheckpointError, match="holds int4 weights; it cannot be loaded as int8"):
        Transformer.from_pretrained(out, device="cpu", quantize="int8")
    with pytest.raises(CheckpointError, match="quantized already"):
        save_quantized(out, tmp_path / "again", "int8", progress=False)
    with pytest.raises(QuantizeError, match="bfloat16"):
        Transformer.from_pretrained(out, device="cpu", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="quantized with 'gptq', which this library does not read"):
        Transformer.from_pretrained(out, device="cpu")


def test_gguf_is_not_requantized_into_a_checkpoint(tmp_path):
    import llama3
    from llama3.weights.save import save_quantized

    with pytest.raises(CheckpointError, match="GGUF file, quantized already"):
        save_quantized(llama3.default_model(), tmp_path / "q", "int4", progress=False)


def test_the_cli_offers_exactly_the_group_sizes_the_library_takes():
    from llama3.cli.common import GROUP_SIZES as CLI_GROUP_SIZES

    assert CLI_GROUP_SIZES == GROUP_SIZES
