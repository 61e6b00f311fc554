"""Tensor-parallel decode speed: tokens/s at tp = 1, 2, 4, 8 (llama3.parallel.tp, torchrun), random weights.

    python benchmarks/bench_tp.py                       # CPU, gloo: a small Llama-shaped model, tp 1, 2, 4, each
                                                        # with the embedding / output vocab-parallel and replicated
    python benchmarks/bench_tp.py --device cuda         # GPUs, NCCL: Llama-3-8B and 70B shapes, bf16, CUDA graphs,
                                                        # every tp in 1, 2, 4, 8 the machine has GPUs for

Each tp runs as its own `torchrun --standalone --nproc-per-node tp` of this file (`--worker`): every rank builds
only its shard, straight on its device, with random weights; rank 0 reports. On the CPU each rank gets
cores / tp threads, so every row uses the whole machine. Results go to benchmarks/results/tp-<device>.json and .md.
Decode tokens/s counts the steps after the first token, median of the runs.
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
# a small Llama-3-shaped model for the CPU: the output projection is a fifth of the weights, as in Llama 3.2 1B
CPU_SHAPE = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32768, ffn_dim=1536, max_seq_len=1024)


def worker(opts: argparse.Namespace) -> None:
    """One rank under torchrun: its shard of a random model, greedy decode; rank 0 prints a JSON line per variant.

    With --compare the embedding / output projection are built both ways, vocabulary-parallel and replicated, and
    the two models take turns run by run in the same processes (the shared CPUs here drift between launches)."""
    import dataclasses

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llama3 import Llama, ModelArgs, Transformer
    from llama3.model.backends import get_ops
    from llama3.model.functional import rope_inv_freq
    from llama3.parallel.tp import TensorParallel, local_device, shutdown

    device = local_device(torch.device(opts.device))
    tp = TensorParallel.from_environment(device) or TensorParallel(0, 1)
    args = ModelArgs(**CPU_SHAPE) if opts.preset == "cpu-small" else ModelArgs.from_name(opts.preset)
    dtype = getattr(torch, opts.dtype)
    variants = {"vocab-parallel" if tp.world_size > 1 else "whole": tp}
    if opts.compare and tp.world_size > 1:
        variants["replicated"] = dataclasses.replace(tp, vocab_parallel=False)

    def build(shard: TensorParallel) -> Llama:
        shard.check(args)
        torch.set_default_dtype(dtype)
        with torch.device("meta"):  # only this rank's shard is ever allocated, straight on the device, in dtype
            model = Transformer(shard.local_args(args))
            model = shard.parallelize(model) if shard.world_size > 1 else model
        torch.set_default_dtype(torch.float32)
        model = model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.inv_freq = rope_inv_freq(args, device)
        model.set_ops(get_ops("auto", device))
        return Llama(model.eval(), _NullTokenizer(args.vocab_size), cuda_graphs=device.type == "cuda")

    rows = {}
    try:
        llms = {name: build(shard) for name, shard in variants.items()}
        prompt = [list(range(1, opts.prompt + 1))]
        for llm in llms.values():
            llm.generate(prompt, 4, temperature=0, stop_tokens=[])  # warm-up (and the graph's capture)
        stats = {name: ([], []) for name in llms}
        for _ in range(opts.runs):
            for name, llm in llms.items():  # the variants take turns
                llm.generate(prompt, opts.new_tokens, temperature=0, stop_tokens=[])
                stats[name][0].append(llm.last_stats["tokens_per_second"])
                stats[name][1].append(llm.last_stats["time_to_first_token_s"])
        for name, llm in llms.items():
            weights = sum(t.numel() * t.element_size() for t in [*llm.model.parameters(), *llm.model.buffers()])
            rows[name] = dict(
                tokens_per_second=statistics.median(stats[name][0]),
                time_to_first_token_ms=statistics.median(stats[name][1]) * 1000,
                weights_gb_per_rank=weights / 1e9,
            )
    except torch.OutOfMemoryError:
        rows = {name: dict(error="out of memory") for name in variants}
    if tp.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    shutdown()


class _NullTokenizer:
    """Generation on random weights needs no text: just the vocabulary size and no stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


