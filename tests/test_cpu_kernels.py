"""The fbgemm dynamic int8 layer against an integer reference, and the per-machine kernel choice."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llama3 import Llama, Transformer
from llama3.quant import choice
from llama3.quant.dynamic import DynInt8Linear
from llama3.quant.weight_only import QuantizeError, quantize


def reference(x: torch.Tensor, q, qmax: int) -> torch.Tensor:
    """Each row quantized to uint8 on its own (fbgemm's ChooseQuantizationParams: the range widened to hold 0,
    zero point rounded, codes clamped to 0..qmax), an exact integer matmul in float64, then the two scales."""
    rows = x.reshape(-1, x.shape[-1]).double()
    lo, hi = rows.amin(-1, keepdim=True).clamp(max=0), rows.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / qmax).float().double()  # fbgemm keeps its scale in float32
    z = (-lo / s).round().clamp(0, qmax)
    xq = ((rows / s).round() + z).clamp(0, qmax)
    acc = (xq - z) @ q.codes.double().T  # integers, exact in float64
    return (acc * s * q.scales.double()).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("reduce_range, qmax", [(True, 127), (False, 255)])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 5, 96)])
def test_fbgemm_layer_equals_the_integer_reference(shape, reduce_range, qmax):
    if not reduce_range and not choice.isa.isa()["avx512_vnni"]:
        pytest.skip("8-bit activations only where the CPU adds the products in int32 (AVX512-VNNI)")
    torch.manual_seed(0)
    q = quantize(torch.randn(80, 96), "int8")
    # rows of very different ranges, one all positive: one scale for the whole call would show
    x = torch.randn(shape) * torch.logspace(-2, 2, shape[0] * shape[1]).reshape(*shape[:-1], 1)
    x.view(-1, 96)[0].abs_()
    layer = DynInt8Linear(q, reduce_range=reduce_range)
    out, expected = layer(x), reference(x, q, qmax)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 80)
    # fbgemm divides by its scale as a float32 multiply by 1/s: an x sitting on a rounding edge can land one
    # code away. One code moves an output by s * scale[n] * |q[n, k]| <= s * scale[n] * 127.
    assert ((out.double() - expected).abs() <= reference_step(x, q, qmax)).all()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_step(x, q, qmax):
    rows = x.reshape(-1, x.shape[-1]).double()
    lo, hi = rows.amin(-1, keepdim=True).clamp(max=0), rows.amax(-1, keepdim=True).clamp(min=0)
    return ((hi - lo) / qmax * q.scales.double() * 127).reshape(*x.shape[:-1], -1)


def test_fbgemm_layer_holds_the_int8_codes_and_requantizes_4bit_ones_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q8, q4 = quantize(w, "int8"), quantize(w, "int4", 32)
    assert torch.equal(DynInt8Linear(q8).weight_codes().codes, q8.codes)
    assert torch.equal(DynInt8Linear(q8).dequantize(), q8.dequantize())
    assert torch.equal(DynInt8Linear(q4).dequantize(), quantize(q4.dequantize(), "int8").dequantize())


def test_fbgemm_is_refused_where_it_cannot_run(tmp_path):
    from llama3.quant.weight_only import check_settings

    with pytest.raises(QuantizeError, match="fbgemm int8 kernel takes float32 activations, got torch.bfloat16"):
        check_settings("int8", 32, torch.device("cpu"), torch.bfloat16, kernel="fbgemm")
    with pytest.raises(QuantizeError, match="the fbgemm kernels run on the CPU, not cuda"):
        check_settings("int4", 32, torch.device("cuda"), torch.bfloat16, kernel="fbgemm")
    known = "auto, int4, int4-fbgemm, int8, int4-dot, fbgemm"
    with pytest.raises(ValueError, match=f"unknown kernel 'avx'; choose one of {known}"):
        Llama.from_pretrained(tmp_path / "does-not-exist", kernel="avx")
    with pytest.raises(QuantizeError, match="kernel='fbgemm' runs int8 weights; it cannot load them as int4"):
        Llama.from_pretrained(tmp_path / "does-not-exist", kernel="fbgemm", quantize="int4")


def test_the_choice_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real = choice.measure
    monkeypatch.setattr(choice, "measure", lambda: calls.append(1) or real())
    first = choice.choose()
    assert first.plan in choice.PLANS and calls == [1]
    cached = json.loads((tmp_path / "llama3" / "kernels.json").read_text())
    assert list(cached) == [choice.machine_key()]
    assert choice.choose() == first and calls == [1]  # read back, not measured again
    times = first.times_us
    faster_int8 = times["int8 projection"] * choice.INT8_MARGIN < times["int4 projection"]
    if first.plan != "int4-dot":  # PyTorch's kernels won (test_dot_kernel.py: when the dot kernels win)
        assert (first.plan == "int8") == faster_int8
        fbgemm = not faster_int8 and times.get("fbgemm output", 1e9) < times["int8 output"]
        assert (first.plan == "int4-fbgemm") == fbgemm


def test_the_projections_are_timed_on_weights_out_of_a_cores_cache():
    """Each candidate is timed by turns over distinct copies of its weight, WORKING_SET bytes of int8 codes in all
    (far beyond a core's L2), as a decode step reads its weights: the hot-weight timing chose int8 over int4."""
    layer = torch.nn.Linear(*reversed(choice.BODY_SHAPE), bias=False)
    calls = []
    layer.register_forward_hook(lambda m, args, out: calls.append(m.weight.data_ptr()))
    run = choice._by_turns(layer, torch.randn(1, choice.BODY_SHAPE[1]))
    run()
    int8_bytes = len(calls) * torch.Size(choice.BODY_SHAPE).numel()
    assert len(set(calls)) == len(calls) and choice.WORKING_SET - int8_bytes < torch.Size(choice.BODY_SHAPE).numel()


SATURATING = """
import sys, torch
from llama3.quant import isa
from llama3.quant.dynamic import DynInt8Linear
from llama3.quant.weight_only import QuantizedWeight
# every pair of adjacent products is 255 * 127 * 2 = 64770: past int16, where AVX2's vpmaddubsw saturates
codes = torch.full((16, 64), 127, dtype=torch.int8)
q = QuantizedWeight("int8", codes, torch.ones(16), None, None)
x = torch.full((1, 64), 255.0)
out = DynInt8Linear(q, reduce_range=False)(x)
print(isa.fbgemm_vnni(), DynInt8Linear(q).reduce_range, out[0, 0].item())
"""


@pytest.mark.skipif(not choice.isa.isa()["avx512_vnni"], reason="needs a CPU with AVX512-VNNI to take it away")
def test_fbgemm_enable_instructions_takes_vnni_away_as_fbgemm_does():
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes fbgemm run its AVX2 code (saturating int16 pair sums: 8-bit
    activations go wrong) and `fbgemm_vnni` agrees, so the layer gets 7 bits and the choice a key of its own."""
    exact = 255 * 127 * 64.0
    for env, vnni in [("AVX2", False), ("avx512", False), ("AVX512_E1", True), ("", True)]:
        out = subprocess.run([sys.executable, "-c", SATURATING], env={**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": env},
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        assert out[:2] == [str(vnni), str(not vnni)], env
        assert (float(out[2]) == exact) == vnni, (env, out[2])  # without VNNI the pairs saturate


class ReferenceLinear(torch.nn.Module):
    def __init__(self, layer: DynInt8Linear):
        super().__init__()
        self.q, self.qmax = layer.weight_codes(), 127 if layer.reduce_range else 255

    def forward(self, x):
        return reference(x, self.q, self.qmax).float()


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.2-tied"])
@torch.inference_mode()
def test_every_projection_on_fbgemm_computes_the_reference(tiny_hf, variant):
    """kernel="fbgemm": fused q/k/v and gate/up, wo, down and the output (tied: its own copy) all run the layer,
    and the model's logits equal the same model with each layer replaced by the integer reference."""
    d, hf = tiny_hf(variant)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model = Transformer.from_pretrained(d, device="cpu", kernel="fbgemm")
    assert model.tok_embeddings.weight.dtype == torch.float32
    layers = [n for n, m in model.named_modules() if isinstance(m, DynInt8Linear)]
    assert len(layers) == 4 * model.args.n_layers + 1
    logits = model(tokens)
    for name in layers:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, ReferenceLinear(model.get_submodule(name)))
    assert rel_error(logits, model(tokens)) < 1e-3
    assert rel_error(logits, hf(tokens).logits) < 0.05  # and close to the float model


def test_embedded_model_loads_into_the_chosen_kernel_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(choice, "measure", lambda: choice.forced("int4-fbgemm"))
    model = Llama.from_pretrained().model
    assert model.kernel_choice.plan == "int4-fbgemm"  # the file's own Q4_1 codes, the output on fbgemm
    assert type(model.layers[0].attention.wqkv).__name__ == "Int4Linear" and isinstance(model.output, DynInt8Linear)
    floats = Llama.from_pretrained(quantize=None).model  # the explicit way to float32
    assert floats.kernel_choice is None and floats.tok_embeddings.weight.dtype == torch.float32
    assert isinstance(floats.layers[0].attention.wqkv, torch.nn.Linear)
