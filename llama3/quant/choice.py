"""Which quantized CPU kernels a model loaded with `quantize="auto"` runs: measured once per machine.

The candidates are those that keep the embedded SmolLM2's perplexity on Hamlet within 1% of float32's 24.449
(measured on a Xeon with AVX512-VNNI; benchmarks/results/perplexity-smollm2-kernels-*.md, docs/quantization.md):
- "int4": the projections as 4-bit codes (a GGUF file's own Q4 codes) through `_weight_int4pack_mm_for_cpu`,
  the output projection int8 through `_weight_int8pack_mm`, bfloat16 activations (24.458, +0.03%);
- "int4-fbgemm": the same with the output projection on fbgemm's dynamic int8 kernel, only where the CPU has
  AVX512-VNNI, so that activations get 8 bits (24.521, +0.29%; 7-bit ones, emulated, cost 1.7%);
- "int8": every projection int8 through `_weight_int8pack_mm` (24.682, +0.95%: the file's 4-bit weights
  re-rounded per row);
- "int4-dot": the file's own 4-bit codes and the int8 output projection on llama3's own integer dot-product
  kernels (`llama3.quant.dot`: activations quantized per block of 32 to 8 bits, as llama.cpp does), float32
  activations around them (24.511, +0.25%; AMD EPYC, 2026-12-02). A candidate where a C compiler is found.
fbgemm on every projection (`kernel="fbgemm"`), the fastest per call, measured 25.272 (+3.4%) with 8-bit
activations (7-bit ones, emulated: +7.7%), so it is a choice a user makes, never the default. fbgemm on some
projections besides the output is no plan either (benchmarks/results/perplexity-smollm2-kernels-c.md): gate/up
+0.63%, QKV +0.86%, down +1.33%, QKV and gate/up +1.27%; and the one within 1%, gate/up, made the decode step
slower (25.1 against 21.2 ms a SmolLM2 step: its int8 weights are twice the int4 bytes a step reads).

Why a micro-benchmark and not a table: the kernels' speeds depend on the instruction set (AVX2 against AVX-512
moved int4 from 47 to 180 us a call), on PyTorch's release and on the machine, and no table covers every CPU.
A few calls of each on decode-sized shapes take well under a second; the answer is cached per machine
(CPU model, instruction sets, ATen's and fbgemm's dispatch, torch version, the plans) in
~/.cache/llama3/kernels.json.

The projections are timed as a decode step runs them: each call on a weight no core has in its own cache, by
turns over copies of the weight adding up to `WORKING_SET` bytes of int8 codes (about the embedded SmolLM2's
weights), since a step reads each weight once. Timed on one weight over and over (0.9 MB of int8, hot in L2),
int8 was more than 1.25x faster than int4 with ATen's AVX2 kernels and won, yet SmolLM2 decoded at 59 tok/s
with int8 against 80 with int4: int8 reads twice the bytes (Xeon, AVX2 dispatch; docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llama3.quant import isa
from llama3.quant.weight_only import QuantizeError

PLANS = ("int4", "int4-fbgemm", "int8", "int4-dot")  # what "auto" chooses among
KERNELS = (*PLANS, "fbgemm")  # what `kernel=` / `--kernel` can force: "fbgemm" is every projection on fbgemm

# int4 keeps a GGUF file's own codes (perplexity +0.04% against +0.95% for int8): int8 must be clearly faster to win
INT8_MARGIN = 1.25

# decode-sized shapes (1 row): a projection and a stand-in for the output projection
BODY_SHAPE, OUTPUT_SHAPE = (1536, 576), (8192, 576)
WORKING_SET = 64 << 20  # bytes of int8 projection codes timed by turns (module docstring)
COPIES = WORKING_SET // math.prod(BODY_SHAPE)  # of the projection, each timed once a round
# a decode step of the embedded SmolLM2 in the units timed: its projections about COPIES calls of BODY_SHAPE (the
# working set is about its weights), its 49152 x 576 output projection 6 calls of OUTPUT_SHAPE
OUTPUT_CALLS = 6


@dataclass
class KernelChoice:
    """A plan, the quantization and kernel it loads with, and why it was chosen (for `llama3 generate -v`)."""

    plan: str
    quantize: str  # the weights' scheme: "int4" or "int8"
    kernel: str  # what runs the int8 layers: "torch" or "fbgemm"
    reason: str
    times_us: dict[str, float]

    def describe(self) -> str:
        times = ", ".join(f"{k} {v:.0f} us" for k, v in self.times_us.items())
        return f"kernel {self.plan}: {self.reason}" + (f" (per call, 1 row: {times})" if times else "")


def plan_settings(plan: str) -> tuple[str, str]:
    """(quantize, the kernel of its quantized layers on the CPU: "torch", "fbgemm" for int8 ones, "dot" for all) for
    a plan name (`KERNELS`)."""
    settings = {"int4": ("int4", "torch"), "int4-fbgemm": ("int4", "fbgemm"), "int8": ("int8", "torch"),
                "int4-dot": ("int4", "dot"), "fbgemm": ("int8", "fbgemm")}  # fmt: skip
    if plan not in settings:
        raise QuantizeError(f"unknown kernel {plan!r}; choose one of auto, {', '.join(KERNELS)}")
    return settings[plan]


def forced(plan: str, quantize: str | None = None) -> KernelChoice:
    """The choice a user forced (`kernel=`, `--kernel`), checked against the `quantize` also asked for."""
    mode, kernel = plan_settings(plan)
    if quantize not in (None, "auto", mode):
        raise QuantizeError(f"kernel={plan!r} runs {mode} weights; it cannot load them as {quantize}")
    return KernelChoice(plan, mode, kernel, "asked for", {})


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3" / "kernels.json"


def machine_key() -> str:
    flags = ",".join(name for name, ok in isa.isa().items() if ok)
    fbgemm = "fbgemm vnni" if isa.fbgemm_vnni() else "fbgemm no vnni"
    # the plans in the key: a cache written before a plan existed never timed it
    return f"{isa.cpu_model()}|{flags}|{isa.aten_capability()}|{fbgemm}|torch {torch.__version__}|{'/'.join(PLANS)}"


def choose(use_cache: bool = True) -> KernelChoice:
    """The plan for this machine: from the cache, or measured (and cached)."""
    key, path = machine_key(), cache_path()
    if use_cache:
        try:
            entry = json.loads(path.read_text()).get(key)
            if entry:
                return KernelChoice(**entry)
        except (OSError, ValueError, TypeError):
            pass  # no cache yet, or an unreadable one: measure
    choice = measure()
    if use_cache:
        try:
            cache = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            cache = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**cache, key: asdict(choice)}, indent=1) + "\n")
        except OSError:
            pass  # a read-only home: measure again next time
    return choice


def _time_us(fn, calls: int = 30) -> float:
    """The fastest of a few calls: a busy machine only ever slows a call down (a thread of a parallel region
    that loses its core holds the call up by a whole time slice, milliseconds)."""
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def measure() -> KernelChoice:
    """Times the candidates on random weights of decode shapes (1 row) and picks the plan."""
    threads = torch.get_num_threads()
    # one thread: the kernels' own speed. With two, a call on a busy machine waits for whichever thread lost
    # its core (measured here: 8 ms a call at load average 2, whatever the kernel), which says nothing of them
    torch.set_num_threads(1)
    try:
        times = _measure()
    finally:
        torch.set_num_threads(threads)
    plan, reason = decide(times, f"{isa.aten_capability()} dispatch")
    quantize_mode, kernel = plan_settings(plan)
    return KernelChoice(plan, quantize_mode, kernel, reason, {k: round(v, 1) for k, v in times.items()})


def decide(times: dict[str, float], cpu: str) -> tuple[str, str]:
    """(the plan, why) from the per-call times of `_measure` (microseconds) on `cpu` (its ATen dispatch).
    PyTorch's kernels first: int8 if its projections are `INT8_MARGIN` times faster than int4's, else int4 with
    the faster output projection; then llama3's dot-product kernels if a step's matmuls (`step_us`) take less."""
    if times["int8 projection"] * INT8_MARGIN < times["int4 projection"]:
        plan, reason = "int8", f"int8 projections {INT8_MARGIN}x faster than int4 or more on {cpu}"
        step = step_us(times["int8 projection"], times["int8 output"])
    else:
        plan, reason = "int4", f"int4 projections (the file's own codes) within {INT8_MARGIN}x of int8 on {cpu}"
        output = times["int8 output"]
        if "fbgemm output" in times and times["fbgemm output"] < times["int8 output"]:
            plan, reason = "int4-fbgemm", reason + "; AVX512-VNNI: fbgemm's 8-bit output projection is faster"
            output = times["fbgemm output"]
        step = step_us(times["int4 projection"], output)
    if "dot projection" in times:
        dot = step_us(times["dot projection"], times["dot output"])
        if dot < step:
            reason = (
                f"llama3's dot-product kernels (the file's own int4 codes, 8-bit activations) beat PyTorch's on {cpu}: "
                f"{dot / 1e3:.1f} against {step / 1e3:.1f} ms ({plan}) for a SmolLM2 step's matmuls"
            )
            plan = "int4-dot"
        else:
            reason += f"; llama3's dot-product kernels slower here ({dot / 1e3:.1f} against {step / 1e3:.1f} ms)"
    return plan, reason


def step_us(projection: float, output: float) -> float:
    """The matmuls of a SmolLM2 decode step, estimated from the per-call times (`OUTPUT_CALLS`)."""
    return COPIES * projection + OUTPUT_CALLS * output


def _by_turns(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One call on each of the copies of `layer` that `WORKING_SET` holds, in turn (module docstring)."""
    copies = [layer] + [copy.deepcopy(layer) for _ in range(COPIES - 1)]
    return lambda: [layer(x) for layer in copies]


