"""Weight-only int8 / int4 matmuls on the GPU: our Triton kernels beside PyTorch's own and bf16 cuBLAS.

    python benchmarks/bench_quant.py                    # Llama-3-8B projections, batch-1 decode + 2048-row prefill
    python benchmarks/bench_quant.py --group-size 32    # int4 group size (default 128)
    python benchmarks/bench_quant.py --smoke            # tiny shapes on the CPU in Triton's interpreter: checks
                                                        # the script runs end to end; its times mean nothing

Systems, on the same random weights (Llama-3-8B shapes, bf16 activations):
- bf16 cuBLAS: `F.linear` over the float weight (what the unquantized model streams);
- Triton int8 / int4: `llama3.kernels.quant_gemv.quantized_matmul` as the Triton backend runs it (decode
  tiles and prefill path measured on first use), and a sweep of (K splits, weight rows per program);
- PyTorch's own weight-only ops, the baselines: `torch._weight_int8pack_mm` and tinygemm's
  `torch._weight_int4pack_mm` over `torch._convert_weight_to_int4pack` (the ops gpt-fast and torchao run);
- prefill (2048 rows): each of the two paths `best_prefill_path` picks from, our tiled kernel ("kernel") and
  dequantize-then-cuBLAS ("dequantize"), beside the same baselines.

Every output is checked against the fp32 matmul of the dequantized weight before it is timed: the table
gives its relative error, and a system whose error is large computed something else (a layout the op did not
expect) and is marked so. Times: the median of 20 single calls timed with CUDA events, the L2 cache flushed
before each, so the weight streams from memory as it does in a decode step. "Decode floor" is one token's
projections (32 layers of each decode shape plus the output projection; int4 keeps the output at int8 as
`llama3.quant.weight_only.mode_for` does) run back to back: a bound on tok/s from the matmuls alone.

Results: benchmarks/results/quant-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3.quant.weight_only import quantize, quantized_linear  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DIM, FFN, VOCAB, LAYERS = 4096, 14336, 128256, 32
SHAPES = {  # name: (N, K) of x @ W.T, Llama-3-8B
    "qkv": (6144, DIM),
    "o": (DIM, DIM),
    "gate+up": (2 * FFN, DIM),
    "down": (DIM, FFN),
    "lm_head": (VOCAB, DIM),
}
SMOKE_SHAPES = {"qkv": (96, 64), "o": (64, 64), "gate+up": (192, 64), "down": (64, 96), "lm_head": (160, 64)}
WRONG = 0.05  # a relative error above this is not rounding: the system computed another product


class Weight:
    """One (N, K) weight made on the device: float, and as the int8 and int4 layers ("gpu" layout) our
    Triton backend runs."""

    def __init__(self, n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype):
        self.n, self.k, self.group_size = n, k, group_size
        w = torch.randn(n, k, device=device) * k**-0.5
        self.float = w.to(dtype)
        self.int8 = quantized_linear(quantize(w, "int8"), dtype, device, layout="gpu")
        self.dequantized = {"float": self.float.float(), "int8": self.int8.dequantize()}
        if k % group_size == 0:
            q4 = quantize(w, "int4", group_size)
            self.int4_codes = q4.codes  # for tinygemm's own packing
            self.int4 = quantized_linear(q4, dtype, device, layout="gpu")
            self.dequantized["int4"] = self.int4.dequantize()
        del w

    def bytes(self, system: str) -> int:
        """Bytes of weight data a system streams (codes plus scales and zeros)."""
        if "int8" in system:
            return self.n * self.k + 2 * self.n
        if "int4" in system:
            return self.n * self.k // 2 + 2 * 2 * self.n * self.k // self.group_size
        return 2 * self.n * self.k


def systems(weight: Weight, rows: int, sweep: bool) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """name -> (x -> x @ W.T, which dequantized weight it multiplies by). "triton" rows run
    `quantized_matmul` as the Triton backend does (decode tiles and prefill path measured on first use)."""
    from llama3.kernels.quant_gemv import int4_matmul, int8_matmul, quantized_matmul

    w, g = weight, weight.group_size
    layers = {"int8": w.int8} | ({f"int4/{g}": w.int4} if hasattr(w, "int4") else {})
    runs = {"bf16 cuBLAS": (lambda x: F.linear(x, w.float), "float")}
    for name, layer in layers.items():
        mode = layer.mode
        runs[f"triton {name}"] = (lambda x, layer=layer: quantized_matmul(x, layer), mode)
        if rows > 16:
            for path in ("kernel", "dequantize"):
                runs[f"triton {name} {path}"] = (lambda x, layer=layer, p=path: quantized_matmul(x, layer, p), mode)
        if mode == "int8":
            runs["torch._weight_int8pack_mm"] = (
                lambda x: torch._weight_int8pack_mm(x, w.int8.weight, w.int8.scales),
                mode,
            )
        else:
            runs[f"tinygemm int4/{g}"] = (tinygemm(w), mode)
    if sweep and rows <= 16:
        for block_n in (16, 32, 64):
            for splits in (1, 2, 4, 8, 16):
                t = dict(num_splits=splits, block_n=block_n)
                runs[f"sweep int8 {splits}/{block_n}"] = (
                    lambda x, t=t: int8_matmul(x, w.int8.weight, w.int8.scales, **t),
                    "int8",
                )
                if hasattr(w, "int4"):
                    runs[f"sweep int4/{g} {splits}/{block_n}"] = (
                        lambda x, t=t: int4_matmul(x, w.int4.qweight, w.int4.scales, w.int4.zeros, g, **t),
                        "int4",
                    )
    return runs


def tinygemm(w: Weight) -> Callable[[torch.Tensor], torch.Tensor]:
    """tinygemm's int4 matmul over our codes, packed as gpt-fast and torchao pack them: element 2j in the *high*
    nibble (the opposite of our layout), inner K tiles of 8, scales and zeros as (K / g, N, 2)."""
    packed = None

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal packed
        if packed is None:
            codes = w.int4_codes.to(torch.int32)
            as_uint8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            packed = (
                torch._convert_weight_to_int4pack(as_uint8, 8),
                torch.stack([w.int4.scales, w.int4.zeros], dim=-1).transpose(0, 1).contiguous(),
            )
        return torch._weight_int4pack_mm(x, packed[0], w.group_size, packed[1])

    return run


def time_ms(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type != "cuda":  # the --smoke run: wall time, meaningless under the interpreter
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1000
    from llama3.kernels.gemv import _median_ms

    l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    return _median_ms(run, l2_flush, repeats)


def measure(shapes: dict, rows: int, group_size: int, device: torch.device, repeats: int, sweep: bool) -> list[dict]:
    out = []
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 is wrong
        weight = Weight(n, k, group_size, device, dtype)
        x = torch.randn(rows, k, device=device).to(dtype)
        reference = {mode: x.float() @ w.T for mode, w in weight.dequantized.items()}
        for system, (run, mode) in systems(weight, rows, sweep).items():
            row = {"shape": name, "n": n, "k": k, "rows": rows, "system": system}
            try:
                y = run(x)
                ref = reference[mode]
                row["rel_error"] = float((y.float() - ref).norm() / ref.norm())
                ms = time_ms(lambda run=run, x=x: run(x), device, repeats)
            except Exception as e:  # noqa: BLE001  an op this torch or GPU lacks is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(row, flush=True)
                out.append(row)
                continue
            row |= {"us": ms * 1000, "tb_s": weight.bytes(system) / ms / 1e9, "tflops": 2 * rows * n * k / ms / 1e9}
            print(row, flush=True)
            out.append(row)
        del weight
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def decode_floor(rows: list[dict]) -> dict[str, float]:
    """tok/s if one token's projections were all a system did: 32 layers of the four decode shapes plus the
    output projection (int8 for int4 systems, as `mode_for` keeps it)."""
    us = {(r["system"], r["shape"]): r["us"] for r in rows if "us" in r and r["rows"] == 1}
    floors = {}
    for system in dict.fromkeys(r["system"] for r in rows if not r["system"].startswith("sweep")):
        head = system
        if "int4" in system:
            head = "triton int8" if system.startswith("triton") else "torch._weight_int8pack_mm"
        parts = [us.get((system, s)) for s in ("qkv", "o", "gate+up", "down")] + [us.get((head, "lm_head"))]
        if all(p is not None for p in parts):
            floors[system] = 1e6 / (LAYERS * sum(parts[:4]) + parts[4])
    return floors


def markdown(result: dict) -> str:
    lines = [
        f"Weight-only quantized matmuls, Llama-3-8B shapes, bf16 activations, int4 group {result['group_size']}. "
        f"{result['machine']}, torch {result['torch']}, triton {result['triton']}, {result['date']}. Median of "
        f"{result['repeats']} single calls, L2 flushed before each; relative error against the fp32 matmul of the "
        "dequantized weight.",
        "",
        "| rows | shape | system | us | TB/s (weights) | TFLOP/s | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple, dict] = {}
    for r in result["rows"]:
        if r["system"].startswith("sweep"):
            key = (r["rows"], r["shape"], r["system"].split()[1])
            if "us" in r and r["rel_error"] < WRONG and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
            continue
        lines.append(row_line(r))
    if best:
        lines += ["", "Best of the sweep (K splits / weight rows per program):", ""]
        lines += [
            "| rows | shape | system | us | TB/s (weights) | TFLOP/s | rel. error |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [row_line(r) for r in best.values()]
    if result["decode_floor_tok_s"]:
        lines += ["", "Decode floor (one token's projections back to back, single launches):", ""]
        lines += ["| system | tok/s |", "|---|---|"]
        lines += [f"| {s} | {v:.0f} |" for s, v in result["decode_floor_tok_s"].items()]
    lines += ["", f"The whole benchmark took {result['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def row_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['rows']} | {r['shape']} | {r['system']} | - | - | - | {r['error']} |"
    wrong = " (wrong result)" if r["rel_error"] > WRONG else ""
    return (
        f"| {r['rows']} | {r['shape']} | {r['system']} | {r['us']:.1f} | {r['tb_s']:.2f} | {r['tflops']:.1f} | "
        f"{r['rel_error']:.2e}{wrong} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")
    p.add_argument("--prefill-rows", type=int, default=2048, help="rows of the prefill table (0: none)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep of our kernels' tiles")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="results file stem (default: benchmarks/results/quant-<device>)")
    a = p.parse_args()

    device = torch.device("cpu" if a.smoke else a.device)
    if not a.smoke and (device.type != "cuda" or not torch.cuda.is_available()):
        sys.exit(
            f"bench_quant.py needs CUDA: it times GPU kernels (ours in Triton, PyTorch's tinygemm and int8 ones), "
            f"and {'torch sees no CUDA device here' if device.type == 'cuda' else f'--device is {device}'}. "
            "--smoke runs tiny shapes on the CPU in Triton's interpreter, to check the script."
        )
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (imported lazily)
    import triton

    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    group_size = 32 if a.smoke else a.group_size  # the smoke shapes' K (64, 96) split into groups of 32
    prefill_rows = min(a.prefill_rows, 40) if a.smoke else a.prefill_rows
    started = time.perf_counter()
    rows = measure(shapes, 1, group_size, device, a.repeats, not a.no_sweep)
    if prefill_rows:
        prefill_shapes = {name: shapes[name] for name in ("qkv", "gate+up", "down")}
        rows += measure(prefill_shapes, prefill_rows, group_size, device, a.repeats, False)
    result = {
        "benchmark": "quant",
        "date": datetime.date.today().isoformat(),
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU smoke run ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "group_size": group_size,
        "repeats": a.repeats,
        "rows": rows,
        "decode_floor_tok_s": decode_floor(rows),
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(a.out) if a.out else RESULTS / f"quant-{'smoke' if a.smoke else device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
