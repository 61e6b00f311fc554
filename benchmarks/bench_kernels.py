"""Quantized CPU matmul kernels, per call, on SmolLM2-135M's projection shapes: which is fastest on this CPU.

    python benchmarks/bench_kernels.py                      # 1 and 2 threads, ATen's default dispatch and AVX2
    python benchmarks/bench_kernels.py --threads 1 --rows 1 # fewer settings

Each setting (threads x `ATEN_CPU_CAPABILITY`) runs in its own subprocess: ATen reads the variable once, at
import. fbgemm picks its own instruction set from the CPU whatever ATen does, so its AVX2 column still runs
its AVX-512 code on an AVX-512 machine. Shapes N x K: 960x576 (fused q/k/v), 576x576 (wo), 3072x576 (fused
gate/up), 576x1536 (down), 49152x576 (output), at 1 row (decode) and 32 rows (a short prompt). Systems:
- fp32 / bf16 `F.linear`;
- `torch._weight_int8pack_mm` (int8 weight per row, bf16 activations) and `_weight_int4pack_mm_for_cpu` (int4
  group 32, bf16 activations): PyTorch's weight-only kernels, `llama3.quant.weight_only`;
- fbgemm dynamic int8 (`torch.ops.quantized.linear_dynamic`, fp32 activations quantized per call, 8-bit with
  AVX512-VNNI, else 7-bit) as one call; and `DynInt8Linear`, which makes a call per row (`llama3.quant.dynamic`);
- `torch._int_mm` with activations quantized per row by hand (symmetric int8);
- torchao 0.18's CPU configs, through `quantize_` on an `nn.Linear`: int8 dynamic activation + int8 weight,
  int8 dynamic activation + int4 weight (`Int8DynamicActivationIntxWeightConfig`), int8 weight-only;
- `_dyn_quant_matmul_4bit` (KleidiAI on ARM; a reference loop on x86);
- llama3's own dot-product kernels (`llama3.quant.dot`, C compiled on first use: int4 group 32 and int8 weights,
  activations quantized to 8 bits per block of 32, fp32 in and out), AVX2 code whatever ATen dispatches.
Every output is checked against fp32 `F.linear` of the same float weight (relative error of the norm): a
system far off computed something else. Time: the median of single calls (at most 0.15 s or 200 calls each).
Results: benchmarks/results/kernels-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = [(960, 576, "q/k/v"), (576, 576, "wo"), (3072, 576, "gate/up"), (576, 1536, "down"), (49152, 576, "output")]


def time_us(fn) -> tuple[float, float]:
    """(median, min) of single calls, after one warm-up call."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 200 and (time.perf_counter() - start < 0.15 or len(times) < 5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6, min(times) * 1e6


