"""llama3's C dot-product kernels (llama3/quant/dot.c) against the same math in PyTorch (`dot.reference`, float64
from the integer sums), against the rounding rule they claim, and in a model; how they build, fail and are chosen."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import needs_cc

from llama3 import Transformer
from llama3.quant import choice, dot
from llama3.quant.dot import DotKernelError, DotLinear, quantize_activations, reference
from llama3.quant.weight_only import QuantizedWeight, QuantizeError, quantize

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_cc]

# the builds a machine can run: the plain C one everywhere, the AVX2 one where the CPU has AVX2 and FMA
CODES = ["generic"] + (["avx2"] if dot.default_isa() == "avx2" else [])


def gguf_like(q: QuantizedWeight) -> QuantizedWeight:
    """`q` with its int4 scales and minimums (m = z - 8 s) float16 values, as a GGUF Q4_1 file stores them."""
    if q.mode != "int4":
        return q
    s, m = q.scales.half().float(), (q.zeros - 8 * q.scales).half().float()
    z = m + 8 * s
    assert torch.equal(z.double(), m.double() + 8 * s.double())  # exact: m is z - 8 s again
    return QuantizedWeight("int4", q.codes, s, z, q.group_size)


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 sums of the same integer products: within float32 rounding of the largest output."""
    assert got.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=3e-7 * scale * 32)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize(
    ("mode", "group_size", "in_features"),
    [
        ("int4", 32, 96),
        ("int4", 32, 256),
        ("int4", 64, 192),
        ("int4", 128, 384),
        ("int8", None, 96),
        ("int8", None, 256),
    ],
)
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_the_kernels_compute_the_reference(code, mode, group_size, in_features, rows):
    """Decode (1 row of x) and prefill (rows in fours and a remainder), an odd and an even number of blocks,
    int4 groups larger than a block, 37 output rows (no multiple of anything)."""
    gen = torch.Generator().manual_seed(rows * in_features)
    q = gguf_like(quantize(torch.randn(37, in_features, generator=gen), mode, group_size or 32))
    x = torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    layer = DotLinear(q, code)
    assert_matches(layer(x), reference(x, q))
    assert torch.equal(layer.dequantize(), q.dequantize())  # the codes and scales it holds are the weight's own


@pytest.mark.parametrize("code", CODES)
def test_float16_scales_are_read_exactly_subnormal_ones_too(code):
    """Scales and minimums across float16's range, from subnormals (2^-24 on) to 60000: the plain C build converts
    float16 itself (the AVX2 one with F16C's instruction)."""
    scales = torch.tensor([2.0**-24, 3 * 2.0**-20, 2.0**-14 - 2.0**-24, 2.0**-14, 0.01, 1.5, 60000.0, 0.0])
    mins = -torch.tensor([2.0**-23, 2.0**-18, 2.0**-15, 0.5, 2.0**-24, 3.0, 1000.0, 65504.0])
    scales, mins = scales.half().float(), mins.half().float()  # 0.01: the nearest float16
    codes = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    q = QuantizedWeight("int4", codes, scales[:, None], (mins + 8 * scales)[:, None], 32)
    assert torch.equal(DotLinear(q, code).dequantize(), q.dequantize())
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(8))
    got, expected = DotLinear(q, code)(x), reference(x, q)
    for n in range(8):  # each weight row at its own scale
        assert_matches(got[:, n], expected[:, n])


def test_scales_are_kept_in_float16_as_gguf_keeps_them():
    """Scales that are no float16 values (int4 quantized here, not read from a GGUF file) are rounded to the
    nearest, 2^-11 of the scale and at most 2^-11 of the minimum, times a code of at most 15; beyond float16's
    range they are refused."""
    q = quantize(torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None], "int4", 32)
    w = DotLinear(q).dequantize()
    s = q.scales.repeat_interleave(32, dim=1)
    m = (q.zeros - 8 * q.scales).repeat_interleave(32, dim=1)
    bound = (15 * s.abs() + m.abs()) * 2**-11
    assert ((w - q.dequantize()).abs() <= bound).all()
    assert not torch.equal(w, q.dequantize())
    with pytest.raises(QuantizeError, match="beyond float16's range"):
        DotLinear(quantize(torch.randn(4, 32) * 1e6, "int4"))


