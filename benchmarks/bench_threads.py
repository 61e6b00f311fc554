"""`llama3 generate` on a quiet and on a busy CPU: the thread settings against each other.

    flock -x /tmp/bench.lock python benchmarks/bench_threads.py

Each run is a fresh `llama3 generate --json` process on the embedded SmolLM2-135M-Instruct (its default weights on the
CPU), greedy, --max-new-tokens tokens from one prompt. Settings:
    libgomp's default  torch imported before the CLI sets anything: GNU OpenMP's threads spin 300,000 times
                  before they sleep, one thread per core
    ACTIVE        OMP_WAIT_POLICY=ACTIVE: threads never sleep (as a benchmark's process runs), one a core
    PASSIVE       OMP_WAIT_POLICY=PASSIVE: threads sleep at once (the CLI's previous default), one a core
    default       `llama3 generate` as it is now (`llama3.cli.common.set_thread_defaults`): on a quiet machine
                  GOMP_SPINCOUNT=10000 and a thread a core; where other processes run, PASSIVE threads on
                  the idle CPUs only, at least one
    1 thread      OMP_NUM_THREADS=1 (the same as --threads 1)
Conditions: quiet (nothing else started), and busy: one `python -c "while True: pass"` per core running
beside it. Reported: decode tokens/s and time to first token (from --json), the process's wall time
(start-up, load and generation) and /proc/loadavg's 1-minute load when the run started. Median of
--repeats. Results: benchmarks/results/threads-cpu.json and threads-cpu.md.
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
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "The three most important things to know about llamas are"
BEFORE = "import sys, torch; from llama3.cli import main; sys.exit(main(sys.argv[1:]))"
CORES = {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}  # a thread a core, whatever the CLI would choose
SETTINGS = {
    "libgomp's default (spin 300,000)": ([sys.executable, "-c", BEFORE], {}),
    "OMP_WAIT_POLICY=ACTIVE": ([sys.executable, "-m", "llama3"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "OMP_WAIT_POLICY=PASSIVE (the previous default)": (
        [sys.executable, "-m", "llama3"],
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    "default (quiet: GOMP_SPINCOUNT=10000; busy: PASSIVE on the idle CPUs)": ([sys.executable, "-m", "llama3"], {}),
    "OMP_NUM_THREADS=1": ([sys.executable, "-m", "llama3"], {"OMP_NUM_THREADS": "1"}),
}


def cpu() -> dict:
    """After the timed processes: importing llama3.eval.bench loads torch in this process."""
    from llama3.eval.bench import machine

    m = machine()
    return {"model": m["cpu"], "cpus": m["cores"], "isa": m["isa"]}


def run_once(cmd: list[str], extra_env: dict, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= {"HF_HUB_OFFLINE": "1", **extra_env}
    load = float(Path("/proc/loadavg").read_text().split()[0])
    args = ["generate", PROMPT, "-n", str(n), "--temperature", "0", "--json", "--quiet"]
    t0 = time.perf_counter()
    out = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    r = json.loads(out.stdout)
    return {
        "tokens_per_second": r["timings"]["tokens_per_second"],
        "time_to_first_token_s": r["timings"]["time_to_first_token_s"],
        "wall_s": round(wall, 2),
        "loadavg_1m": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for condition in ("quiet", "busy"):
        loaders = []
        if condition == "busy":
            loaders = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())]
            time.sleep(5)
        try:
            for name, (cmd, extra_env) in SETTINGS.items():
                runs = [run_once(cmd, extra_env, args.max_new_tokens) for _ in range(args.repeats)]
                row = {"condition": condition, "setting": name, "runs": runs}
                for key in ("tokens_per_second", "time_to_first_token_s", "wall_s", "loadavg_1m"):
                    row[key] = round(statistics.median(r[key] for r in runs), 3)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        finally:
            for p in loaders:
                p.kill()
                p.wait()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "model": "embedded SmolLM2-135M-Instruct, the CLI's default weights",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads-cpu.json").write_text(json.dumps(info, indent=2) + "\n")
    c = info["cpu"]
    lines = [
        f"# llama3 generate, quiet and busy CPU ({info['date']})",
        "",
        f"{c['model']}, {c['cpus']} CPUs ({', '.join(c['isa'])}); torch {info['torch']}; {info['model']}, "
        f"{args.max_new_tokens} greedy tokens, median of {args.repeats} fresh processes. Busy: one "
        "`python -c 'while True: pass'` per CPU beside it.",
        "",
        "| condition | setting | decode tok/s | first token (s) | wall (s) | load avg (1 min) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {r['setting']} | {r['tokens_per_second']:.1f} | "
            f"{r['time_to_first_token_s']:.3f} | {r['wall_s']:.1f} | {r['loadavg_1m']:.2f} |"
        )
    (RESULTS / "threads-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