def _measure() -> dict[str, float]:
    from llama3.quant import dot
    from llama3.quant.dynamic import DynInt8Linear
    from llama3.quant.weight_only import Int4Linear, Int8Linear, quantize

    gen = torch.Generator().manual_seed(0)
    body, out = (torch.randn(shape, generator=gen) for shape in (BODY_SHAPE, OUTPUT_SHAPE))
    x_body, x_out = torch.randn(1, body.shape[1], generator=gen), torch.randn(1, out.shape[1], generator=gen)
    q8_out, q4_body = quantize(out, "int8"), quantize(body, "int4")
    int4 = Int4Linear(q4_body, torch.bfloat16)
    int8_body, int8_out = Int8Linear(quantize(body, "int8"), torch.bfloat16), Int8Linear(q8_out, torch.bfloat16)
    x_body16, x_out16 = x_body.bfloat16(), x_out.bfloat16()
    times = {}
    with torch.inference_mode():
        times["int4 projection"] = _time_us(_by_turns(int4, x_body16), calls=5) / COPIES
        times["int8 projection"] = _time_us(_by_turns(int8_body, x_body16), calls=5) / COPIES
        times["int8 output"] = _time_us(lambda: int8_out(x_out16))
        if isa.fbgemm_vnni() and "fbgemm" in torch.backends.quantized.supported_engines:
            fbgemm = DynInt8Linear(q8_out)
            times["fbgemm output"] = _time_us(lambda: fbgemm(x_out))
        if dot.available():  # a C compiler is here
            dot_body, dot_out = dot.DotLinear(q4_body), dot.DotLinear(q8_out)
            times["dot projection"] = _time_us(_by_turns(dot_body, x_body), calls=5) / COPIES
            times["dot output"] = _time_us(lambda: dot_out(x_out))
    return times