@pytest.mark.parametrize("code", CODES)
def test_activations_round_half_to_even_per_block_of_32(code):
    """Read back through an identity weight (y[n] = d * a[n]): a block whose largest |x| is 127 has d = 1, so x
    itself is rounded, ties to even (2.5 -> 2, 3.5 -> 4, -0.5 -> 0); each block has a scale of its own; a block of
    zeros gives zeros."""
    ties = torch.tensor([2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -1.5, 4.5])
    first = torch.cat([torch.tensor([127.0]), ties, torch.linspace(-100, 100, 21)])
    second = torch.linspace(-0.3, 0.2, 32)  # a block of its own scale: 0.3 / 127
    x = torch.cat([first, second, torch.zeros(32)])[None]
    eye = QuantizedWeight("int8", torch.eye(96, dtype=torch.int8), torch.ones(96))
    y = DotLinear(eye, code)(x)[0]
    codes, scales = quantize_activations(x)
    assert scales[0, 0] == 1.0 and scales[0, 2] == 0.0
    assert torch.equal(y[:11], torch.tensor([127.0, 2, 4, -2, -4, 0, 0, 2, 126, -2, 4]))  # numpy.rint's rule
    assert torch.equal(y, (codes.float() * scales[..., None]).flatten())
    assert torch.equal(y[64:], torch.zeros(32))


@pytest.mark.parametrize("code", CODES)
def test_extreme_codes_do_not_overflow_the_int16_pairs(code):
    """int8 codes -128 and 127 and int4 codes 0 and 15 against activations of +-127: the largest pair sums the
    kernels add in int16 (2 * 128 * 127 and 2 * 15 * 127), exactly."""
    x = torch.tensor([[127.0, -127.0] * 16 + [-127.0] * 32])
    codes8 = torch.tensor([[-128, -128] * 32, [127, -128] * 32, [127, 127] * 32], dtype=torch.int8)
    q8 = QuantizedWeight("int8", codes8, torch.ones(3))
    assert torch.equal(DotLinear(q8, code)(x), (x @ codes8.float().T))
    codes4 = torch.tensor([[15] * 64, [0] * 64, [15, 0] * 32], dtype=torch.uint8)
    q4 = QuantizedWeight("int4", codes4, torch.ones(3, 2), torch.zeros(3, 2), 32)
    assert torch.equal(DotLinear(q4, code)(x), x @ (codes4.float() - 8).T)


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.2-tied"])
@torch.inference_mode()
def test_a_model_on_the_dot_kernels_computes_the_reference(tiny_hf, variant):
    """kernel="int4-dot": every projection (fused q/k/v and gate/up, wo, down) int4 and the output (tied: its own
    copy) int8 run the kernels, float32 around them: each computes the reference on the activations it is given,
    and the logits are those of the same weights with float activations but for the 8-bit rounding."""
    d, hf = tiny_hf(variant)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model = Transformer.from_pretrained(d, device="cpu", kernel="int4-dot")
    assert model.tok_embeddings.weight.dtype == torch.float32
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DotLinear)}
    assert len(layers) == 4 * model.args.n_layers + 1 and layers["output"].mode == "int8"
    for layer in layers.values():
        layer.q = layer.weight_codes()
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out))) for m in layers.values()]
    logits = model(tokens)
    for hook in hooks:
        hook.remove()
    assert {id(m) for m, _, _ in calls} == {id(m) for m in layers.values()}
    for layer, x, out in calls:  # each layer on the activations the model gave it
        assert_matches(out.reshape(-1, layer.out_features), reference(x.reshape(-1, layer.in_features), layer.q))
    # the weights' own codes in float32, float activations: the 8-bit activations' share of the error alone
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Dequantized(layer.dequantize()))
    dequantized = model(tokens)
    assert (logits - dequantized).norm() / dequantized.norm() < 0.02
    expected = hf(tokens).logits
    assert (logits - expected).norm() / expected.norm() < 0.1  # and the 4-bit weights' (7.8% with float activations)