def launch(opts: argparse.Namespace, preset: str, tp: int) -> list[dict]:
    """One torchrun of `tp` ranks; its rank 0's rows."""
    threads = max(1, (os.cpu_count() or 1) // tp) if opts.device == "cpu" else 1
    compare = opts.device == "cpu" or preset != "llama-3-70b"  # two 70B shards would not fit a GPU twice
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
               __file__, "--worker", "--device", opts.device, "--preset", preset, "--dtype", opts.dtype,
               "--prompt", str(opts.prompt), "--new-tokens", str(opts.new_tokens), "--runs", str(opts.runs),
               *(["--compare"] if compare else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=opts.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        error = (done.stderr.strip().splitlines() or ["?"])[-1]
        return [dict(preset=preset, tp=tp, embedding="vocab-parallel", threads=threads, error=error)]
    rows = [
        dict(preset=preset, tp=tp, embedding=name, threads=threads, **row)
        for name, row in json.loads(lines[-1][7:]).items()
    ]
    for row in rows:
        print(f"{preset} tp={tp} {row['embedding']}: {row.get('tokens_per_second', row.get('error'))}", file=sys.stderr)
    print(f"  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", help="comma-separated (default: cpu-small on the CPU, llama-3-8b,llama-3-70b on CUDA)")
    p.add_argument("--tp", help="comma-separated world sizes (default: 1,2,4 on the CPU; 1,2,4,8 up to the GPUs)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: float32 on the CPU, else bf16")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per row, median (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun (default: %(default)s)")
    p.add_argument("--out", help="results file stem (default: benchmarks/results/tp-<device>)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts)

    import torch

    cuda = opts.device == "cuda"
    opts.dtype = opts.dtype or ("bfloat16" if cuda else "float32")  # bf16 F.linear measured 25x slower here (AVX2)
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_tp: --device cuda, but no CUDA GPU is visible")
    presets = (opts.presets or ("llama-3-8b,llama-3-70b" if cuda else "cpu-small")).split(",")
    gpus = torch.cuda.device_count() if cuda else 0
    sizes = [int(n) for n in (opts.tp or ("1,2,4,8" if cuda else "1,2,4")).split(",")]
    sizes = [n for n in sizes if not cuda or n <= gpus]
    t0 = time.perf_counter()
    rows = [row for preset in presets for n in sizes for row in launch(opts, preset, n)]
    if cuda:
        hardware = f"{gpus}x {torch.cuda.get_device_name()}"
    else:
        from llama3.eval.bench import cpu_model

        hardware = f"{cpu_model()}, {os.cpu_count()} cores"
    result = dict(
        benchmark="tensor-parallel decode",
        device=opts.device,
        hardware=hardware,
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
        dtype=opts.dtype,
        prompt_tokens=opts.prompt,
        new_tokens=opts.new_tokens,
        runs=opts.runs,
        cpu_shape=CPU_SHAPE if not cuda else None,
        rows=rows,
        seconds=round(time.perf_counter() - t0),
    )
    stem = Path(opts.out) if opts.out else RESULTS / f"tp-{opts.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Tensor-parallel decode ({'NCCL' if cuda else 'gloo'}), {opts.dtype}, batch 1, prompt {opts.prompt} tokens, "
        f"{opts.new_tokens} new, greedy; median of {opts.runs} runs. {hardware}, torch {torch.__version__}, "
        f"{result['date']}.",
        "",
        "| model | tp | embedding, output | threads a rank | decode tok/s | first token (ms) | weights a rank (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['tp']} | {r['embedding']} | {r['threads']} | {r['error']} | - | - |")
            continue
        lines.append(
            f"| {r['preset']} | {r['tp']} | {r['embedding']} | {r['threads']} | {r['tokens_per_second']:.1f} | "
            f"{r['time_to_first_token_ms']:.0f} | {r['weights_gb_per_rank']:.3f} |"
        )
    if not cuda:
        lines += ["", f"cpu-small: {json.dumps(CPU_SHAPE)}."]
    lines += ["", f"The whole benchmark took {result['seconds']} s."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
