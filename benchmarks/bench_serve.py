"""The server under load: aggregate output tokens/s and time to first token at 1, 4 and 16 concurrent clients,
all against the same server (`llama3 serve`'s app, continuous batching), so the rows show the batching gain.

    python benchmarks/bench_serve.py --threads 1              # CPU: 155M Llama-3-shaped config, random weights
    python benchmarks/bench_serve.py --device cuda --preset llama-3-8b
    python benchmarks/bench_serve.py --clients 1,4,16 --prompt-len 32 --new-tokens 64 --requests-per-client 2

The server runs in its own process (`--serve-only`, this script), so that the clients (here, async httpx,
streaming) do not share its interpreter. Each client sends its requests one after another through the OpenAI
completions endpoint (token-id prompts, greedy, streamed); time to first token is from sending a request to its
first streamed token. Aggregate tokens/s is every completion token of a level over the level's wall time.
Results: benchmarks/results/serve-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"


def llama3_tokenizer():
    """Meta's tokenizer.model from the llama-models package (the README's setup installs it): the 128,256-token
    vocabulary of the Llama 3 shapes, so the server can turn tokens into text as it does for real models."""
    import importlib.util

    from llama3 import Tokenizer

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_serve: needs the llama-models package for the tokenizer (see the README's setup command)")
    return Tokenizer(Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model")


def serve(a: argparse.Namespace) -> None:
    """The server process: a random model of the preset, served until killed."""
    import logging

    import torch

    from llama3 import Llama, ModelArgs
    from llama3.eval.bench_random import random_model, random_quantized_model
    from llama3.serve.app import create_app, run

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    args = ModelArgs.from_name(a.preset)
    made = []

    def make() -> None:
        if a.quantize:  # bfloat16 activations, weights quantized as they are made
            made.append(random_quantized_model(args, device, a.quantize, 32, "auto"))
        else:
            made.append(random_model(args, device, getattr(torch, a.dtype), "auto"))

    # made in a thread of its own, as `llama3 serve` loads its model: no OpenMP team stays on the main thread to
    # slow the engine's (docs/serving.md, "Threads on the CPU")
    maker = threading.Thread(target=make)
    maker.start()
    maker.join()
    llm = Llama(made[0], llama3_tokenizer())
    app = create_app(
        llm, model_name=a.preset, max_batch_size=a.max_batch_size, max_queue=256, max_seq_len=a.max_seq_len
    )
    logging.basicConfig(level=logging.WARNING)
    run(app, "127.0.0.1", a.port, log_level="warning")


async def one_request(http, url: str, model: str, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


async def level(url: str, model: str, clients: int, requests: int, prompt_len: int, new_tokens: int) -> dict:
    import httpx

    rng = random.Random(clients)
    ttfts, tokens = [], []

    async def client(http) -> None:
        for _ in range(requests):
            prompt = [128000] + [rng.randrange(1000, 100000) for _ in range(prompt_len - 1)]
            t, n = await one_request(http, url, model, prompt, new_tokens)
            ttfts.append(t)
            tokens.append(n)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        http.headers["Content-Type"] = "application/json"
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {
        "clients": clients,
        "requests": len(tokens),
        "completion_tokens": sum(tokens),
        "seconds": round(wall, 3),
        "tokens_per_second": round(sum(tokens) / wall, 2),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    from llama3.eval.bench import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="llama-3-155m")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on CUDA; float32 on the CPU (without bf16 units a CPU emulates 16-row bf16 matmuls: "
        "slower than float32's)",
    )
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only int8/int4 (bf16 activations)")
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's, one per core)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default: %(default)s)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--out", help="results file stem (default: benchmarks/results/serve-<device>)")
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.serve_only:
        return serve(a)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, __file__, "--serve-only", "--port", str(port), "--device", a.device, "--preset",
            a.preset, "--dtype", a.dtype, "--max-batch-size", str(a.max_batch_size), "--max-seq-len",
            str(a.max_seq_len), *(["--quantize", a.quantize] if a.quantize else []),
            *(["--threads", str(a.threads)] if a.threads else [])]  # fmt: skip
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.Popen(args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                sys.exit("bench_serve: the server process exited")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit("bench_serve: the server did not start in 300 s")
            time.sleep(0.2)
        asyncio.run(level(url, a.preset, 1, 1, a.prompt_len, 8))  # warm-up: first-call costs out of the numbers
        rows = []
        for c in [int(x) for x in a.clients.split(",")]:
            row = asyncio.run(level(url, a.preset, c, a.requests_per_client, a.prompt_len, a.new_tokens))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["gain_vs_first"] = round(row["tokens_per_second"] / base, 2)
    import torch

    meta = {
        "preset": a.preset,
        "device": a.device,
        "dtype": a.quantize or a.dtype,
        "machine": machine(a.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "requests_per_client": a.requests_per_client,
        "max_batch_size": a.max_batch_size,
        "threads": a.threads or "default",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # at the start, at the end
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    stem = Path(a.out) if a.out else RESULTS / f"serve-{a.device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Serving {a.preset} ({meta['dtype']}, random weights), {a.prompt_len}-token prompts, {a.new_tokens} greedy "
        f"tokens streamed, {a.requests_per_client} requests per client, one server with {a.max_batch_size} rows, "
        f"{a.threads or 'default'} torch threads. "
        f"{meta['machine']}, torch {meta['torch']}, {meta['date']}; 1-minute load average {load_before:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end (the machine's other jobs share its cores).",
        "",
        "| clients | requests | output tok/s | gain vs 1 client | TTFT p50 (ms) | TTFT p95 (ms) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['clients']} | {r['requests']} | {r['tokens_per_second']} | {r['gain_vs_first']}x | "
            f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']} |"
            for r in rows
        ],
        "",
        f"The whole benchmark took {meta['total_seconds']} s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