def systems(w, rows: int):
    """(name, a function of x (fp32) -> y) for each system on weight w (N, K): built before timing."""
    import torch
    import torch.nn.functional as F

    from llama3.quant.dynamic import DynInt8Linear
    from llama3.quant.isa import isa
    from llama3.quant.weight_only import Int4Linear, quantize

    N, K = w.shape
    q8 = quantize(w, "int8")
    w16, s16 = w.bfloat16(), q8.scales.bfloat16()
    yield "fp32 F.linear", lambda x: F.linear(x, w)
    yield "bf16 F.linear", lambda x: F.linear(x.bfloat16(), w16)
    yield "_weight_int8pack_mm (bf16)", lambda x: torch._weight_int8pack_mm(x.bfloat16(), q8.codes, s16)
    int4 = Int4Linear(quantize(w, "int4", 32), torch.bfloat16)
    yield "_weight_int4pack_mm_for_cpu g32 (bf16)", lambda x: int4(x.bfloat16())
    layer = DynInt8Linear(q8)
    bits = 7 if layer.reduce_range else 8
    yield (
        f"fbgemm dynamic int8 ({bits}-bit act., one call)",
        lambda x: torch.ops.quantized.linear_dynamic(x, layer.packed, layer.reduce_range),
    )
    if rows > 1:
        yield "DynInt8Linear (a call per row)", layer
    wt = q8.codes.t().contiguous().t()  # _int_mm takes (K, N) int8: the transpose of the codes

    def int_mm(x):
        s = x.abs().amax(-1, keepdim=True) / 127
        xq = (x / s).round().to(torch.int8)
        return torch._int_mm(xq, wt.t()) * s * q8.scales

    yield "torch._int_mm, act. per row (sym. int8)", int_mm
    from llama3.quant import dot

    if dot.available():
        yield f"llama3 dot int4 g32 ({dot.default_isa()})", dot.DotLinear(quantize(w, "int4", 32))
        yield f"llama3 dot int8 ({dot.default_isa()})", dot.DotLinear(q8)
    else:
        yield "llama3 dot: no C compiler", None
    yield from torchao_systems(w)
    if rows == 1 and (N * K < 4e6 or isa()["arm"]):  # the x86 reference loop: seconds for the output
        # symmetric 4-bit codes, one scale per group of 32: w ~ (q - 8) * s (the op takes scales only)
        scales = w.reshape(N, K // 32, 32).abs().amax(-1) / 7
        q4 = ((w.reshape(N, K // 32, 32) / scales[..., None]).round().clamp(-8, 7) + 8).reshape(N, K).to(torch.uint8)
        packed_codes = (q4[:, 1::2] << 4 | q4[:, 0::2]).contiguous()
        try:
            packed = torch.ops.aten._dyn_quant_pack_4bit_weight(packed_codes, scales, torch.zeros(N), 32, K, N)
            yield "_dyn_quant_matmul_4bit g32", lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, packed, 32, K, N)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            yield f"_dyn_quant_matmul_4bit g32: {type(e).__name__}: {str(e)[:80]}", None


def torchao_systems(w):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq
    except Exception as e:  # noqa: BLE001
        yield f"torchao: {type(e).__name__}", None
        return
    configs = [
        ("torchao int8 dyn. act. + int8 weight", "Int8DynamicActivationInt8WeightConfig", {}),
        ("torchao int8 dyn. act. + int4 weight", "Int8DynamicActivationIntxWeightConfig", {"weight_dtype": torch.int4}),
        ("torchao int8 weight-only", "Int8WeightOnlyConfig", {}),
    ]
    for name, config, kwargs in configs:
        try:
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            linear.requires_grad_(False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tq.quantize_(linear, getattr(tq, config)(**kwargs))
            yield name, linear
        except Exception as e:  # noqa: BLE001
            yield f"{name}: {type(e).__name__}: {str(e)[:80]}", None


def worker(rows_list: list[int]) -> dict:
    import torch

    from llama3.quant import isa

    out = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for N, K, what in SHAPES:
            w = torch.randn(N, K, generator=gen) / K**0.5
            for rows in rows_list:
                x = torch.randn(rows, K, generator=gen)
                ref = torch.nn.functional.linear(x, w)
                for name, fn in systems(w, rows):
                    row = {"shape": f"{N}x{K}", "layer": what, "rows": rows, "system": name}
                    if fn is None:
                        out.append({**row, "error": "not available"})
                        continue
                    try:
                        y = fn(x).float()
                        err = float((y - ref).norm() / ref.norm())
                        median, best = time_us(lambda fn=fn, x=x: fn(x))
                        out.append({**row, "median_us": median, "min_us": best, "rel_error": err})
                    except Exception as e:  # noqa: BLE001
                        out.append({**row, "error": f"{type(e).__name__}: {str(e)[:100]}"})
    return {"threads": torch.get_num_threads(), "aten": isa.aten_capability(), "cpu": isa.describe(), "rows": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dispatch", default="default,avx2", help="ATEN_CPU_CAPABILITY per run (default: unset)")
    p.add_argument("--rows", default="1,32")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "kernels-cpu"))
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    if a.worker:
        print(json.dumps(worker(rows)))
        return
    load_before = os.getloadavg()
    runs = []
    for threads in a.threads.split(","):
        for dispatch in a.dispatch.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            env.pop("ATEN_CPU_CAPABILITY", None)
            if dispatch != "default":
                env["ATEN_CPU_CAPABILITY"] = dispatch
            cmd = [sys.executable, __file__, "--worker", "--rows", a.rows]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"dispatch": dispatch, **run})
            print(f"threads {threads}, dispatch {dispatch}: done", file=sys.stderr, flush=True)
    import torch

    result = {
        "benchmark": "quantized CPU kernels, per call",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "cpu": runs[0]["cpu"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "runs": runs,
    }
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    runs = result["runs"]
    cols = [(r["threads"], r["dispatch"]) for r in runs]
    lines = [
        f"Quantized CPU matmuls per call (median us; SmolLM2-135M shapes), {result['cpu']}; "
        f"{result['date']}, 1-minute load average {result['load_average']['before'][0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after (`python benchmarks/bench_kernels.py`). Columns: threads / "
        "ATEN_CPU_CAPABILITY (fbgemm ignores it). err: relative error against fp32 F.linear, 1-thread default run.",
        "",
    ]
    keys = sorted({(r["shape"], r["layer"], r["rows"]) for r in runs[0]["rows"]}, key=lambda k: (k[2], k[0]))
    for shape, layer, nrows in keys:
        lines += [f"**{shape} ({layer}), {nrows} row{'s' if nrows > 1 else ''}**", ""]
        lines += ["| system | " + " | ".join(f"{t} thr / {d}" for t, d in cols) + " | err |"]
        lines += ["|---|" + "---|" * len(cols) + "---|"]
        names = [r["system"] for r in runs[0]["rows"] if (r["shape"], r["rows"]) == (shape, nrows)]
        for name in names:
            cells, err = [], ""
            for run in runs:
                r = next((r for r in run["rows"] if (r["shape"], r["rows"], r["system"]) == (shape, nrows, name)), {})
                cells.append(f"{r['median_us']:.0f}" if "median_us" in r else r.get("error", "-")[:40])
                if run is runs[0] and "rel_error" in r:
                    err = f"{r['rel_error']:.3f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {err} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
