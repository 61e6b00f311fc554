"""The embedded SmolLM2 on the CPU, loaded the default ways, against llama.cpp on the same GGUF file, one run:

    python benchmarks/bench_generate.py --llama-cpp
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_generate.py --llama-cpp     # PyTorch's AVX2 kernels

Two loads of ours: the library's default (`Llama.from_pretrained()`, no options) and the command line's
(`llama3 generate`'s defaults, through the CLI's own `load`). For each: batch-1 greedy decode tokens/s (64 new
tokens after a 32-token prompt, the systems taking turns, medians), its ratio to llama.cpp's, the aten ops per
layer of one decode step (torch.profiler: the top-level aten ops inside the blocks), and time to first token
for 32, 256 and 1024-token prompts (the best of two). Every row names the CPU, PyTorch's kernel level
(`ATEN_CPU_CAPABILITY` picks it; fbgemm and oneDNN choose their own) and the load average when it was measured.

Results: benchmarks/results/generate-cpu-defaults-<level>.json and .md; once both levels have run,
generate-cpu-defaults.md puts them side by side.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import torch
from bench_generate import RESULTS, LlamaCpp, Ours, cpu_flags, interleaved, prompts_for
from torch.profiler import profile, record_function

from llama3 import Llama
from llama3.weights.hub import default_model, resolve

TTFT_LENGTHS = (32, 256, 1024)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_name() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cli_default() -> Llama:
    """The model `llama3 generate` loads with no options (its parser's defaults and its `load`)."""
    from llama3.cli import build_parser
    from llama3.cli.common import load

    args = build_parser().parse_args(["generate", "-q", "-"])
    return load(args)[0]


def weights(llm: Llama) -> str:
    w2 = llm.model.layers[0].feed_forward.w2
    return f"{type(w2).__name__}, {llm.model.tok_embeddings.weight.dtype} activations".replace("torch.", "")


@torch.inference_mode()
def aten_ops_per_layer(llm: Llama) -> float:
    """Top-level aten ops (called by no other aten op) inside the blocks of one batch-1 decode step, per layer:
    the second step, as every later one (the first also gathers each block's cache views, `CpuOps`)."""
    model = llm.model
    model.setup_cache(1, 64)
    model(torch.arange(32)[None] + 100, torch.arange(32), kv_len=32)
    model(torch.tensor([[104]]), torch.tensor([[32]]), kv_len=33)

    def block(layer, *args):
        with record_function("block"):
            return model.ops.run_block(layer, *args)

    with profile() as prof:
        model(torch.tensor([[105]]), torch.tensor([[33]]), kv_len=34, run_block=block)

    def in_block(e) -> bool:
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name.startswith("aten::"):
                return False
            if e.name == "block":
                return True
        return False

    return sum(e.name.startswith("aten::") and in_block(e) for e in prof.events()) / model.args.n_layers


def time_to_first_token(llm: Llama, prompt_len: int) -> float:
    llm.generate(prompts_for(1, prompt_len), 1, temperature=0, stop_tokens=[])
    return llm.last_stats["time_to_first_token_s"] * 1000


def cpp_time_to_first_token(cpp: LlamaCpp, prompt_len: int) -> float:
    cpp.prompt = prompts_for(1, prompt_len)[0]
    return cpp.run(1)[0] * 1000


def main(new_tokens: int, repeats: int, out: str | None) -> None:
    level = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    where = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": level,
        "cpu_flags": [f for f in FLAGS if f in flags],
    }
    print(where, "load average", load_average(), flush=True)
    started, load_before = time.perf_counter(), load_average()
    gguf = str(resolve(default_model()))
    systems = {"llama3, library default": Llama.from_pretrained(progress=False), "llama3, CLI default": cli_default()}
    ops = {name: aten_ops_per_layer(llm) for name, llm in systems.items()}
    cpp = LlamaCpp(gguf, 32, new_tokens, torch.get_num_threads(), n_ctx=max(TTFT_LENGTHS) + new_tokens)
    runners = {name: Ours(llm, 1, 32, new_tokens) for name, llm in systems.items()}
    runners["llama.cpp"] = cpp
    decode = interleaved(runners, repeats)
    cpp.prompt = prompts_for(1, 32)[0]

    ttft: dict[str, dict[int, float]] = {name: {} for name in runners}
    for llm in systems.values():
        time_to_first_token(llm, max(TTFT_LENGTHS))  # warm-up: the cache grows once, to the longest prompt
    for n in TTFT_LENGTHS:
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(2):  # the best of two, the systems taking turns: a prefill is one long call
            for name, llm in systems.items():
                samples[name].append(time_to_first_token(llm, n))
            samples["llama.cpp"].append(cpp_time_to_first_token(cpp, n))
        for name, s in samples.items():
            ttft[name][n] = min(s)
        print(n, {k: round(v[n]) for k, v in ttft.items()}, "load average", load_average(), flush=True)

    rows = []
    for name in runners:
        row = {
            "system": name,
            "weights": f"{cpp.dtype} (llama.cpp)" if name == "llama.cpp" else weights(systems[name]),
            "backend": None if name == "llama.cpp" else systems[name].model.ops.name,
            "decode_tok_s": decode[name]["tok_s"],
            "vs_llama_cpp": decode[name]["tok_s"] / decode["llama.cpp"]["tok_s"],
            "aten_ops_per_layer": ops.get(name),
            "ttft_ms": {str(n): ttft[name][n] for n in TTFT_LENGTHS},
            **where,
            "load_average": load_average(),
        }
        rows.append(row)
        print(row, flush=True)
    result = {
        "benchmark": "generate-cpu-defaults",
        "date": datetime.date.today().isoformat(),
        "model": Path(gguf).name,
        "torch": torch.__version__,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "llama_cpp_extra_buffers": cpp.extra_buffers,
        **where,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(out) if out else RESULTS / f"generate-cpu-defaults-{level.lower()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown([result]))
    print(markdown([result]))
    if not out:  # both levels measured: side by side
        runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("generate-cpu-defaults-*.json"))]
        if len(runs) > 1:
            (RESULTS / "generate-cpu-defaults.md").write_text(markdown(runs))


