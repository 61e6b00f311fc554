"""Cold start: a fresh `llama3 generate -n 16` process against `import torch` alone and against llama.cpp.

    flock -x /tmp/bench.lock python benchmarks/bench_cold_start.py [--llama-cpp] [--repeats 5]

Each row is a fresh process, timed from outside (fork to exit), the median of --repeats with its range:
    import torch                     `python -c "import torch"`: the floor every PyTorch program pays
    llama3 generate -n 16            the CLI on the embedded SmolLM2-135M-Instruct with its defaults, its weight
                                     cache (llama3.weights.cache) filled by an untimed run first: every run after
                                     the first on a machine
    ... first run                    the same with the cache emptied before each run: the conversion, and writing
                                     the entry
    ... LLAMA3_WEIGHT_CACHE=0        the same with the cache off
    llama.cpp (llama-cpp-python)     (--llama-cpp) the same GGUF file, 16 tokens, through the bindings
    ... baseline                     (--baseline DIR) the CLI of another checkout of the package (PYTHONPATH=DIR,
                                     e.g. `git archive COMMIT llama3 | tar -x -C DIR`), its own defaults
The cache lives in a temporary directory for the run. For `llama3 generate` the CLI's own --json timings split
the process: load (weights and tokenizer), first token (it waits for fbgemm's prepack, which runs in a thread
while the load goes on: `llama3.quant.dynamic`), generation; the rest is Python start-up and imports. Results:
benchmarks/results/cold-start.json and cold-start.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "The capital of France is"
LLAMA_CPP = (
    "import sys; from llama_cpp import Llama; "
    "m = Llama(sys.argv[1], n_ctx=512, n_threads=os.cpu_count(), verbose=False); "
    "m.create_completion(sys.argv[2], max_tokens=16, temperature=0)"
)


def cpu() -> dict:
    """After the timed processes: importing llama3.eval.bench loads torch in this process."""
    from llama3.eval.bench import machine

    m = machine()
    return {"model": m["cpu"], "cpus": m["cores"], "isa": m["isa"]}


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama-cpp-python on the same GGUF file")
    ap.add_argument("--baseline", metavar="DIR", help="also time the CLI of the llama3 package in DIR (PYTHONPATH)")
    args = ap.parse_args()

    from llama3.weights.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    baseline = None
    cache = Path(tempfile.mkdtemp(prefix="llama3-cold-start-"))
    temporary = [cache]
    generate = [sys.executable, "-m", "llama3", "generate", PROMPT, "-n", "16", "--json", "--quiet"]
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "llama3 generate -n 16": generate,
        "llama3 generate -n 16, first run (empty cache)": generate,
        "llama3 generate -n 16, LLAMA3_WEIGHT_CACHE=0": generate,
    }
    envs = {name: {"LLAMA3_WEIGHT_CACHE": str(cache)} for name in commands}
    envs["llama3 generate -n 16, LLAMA3_WEIGHT_CACHE=0"] = {"LLAMA3_WEIGHT_CACHE": "0"}
    if args.baseline:
        name = f"llama3 generate -n 16, baseline ({args.baseline})"
        baseline = str(Path(args.baseline).resolve())
        own_cache = tempfile.mkdtemp(prefix="llama3-cold-start-baseline-")  # if it has one: never ~/.cache
        temporary.append(own_cache)
        commands[name], envs[name] = generate, {"PYTHONPATH": baseline, "LLAMA3_WEIGHT_CACHE": own_cache}
    timed(generate, envs["llama3 generate -n 16"])  # fills the cache
    if args.llama_cpp:
        commands["llama.cpp (llama-cpp-python), 16 tokens"] = [
            sys.executable,
            "-c",
            "import os; " + LLAMA_CPP,
            str(gguf),
            PROMPT,
        ]
    load = [float(Path("/proc/loadavg").read_text().split()[0])]
    walls: dict[str, list[float]] = {name: [] for name in commands}
    keys = ("load_s", "time_to_first_token_s", "total_s")
    parts = {name: {key: [] for key in keys} for name in commands if name.startswith("llama3")}
    for _ in range(args.repeats):  # the commands take turns, so a drift in the machine's speed hits each alike
        for name, cmd in commands.items():
            if "first run" in name:
                shutil.rmtree(cache)
            # a baseline runs in its directory: `python -m` looks in the working directory first
            wall, stdout = timed(cmd, envs.get(name), cwd=baseline if "baseline" in name else None)
            walls[name].append(wall)
            if name in parts:
                timings = json.loads(stdout)["timings"]
                for key in keys:
                    parts[name][key].append(timings[key])
        load.append(float(Path("/proc/loadavg").read_text().split()[0]))
    for directory in temporary:
        shutil.rmtree(directory, ignore_errors=True)

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "model": f"embedded SmolLM2-135M-Instruct ({gguf.name}), the CLI's defaults",
        "repeats": args.repeats,
        "loadavg_1m": {"start": load[0], "max": max(load)},
        "wall_s": {name: summary(v) for name, v in walls.items()},
        "llama3_generate_parts_s": {name: {key: summary(v) for key, v in p.items()} for name, p in parts.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cold-start.json").write_text(json.dumps(info, indent=2) + "\n")
    c = info["cpu"]
    lines = [
        f"# Cold start ({info['date']})",
        "",
        f"{c['model']}, {c['cpus']} CPUs ({', '.join(c['isa'])}); Python {info['python']}, torch {info['torch']}; "
        f"{info['model']}. Fresh processes timed from outside, median (min-max) of {args.repeats}, the commands "
        f"taking turns; 1-minute load average {load[0]:.2f} at the start, at most {max(load):.2f}.",
        "",
        "| process | wall (s) |",
        "|---|---:|",
    ]
    for name, s in info["wall_s"].items():
        lines.append(f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    lines += [
        "",
        "Inside `llama3 generate` (its --json timings, medians; the first token waits for whatever is left of "
        "fbgemm's prepack, which runs in a thread during the load); the rest of the process is Python start-up "
        "and imports:",
        "",
        "| run | load (weights, tokenizer) | first token | all 16 tokens |",
        "|---|---:|---:|---:|",
    ]
    for name, p in info["llama3_generate_parts_s"].items():
        lines.append(
            f"| {name} | {p['load_s']['median']:.2f} | {p['time_to_first_token_s']['median']:.3f} "
            f"| {p['total_s']['median']:.2f} |"
        )
    (RESULTS / "cold-start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
