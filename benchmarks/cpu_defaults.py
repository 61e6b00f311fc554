"""The embedded SmolLM2 on the CPU, loaded the default way, against llama.cpp on the same GGUF file: `llama3 bench`
run at several instruction-set levels, side by side.

    python benchmarks/cpu_defaults.py                        # three levels, about 3 minutes on 2 cores
    python benchmarks/cpu_defaults.py --levels default       # the machine as it is only

Each level is one process of

    llama3 bench -p 32,256,1024 -n 64 -r 3 --compare llama.cpp --json results/generate-cpu-defaults-LEVEL.json

with the level's environment: batch-1 greedy decode of 64 tokens (tg64), the time to first token of 32, 256 and
1024-token prompts (pp32 / pp256 / pp1024), the aten ops per layer of one decode step, ours and llama.cpp taking
turns run by run, medians of 3. Levels:
    default   the machine as it is
    avx2      ATEN_CPU_CAPABILITY=avx2: PyTorch's own kernels at AVX2; fbgemm, oneDNN and llama.cpp keep theirs
    avx2-cpu  a CPU without AVX-512 emulated for every library: ATEN_CPU_CAPABILITY=avx2,
              FBGEMM_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2, and a llama.cpp built for AVX2 only, found
              first on PYTHONPATH from --llama-cpp-avx2 (default third_party/llama-cpp-avx2; the level is skipped
              without it), built with
                  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
                  pip install --no-binary llama-cpp-python --target third_party/llama-cpp-avx2 llama-cpp-python
OpenMP's waiting is the `llama3` command's own default (`set_thread_defaults`: a short spin on a quiet machine)
unless --omp-wait-policy sets one. Results: benchmarks/results/generate-cpu-defaults-<level>.json and .md, and
generate-cpu-defaults.md with every level measured in this run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llama3.eval.bench_report import held_to

RESULTS = Path(__file__).parent / "results"
TTFT = (32, 256, 1024)
NEW_TOKENS = 64


LEVELS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx2-cpu": {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
SET_BY_LEVELS = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def run_level(level: str, repetitions: int, wait_policy: str, out: Path, llama_cpp_avx2: Path) -> dict:
    """One `llama3 bench` process at a level (`LEVELS`); its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in (*SET_BY_LEVELS, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= {**LEVELS[level], "HF_HUB_OFFLINE": "1"}
    if wait_policy != "cli":
        env["OMP_WAIT_POLICY"] = wait_policy
    if level == "avx2-cpu":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(llama_cpp_avx2.resolve()), env.get("PYTHONPATH")]))
    tmp = out.with_suffix(".partial.json")
    cmd = [sys.executable, "-m", "llama3", "bench", "-p", ",".join(map(str, TTFT)), "-n", str(NEW_TOKENS)]
    cmd += ["-r", str(repetitions), "--compare", "llama.cpp", "--json", str(tmp)]
    print(f"{level}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(tmp.read_text())
    tmp.unlink()
    return result


def table(result: dict) -> list[str]:
    """One row per system: decode tok/s and its ratio to llama.cpp's, aten ops per layer, TTFT per prompt length."""
    h, rows = result["header"], result["rows"]
    load = h.get("load_average") or {}
    m = h["machine"]
    lines = [
        f"PyTorch kernels {m['torch_cpu_capability']}{held_to(m)}"
        + f"; llama.cpp {h['versions'].get('llama.cpp', '?')}; OMP_WAIT_POLICY {m['omp_wait_policy'] or 'unset'}, "
        f"GOMP_SPINCOUNT {m.get('gomp_spincount') or 'unset'}; "
        f"load average before {' '.join(map(str, load.get('before') or []))}, "
        f"after {' '.join(map(str, load.get('after') or []))}; the run took {result['wall_seconds']:.0f} s.",
        "",
        f"| system | weights | decode tok/s | x llama.cpp | aten ops / layer | TTFT {' / '.join(map(str, TTFT))} ms "
        "| load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    decode = {r["system"]: r for r in rows if r["test"] == f"tg{NEW_TOKENS}"}
    cpp = decode.get("llama.cpp")
    for system, r in decode.items():
        ttft = {
            x["n_tokens"]: x["time_to_first_token_ms"] for x in rows if x["system"] == system and x["test"][:2] == "pp"
        }
        ratio = f"{r['tokens_per_second'] / cpp['tokens_per_second']:.2f}" if cpp else "-"
        ops = "-" if r["aten_ops_per_layer"] is None else f"{r['aten_ops_per_layer']:.0f}"
        lines.append(
            f"| {system} | {r['system_weights']} | {r['tokens_per_second']:.1f} ± {r['tokens_per_second_std']:.1f} | "
            f"{ratio} | {ops} | {' / '.join(f'{ttft[n]:.0f}' for n in TTFT)} | {r['load_average_1min']} |"
        )
    return lines


def markdown(results: list[dict]) -> str:
    first = results[0]
    m, v = first["header"]["machine"], first["header"]["versions"]
    lines = [
        f"The embedded {first['rows'][0]['model']} loaded the default way against llama.cpp on the same file "
        f"(`llama3 bench -p {','.join(map(str, TTFT))} -n {NEW_TOKENS} --compare llama.cpp`, "
        "benchmarks/cpu_defaults.py): batch-1 greedy decode of "
        f"{NEW_TOKENS} tokens after a one-token prompt and time to first token, median ± standard deviation of "
        f"{first['grid']['repetitions']} runs, the systems taking turns. {m['cpu']}, {m['threads']} threads, ISA "
        f"{', '.join(m['isa'])}; " + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; {first['header']['date']}.",
        "",
    ]
    for result in results:
        lines += [*table(result), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(LEVELS), help=f"of {', '.join(LEVELS)} (default: all)")
    ap.add_argument("--repetitions", "-r", type=int, default=3)
    ap.add_argument("--omp-wait-policy", default="cli", choices=("cli", "ACTIVE", "PASSIVE"))
    ap.add_argument("--llama-cpp-avx2", type=Path, default=Path("third_party/llama-cpp-avx2"))
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for level in a.levels.split(","):
        if level not in LEVELS:
            ap.error(f"--levels: unknown level {level!r} (choose from {', '.join(LEVELS)})")
        if level == "avx2-cpu" and not (a.llama_cpp_avx2 / "llama_cpp").is_dir():
            print(f"avx2-cpu: skipped, no llama.cpp built for AVX2 in {a.llama_cpp_avx2}", file=sys.stderr)
            continue
        result = run_level(level, a.repetitions, a.omp_wait_policy, a.out / "generate-cpu-defaults-partial",
                           a.llama_cpp_avx2)  # fmt: skip
        stem = a.out / f"generate-cpu-defaults-{'avx512' if level == 'default' else level}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown([result]))
        results.append(result)
    text = markdown(results)
    if len(results) > 1:
        (a.out / "generate-cpu-defaults.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