def markdown(runs: list[dict]) -> str:
    """One table; a column group per run (PyTorch kernel level)."""
    first = runs[0]
    lines = [
        f"The embedded {first['model']} loaded the default ways against llama.cpp on the same file: batch-1 greedy "
        f"decode of {first['new_tokens']} tokens after a 32-token prompt (median of {first['repeats']} runs, the "
        f"systems taking turns) and time to first token (best of two). {first['cpu']}, {first['threads']} threads, "
        f"flags {', '.join(first['cpu_flags'])}; torch {first['torch']}, {first['date']}.",
        "",
    ]
    for run in runs:
        lines += [
            f"PyTorch kernels {run['torch_cpu_capability']}; load average before {run['load_average_before']}, "
            f"after {run['load_average_after']}; llama.cpp extra buffer types (AMX repack) "
            f"{'on' if run['llama_cpp_extra_buffers'] else 'off'}.",
            "",
            "| system | weights | decode tok/s | x llama.cpp | aten ops / layer | TTFT 32 / 256 / 1024 ms | load avg |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            ops = "-" if r["aten_ops_per_layer"] is None else f"{r['aten_ops_per_layer']:.0f}"
            ttft = " / ".join(f"{v:.0f}" for v in r["ttft_ms"].values())
            lines.append(
                f"| {r['system']} | {r['weights']} | {r['decode_tok_s']:.1f} | {r['vs_llama_cpp']:.2f} | {ops} | "
                f"{ttft} | {r['load_average']} |"
            )
        lines += ["", f"That run took {run['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)
