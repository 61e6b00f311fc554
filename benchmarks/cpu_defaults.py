"""The embedded SmolLM2 on the CPU, loaded the default way, against llama.cpp on the same GGUF file: `llama3 bench`
run once with PyTorch's own CPU kernels and once with its AVX2 ones, the two side by side.

    python benchmarks/cpu_defaults.py                        # both levels, about 2 minutes on 2 cores
    python benchmarks/cpu_defaults.py --levels default       # PyTorch's own level only

Each level is one process of

    ATEN_CPU_CAPABILITY=avx2 OMP_WAIT_POLICY=ACTIVE llama3 bench -p 32,256,1024 -n 64 -r 3 --compare llama.cpp \\
        --json benchmarks/results/generate-cpu-defaults-avx2.json

(no ATEN_CPU_CAPABILITY for the default level): batch-1 greedy decode of 64 tokens (tg64), the time to first token
of 32, 256 and 1024-token prompts (pp32 / pp256 / pp1024), the aten ops per layer of one decode step, ours and
llama.cpp taking turns run by run, medians of 3. OMP_WAIT_POLICY=ACTIVE: OpenMP's threads spin-wait as in a
plain Python program (and as llama.cpp's threads do); the `llama3` command alone would set PASSIVE (--omp-wait-policy
PASSIVE times that). `ATEN_CPU_CAPABILITY` picks PyTorch's kernels only: fbgemm, oneDNN and llama.cpp choose their own.
Results: benchmarks/results/generate-cpu-defaults-<level>.json and .md, and generate-cpu-defaults.md with every
level measured in this run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TTFT = (32, 256, 1024)
NEW_TOKENS = 64


def run_level(level: str, repetitions: int, wait_policy: str, out: Path) -> dict:
    """One `llama3 bench` process at a PyTorch kernel level ("default": unset); its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env |= {"OMP_WAIT_POLICY": wait_policy, "HF_HUB_OFFLINE": "1"}
    if level != "default":
        env["ATEN_CPU_CAPABILITY"] = level
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
    lines = [
        f"PyTorch kernels {h['machine']['torch_cpu_capability']}; OMP_WAIT_POLICY {h['machine']['omp_wait_policy']}; "
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
    ap.add_argument("--levels", default="default,avx2", help="PyTorch CPU kernel levels (default: default,avx2)")
    ap.add_argument("--repetitions", "-r", type=int, default=3)
    ap.add_argument("--omp-wait-policy", default="ACTIVE", choices=("ACTIVE", "PASSIVE"))
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for level in a.levels.split(","):
        result = run_level(level, a.repetitions, a.omp_wait_policy, a.out / "generate-cpu-defaults-partial")
        stem = a.out / f"generate-cpu-defaults-{result['header']['machine']['torch_cpu_capability'].lower()}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown([result]))
        results.append(result)
    text = markdown(results)
    if len(results) > 1:
        (a.out / "generate-cpu-defaults.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
