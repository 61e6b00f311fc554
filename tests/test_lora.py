"""LoRA adapters against Hugging Face PEFT on transformers' LlamaForCausalLM of the same tiny checkpoint:
our adapter files loaded by PEFT, PEFT's loaded by us, the same logits; merge / unmerge; QLoRA's input
gradients against the float reference of the dequantized weights; bad settings and files refused by name.

Adapters get nonzero, random A and B (B starts at zero, which would hide every mapping mistake), scaled so
that the update moves the logits by far more than the tolerance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama3.model.lora import (
    TARGET_MODULES,
    FrozenQuantizedLinear,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    add_lora,
    dequantized_weight,
    dropout_masks,
    int4_codes,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from llama3.model.transformer import Transformer
from llama3.quant.weight_only import quantize, quantized_linear

VOCAB = 512
INIT = 0.1  # as tests/test_model.py: attention far from uniform, so a wrong row or position shows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny(tiny_hf):
    """(checkpoint dir, fp32 HF model, fp32 Transformer of the same weights); GQA so q and k/v differ in size."""
    path, hf = tiny_hf("llama3-gqa", initializer_range=INIT)
    return path, hf, Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(params, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_logits(hf, adapter_dir, x) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(hf, adapter_dir).eval()(x).logits


def test_fresh_adapter_is_the_base_model_exactly(tiny):
    _, _, model = tiny
    x = tokens()
    with torch.no_grad():
        before = model(x)
        add_lora(model, LoRAConfig(r=4, alpha=8))
        after = model(x)
    assert torch.equal(before, after)
    assert all(
        torch.equal(b, torch.zeros_like(b))
        for m in model.modules()
        if isinstance(m, LoRALinear)
        for b in m.lora_B.values()
    )


def test_only_adapters_train(tiny):
    _, _, model = tiny
    add_lora(model, LoRAConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 7 projections x (A, B) x 2 layers
    assert len(trainable) == 2 * 7 * 2 and all(p.dtype == torch.float32 for p in lora_parameters(model))
    randomize(lora_parameters(model))
    model(tokens()).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=4, alpha=8),
        # a subset: wqkv gets q and v adapters and none for the k rows between them; rsLoRA scaling
        LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
        # dropout acts in training only: an eval-mode forward with dropout 0.5 is PEFT's eval forward exactly
        LoRAConfig(r=4, alpha=8, dropout=0.5),
    ],
    ids=["all", "q-v-down-rslora", "dropout-in-eval"],
)
def test_our_adapter_gives_our_logits_in_peft(tiny, tmp_path, config):
    _, hf, model = tiny
    assert not model.training
    add_lora(model, config)
    randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "adapter")
    x = tokens()
    with torch.no_grad():
        ours, base = model(x), hf(x).logits
    theirs = peft_logits(hf, tmp_path / "adapter", x)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the logits well beyond the tolerance
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_peft_adapter_gives_peft_logits_in_ours(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, hf, model = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "o_proj"])
    )
    randomize(p for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.save_pretrained(tmp_path / "peft")
    x = tokens(seed=3)
    with torch.no_grad():
        theirs = peft_model(x).logits
    load_adapter(model, tmp_path / "peft")
    assert model.lora_config.target_modules == ("q_proj", "k_proj", "o_proj", "up_proj")
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs, rtol=1e-5, atol=1e-5)


def test_training_forward_gives_each_projection_its_own_dropout_mask(tiny, monkeypatch):
    """In training, a fused layer adds B_i A_i (x * mask_i) * scaling on the rows of projection i, every mask
    its own and none on the rows without an adapter: against that formula, one projection at a time."""
    import llama3.model.lora as lora

    _, _, model = tiny
    add_lora(model, LoRAConfig(r=3, alpha=5, dropout=0.3, target_modules=("q_proj", "v_proj")))
    randomize(lora_parameters(model))
    layer = model.layers[0].attention.wqkv
    masks = []
    monkeypatch.setattr(lora, "dropout_masks", lambda *args: masks.append(dropout_masks(*args)) or masks[-1])
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.train()
    with torch.no_grad():
        got = layer(x)
    (m,) = masks
    assert m.shape == (2, 10, layer.in_features) and not torch.equal(m[0], m[1])
    want = F.linear(x, layer.base.weight)
    for mask, name in zip(m, ("q_proj", "v_proj"), strict=True):
        s, e = layer.rows[name]
        want[..., s:e] += (
            F.linear(F.linear(x * mask.view(x.shape), layer.lora_A[name]), layer.lora_B[name]) * layer.scaling
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_masks_drop_every_element_independently_with_probability_p(p):
    """Against Bernoulli(p) for every element, within 5 standard deviations: the rate, the rate of two
    neighbours both dropped (p^2) and of the same element in two masks (p^2); kept elements are 1 / (1 - p)."""
    torch.manual_seed(0)
    m = dropout_masks(2, torch.Size((300, 500)), p, torch.device("cpu"))
    assert m.shape == (2, 300, 500)
    assert torch.all((m == 0) | (m == torch.tensor(1 / (1 - p))))
    dropped = (m == 0).flatten(1)

    def near(observed: torch.Tensor, q: float) -> bool:
        return abs(observed.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / observed.numel())

    assert near(dropped, p)
    assert near(dropped[:, 1:] & dropped[:, :-1], p * p)
    assert near(dropped[0] & dropped[1], p * p)


def test_merge_equals_adapter_and_unmerge_restores(tiny):
    _, _, model = tiny
    add_lora(model, LoRAConfig(r=4, alpha=8))
    randomize(lora_parameters(model))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
        assert len(changed) == 2 * 4  # wqkv, wo, w13, w2 of both layers
        unmerge_lora(model)
        # two float32 roundings: each weight within one ulp of |w| + |delta| of the original
        for layer in [m for m in model.modules() if isinstance(m, LoRALinear)]:
            w = layer.base.weight
            bound = torch.finfo(torch.float32).eps * (w.abs() + layer.delta_weight().abs())
            name = next(n for n, p in model.named_parameters() if p is w)
            assert ((w - weights[name]).abs() <= bound).all(), name
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_match_the_dequantized_float_reference(mode):
    """Input and adapter gradients through a quantized base equal those of a float layer holding the
    dequantized weight (both in bfloat16 activations, the quantized kernels' dtype)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.1  # 48 rows: the int4 kernel pads to 32+16, so padding is exercised
    q = quantize(w, mode, group_size=32)
    config = LoRAConfig(r=4, alpha=8)
    rows = {"q_proj": (0, 32), "k_proj": (32, 48)}
    quantized = LoRALinear(quantized_linear(q, torch.bfloat16, torch.device("cpu")), rows, config)
    w_deq = dequantized_weight(quantized.base, torch.float32)
    torch.testing.assert_close(w_deq, q.dequantize(), rtol=2**-7, atol=2**-7 * q.dequantize().abs().max().item())
    reference = LoRALinear(torch.nn.Linear(64, 48, bias=False), rows, config)
    reference.base.weight.data.copy_(w_deq)
    reference.base.to(torch.bfloat16)
    randomize(quantized.parameters())
    reference.load_state_dict({k: v for k, v in quantized.state_dict().items() if k.startswith("lora_")}, strict=False)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    target = torch.randn(3, 5, 48)
    grads = []
    for layer in (quantized, reference):
        xi = x.clone().requires_grad_(True)
        F.mse_loss(layer(xi).float(), target).backward()
        grads.append(
            (xi.grad.float(), *(p.grad for p in layer.lora_A.values()), *(p.grad for p in layer.lora_B.values()))
        )
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert grads[0][0].abs().max() > 0


def test_int4_codes_are_read_back_exactly():
    """The codes QLoRA keeps for the backward pass are the ones the layer was built from."""
    q = quantize(torch.randn(48, 128), "int4", group_size=64)
    layer = quantized_linear(q, torch.bfloat16, torch.device("cpu"))
    back = int4_codes(layer)
    assert back is not None and torch.equal(back.codes, q.codes)
    frozen = FrozenQuantizedLinear(layer)
    # float32: the kernel's own weight before it rounds its output to bfloat16
    assert torch.equal(frozen.weight().to(torch.bfloat16), dequantized_weight(layer, torch.bfloat16))


def test_merge_into_quantized_base_is_refused():
    q = quantize(torch.randn(32, 64), "int8")
    layer = LoRALinear(quantized_linear(q, torch.bfloat16, torch.device("cpu")), {"o_proj": (0, 32)}, LoRAConfig())
    with pytest.raises(LoRAError, match="Int8Linear.*save_merged"):
        layer.merge()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank r must be an integer >= 1, got 0"),
        (dict(r=2.5), "rank r must be an integer"),
        (dict(alpha=0), "alpha must be a finite positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=("q_proj", "qkv_proj")), "unknown LoRA target module.*'qkv_proj'.*q_proj, k_proj"),
        (dict(target_modules=()), "unknown LoRA target module"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(LoRAError, match=match):
        LoRAConfig(**kwargs)


def test_bad_adapter_files_are_named(tiny, tmp_path):
    _, _, model = tiny
    with pytest.raises(FileNotFoundError, match="adapter directory not found: .*nowhere"):
        load_adapter(model, tmp_path / "nowhere")
    good = tmp_path / "good"
    other = Transformer.from_pretrained(tiny[0], device="cpu", dtype=torch.float32, progress=False)
    save_adapter(add_lora(other, LoRAConfig(r=2, target_modules=("q_proj",))), good)
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name: str, **changes) -> object:
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        (d / "adapter_config.json").write_text(json.dumps(config | changes))
        return d

    cases = {
        variant("dora", use_dora=True): "use_dora=True is not supported",
        variant("rank", r=3): r"q_proj.lora_A.weight has shape \(2, 64\), expected \(3, 64\)",
        variant("targets", target_modules=["q_proj", "v_proj"]): "missing tensors.*v_proj",
        variant("regex", target_modules=".*proj"): "regular expression",
        variant("badrole", target_modules=["lm_head"]): "unknown LoRA target module.*'lm_head'",
    }
    for d, match in cases.items():
        fresh = Transformer.from_pretrained(tiny[0], device="cpu", dtype=torch.float32, progress=False)
        with pytest.raises(LoRAError, match=match):
            load_adapter(fresh, d)
    (good / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAError, match="no adapter_model.safetensors"):
        load_adapter(model, good)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_adapter_holding_nan_or_inf_is_refused_by_tensor_name(tiny, tmp_path, bad):
    """A diverged run's adapter (all NaN) would load and then generate nothing: it is refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    _, _, model = tiny
    save_adapter(add_lora(model, LoRAConfig(r=2, target_modules=("q_proj",))), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[name][0, 3] = bad
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    fresh = Transformer.from_pretrained(tiny[0], device="cpu", dtype=torch.float32, progress=False)
    with pytest.raises(LoRAError, match=f"tensor {name} holds NaN or infinite values"):
        load_adapter(fresh, tmp_path / "a")


def test_alpha_must_be_finite():
    with pytest.raises(LoRAError, match="alpha must be a finite positive number, got inf"):
        LoRAConfig(alpha=math.inf)


def test_default_targets_are_every_projection():
    assert LoRAConfig().target_modules == TARGET_MODULES
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0