class Dequantized(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


@torch.inference_mode()
def test_the_lean_decode_step_on_the_dot_kernels_equals_the_reference_block(tiny_hf):
    """The CPU backend's decode step calls the layers' kernels itself (`_project`): its logits equal the reference
    block's, which calls the modules, for a batch of one and a ragged batch."""
    from test_cpu_backend import decode

    from llama3.model.backends import CpuOps, TorchOps

    d, _ = tiny_hf("llama3-gqa")
    model = Transformer.from_pretrained(d, device="cpu", kernel="int4-dot")
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    for prompt_lens in ([5], [3, 9]):
        model.set_ops(TorchOps)
        expected = decode(model, tokens[: len(prompt_lens)], prompt_lens, 6)
        model.set_ops(CpuOps)
        got = decode(model, tokens[: len(prompt_lens)], prompt_lens, 6)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(code, mode):
    """Activations are quantized per row (per block of 32 of it), so a row's result is the same alone as in a
    batch of 9 (prefill's kernel for several rows; decode's for one), up to the order of float32 sums."""
    gen = torch.Generator().manual_seed(5)
    layer = DotLinear(gguf_like(quantize(torch.randn(40, 128, generator=gen), mode)), code)
    x = torch.randn(9, 128, generator=gen) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different sizes
    together = layer(x)
    for i in range(9):
        alone = layer(x[i : i + 1])[0]
        torch.testing.assert_close(together[i], alone, rtol=0, atol=2e-6 * alone.abs().max().item())


def test_bad_input_is_refused_by_name():
    layer = DotLinear(quantize(torch.randn(8, 64), "int4"))
    with pytest.raises(QuantizeError, match="an input of 32 features for a layer of 64"):
        layer(torch.randn(1, 32))
    with pytest.raises(QuantizeError, match="in blocks of 32, at most 65536; this weight has 48"):
        DotLinear(quantize(torch.randn(8, 48), "int8"))
    with pytest.raises(QuantizeError, match="take float32 activations, got torch.bfloat16"):
        Transformer.from_pretrained("does-not-matter", device="cpu", kernel="int4-dot", dtype=torch.bfloat16)
    assert torch.equal(layer(torch.ones(2, 64, dtype=torch.bfloat16)), layer(torch.ones(2, 64)).bfloat16())


def test_without_a_compiler_the_kernels_are_no_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    dot.library.cache_clear()
    try:
        assert not dot.available()
        with pytest.raises(DotKernelError, match="need a C compiler: '.*no-such-cc' was not found"):
            DotLinear(quantize(torch.randn(8, 64), "int4"))
        monkeypatch.setenv("CC", "false")  # a compiler that fails
        dot.library.cache_clear()
        with pytest.raises(DotKernelError, match="false could not build dot.c"):
            dot.library()
        assert not list((tmp_path / "llama3" / "kernels").glob("*.so"))  # no half-built library left behind
    finally:
        dot.library.cache_clear()


def test_the_library_is_built_once_per_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dot.library.cache_clear()
    try:
        lib = dot.library("generic")
        built = list((tmp_path / "llama3" / "kernels").glob("dot-generic-*.so"))
        assert len(built) == 1 and lib.dot_isa() == b"generic"
        mtime = built[0].stat().st_mtime_ns
        dot.library.cache_clear()
        dot.library("generic")  # a new process: loads the file, builds nothing
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        dot.library.cache_clear()


def test_the_choice_takes_the_dot_kernels_only_when_a_step_is_faster():
    base = {"int4 projection": 40.0, "int8 projection": 70.0, "int8 output": 120.0}
    step = choice.step_us(40.0, 120.0)
    slower = {**base, "dot projection": 45.0, "dot output": 100.0}
    assert choice.step_us(45.0, 100.0) > step and choice.decide(slower, "AVX512")[0] == "int4"
    faster = {**base, "dot projection": 30.0, "dot output": 150.0}
    assert choice.step_us(30.0, 150.0) < step and choice.decide(faster, "AVX2")[0] == "int4-dot"
    assert "llama3's dot-product kernels" in choice.decide(faster, "AVX2")[1]
    assert choice.decide(base, "AVX2")[0] == "int4"  # no compiler: not timed, not chosen


def cpu_ticks() -> dict[str, int]:
    """Each thread of this process: its user + system CPU time in clock ticks (/proc/self/task/*/stat)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_the_kernels_run_on_pytorchs_thread_count_in_any_thread(torch_threads):
    """OpenMP's own default in a thread that never set it is every core; the kernels take PyTorch's count, as
    ATen's ops do (a server's engine thread, `--threads`): the threads that spend CPU time while a fresh thread
    runs the kernel for about 0.3 s are that many (a count fixed in the kernel, 2, fails the first case). No
    torch op runs in it first: ATen's first parallel op in a thread sets that thread's OpenMP count to PyTorch's."""
    layer, x = DotLinear(quantize(torch.randn(4096, 1024), "int4")), torch.randn(1, 1024)
    saved = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    busy = []

    def run():
        time.sleep(0.1)  # the other threads' spinning after their last parallel region is over
        before = cpu_ticks()
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            layer(x)
        after = cpu_ticks()
        busy.extend(tid for tid, t in after.items() if t - before.get(tid, 0) >= 3)

    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(saved)
    assert len(busy) == torch_threads, busy
