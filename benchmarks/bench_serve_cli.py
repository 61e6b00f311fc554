"""`llama3 serve` as a user starts it, on the CPU: one client's decode speed, against `llama3 generate`'s in the
same run and, with --baseline DIR, against another checkout's server.

    flock -x /tmp/bench.lock python benchmarks/bench_serve_cli.py [--baseline DIR] [--requests 5]

Each server is a fresh `python -m llama3 serve --port PORT` process with its defaults (the embedded
SmolLM2-135M-Instruct, the CLI's default weights); one client sends --requests completions one after another
(after one untimed), each a 128-token greedy answer to the same prompt through the OpenAI completions endpoint
(httpx, not streamed). A request's rate is its completion tokens over its wall time (the short prompt's prefill
included). `llama3 generate` decodes the same prompt in its own process (--json timings) for comparison.
--baseline DIR runs DIR's package the same way (PYTHONPATH=DIR, e.g. `git archive COMMIT llama3 | tar -x -C DIR`).
Results: benchmarks/results/serve-cli-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a long story about a dragon who learns to read. Chapter 1:"
TOKENS = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_rates(env: dict[str, str], cwd: str | None, requests: int) -> list[float]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llama3", "serve", "--port", str(port), "--quiet"]
    server = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        rates = []
        with httpx.Client(timeout=300) as client:
            for i in range(requests + 1):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/completions", json=body)
                wall = time.perf_counter() - t0
                r.raise_for_status()
                if i:  # the first is a warm-up
                    rates.append(r.json()["usage"]["completion_tokens"] / wall)
        return rates
    finally:
        server.terminate()
        server.wait(30)


def generate_rate(env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "llama3", "generate", PROMPT, "-n", str(TOKENS), "-t", "0", "--json", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["timings"]["tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--baseline", metavar="DIR", help="also time the server of the llama3 package in DIR")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    load = [float(Path("/proc/loadavg").read_text().split()[0])]
    rows = []
    systems = [("llama3 serve", env, None)]
    if args.baseline:
        base = str(Path(args.baseline).resolve())
        systems.append((f"llama3 serve, baseline ({args.baseline})", {**env, "PYTHONPATH": base}, base))
    for name, system_env, cwd in systems:
        rates = serve_rates(system_env, cwd, args.requests)
        rows.append({"system": name, "tokens_per_second": round(statistics.median(rates), 1), "runs": rates})
        load.append(float(Path("/proc/loadavg").read_text().split()[0]))
    generate = [generate_rate(env) for _ in range(3)]
    rows.append({"system": "llama3 generate", "tokens_per_second": round(statistics.median(generate), 1),
                 "runs": generate})  # fmt: skip
    load.append(float(Path("/proc/loadavg").read_text().split()[0]))

    from llama3.eval.bench import machine, machine_line

    info = machine()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "prompt": PROMPT,
        "tokens": TOKENS,
        "requests": args.requests,
        "loadavg_1m": load,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve-cli-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"`llama3 serve` with its defaults, one client, {TOKENS}-token greedy completions, median of "
        f"{args.requests} requests (`llama3 generate`: median of 3 processes); {machine_line(info)}; "
        f"{result['date']}; 1-minute load average {min(load):.2f}-{max(load):.2f}.",
        "",
        "| system | tokens/s |",
        "|---|---:|",
        *(f"| {r['system']} | {r['tokens_per_second']} |" for r in rows),
    ]
    (RESULTS / "serve-cli-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
