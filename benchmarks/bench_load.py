"""Checkpoint loading: wall time and peak host memory, ours against transformers, same checkpoint, same run.

    python benchmarks/bench_load.py                          # 155M Llama-3-shaped config, ~0.3 GB of bf16
    python benchmarks/bench_load.py --preset llama-3.2-1b    # any ModelArgs preset (2.5 GB here)
    python benchmarks/bench_load.py --dir path/to/hf/checkpoint   # an existing HF safetensors directory

A random bf16 checkpoint in the HF layout (config.json + safetensors, sharded like save_pretrained above
--shard-gb) is written to a temporary directory. Each load then runs in a fresh Python process, and
its peak resident set size is VmHWM from /proc/self/status, reset after the imports through
/proc/self/clear_refs, so it belongs to the load alone. (Not getrusage's ru_maxrss: Linux carries it
over from the parent across fork and exec, so every child would report at least the parent's RSS.)
    ours          Transformer.from_pretrained(dir, device="cpu", dtype=torch.bfloat16)
    transformers  LlamaForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)
Imports are timed apart from the load, and the RSS reached after the imports is reported, so that
"peak - before load" is what loading itself costs; "peak / checkpoint" compares that with the file size.
Each child then runs one 8-token forward pass and returns its logits: the two implementations must
agree, so both read the same weights. The children take turns in a rotating order and the median of
--repeats runs is reported. Results: benchmarks/results/load.json and load.md (or
load-<preset>.json/.md for another preset).
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DEFAULT_PRESET = "llama-3-155m"
IMPLS = ("ours", "transformers")
PROBE_TOKENS = [128000, 9906, 1917, 11, 358, 1097, 264, 1296]  # any ids < vocab; 8 tokens


# --- the child: one load in a fresh process -----------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image since start or since `reset_peak_rss`."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux 4.0+)
    except OSError:
        return False
    return True


def child(impl: str, path: str) -> dict:
    t0 = time.perf_counter()
    import torch

    if impl.startswith("ours"):
        sys.path.insert(0, str(REPO))
        from llama3.model.transformer import Transformer

        def load():
            return Transformer.from_pretrained(path, device="cpu", dtype=torch.bfloat16, progress=False)

        def logits(model, tokens):
            return model(tokens)
    else:
        from transformers import LlamaForCausalLM

        def load():
            return LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

        def logits(model, tokens):
            return model(tokens).logits

    import_s = time.perf_counter() - t0
    dynamo_before = "torch._dynamo" in sys.modules
    rss_imports = rss_bytes()
    peak_reset = reset_peak_rss()
    t1 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t1
    peak_load, rss_loaded = peak_rss_bytes(), rss_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = logits(model, torch.tensor([PROBE_TOKENS]))
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_imports": rss_imports,
        "peak_rss_reset_after_imports": peak_reset,
        "peak_rss_load": peak_load,
        "rss_after_load": rss_loaded,
        "peak_rss_forward": peak_rss_bytes(),
        "rss_anon_after_forward": _status("RssAnon"),
        "rss_file_after_forward": _status("RssFile"),
        "n_params": n_params,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "dynamo_imported_by_load": not dynamo_before and "torch._dynamo" in sys.modules,
        "last_logits": out[0, -1].float().tolist(),
    }


def run_child(impl: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} load failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent: write a checkpoint, run the children, report ----------------------------------


def write_checkpoint(path: Path, preset: str, shard_bytes: int, seed: int = 0) -> None:
    """A random bf16 checkpoint in the layout transformers' save_pretrained writes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(REPO))
    from llama3.model.config import ModelArgs

    a = ModelArgs.from_name(preset)
    LlamaConfig(**a.to_hf_config(), dtype="bfloat16").save_pretrained(path)

    shapes = a.hf_shapes()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():  # assign tensors to shards up front: file names carry the count
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:  # one shard in memory at a time
            shape = shapes[name]
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def machine() -> dict:
    import safetensors
    import torch
    import transformers

    from llama3.eval.bench import cpu_model

    cpu = cpu_model()
    mem = next(
        (
            int(ln.split()[1]) * 1024
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "llama3_commit": _git_commit(),
        "loadavg_1min": os.getloadavg()[0],  # other work on the machine makes times noisy
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _git_commit() -> str:
    """HEAD, with "+dirty" when the library differs from it (the numbers describe the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "llama3"], cwd=REPO).returncode != 0
    except OSError:
        return "?"
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "?"


def summarize(runs: list[dict], ckpt: int) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)
    out = {key: med(key) for key in runs[0] if isinstance(runs[0][key], (int, float)) and key != "n_params"}
    out |= {
        "load_s_all": [round(r["load_s"], 3) for r in runs],
        # what loading (and touching every weight once) adds on top of the imports, per checkpoint byte
        "load_peak_over_checkpoint": (med("peak_rss_load") - med("rss_after_imports")) / ckpt,
        "forward_peak_over_checkpoint": (med("peak_rss_forward") - med("rss_after_imports")) / ckpt,
        "n_params": runs[0]["n_params"],
        "param_dtypes": runs[0]["param_dtypes"],
        "dynamo_imported_by_load": runs[0]["dynamo_imported_by_load"],
        "peak_rss_reset_after_imports": all(r["peak_rss_reset_after_imports"] for r in runs),
    }
    return out


def markdown(result: dict) -> str:
    m, c = result["machine"], result["checkpoint"]
    mb = lambda b: f"{b / 2**20:,.0f}"
    lines = [
        "# Checkpoint loading: time and peak host memory",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, "
        f"safetensors {m['safetensors']}; llama3 at {m['llama3_commit']}; {m['date']}; "
        f"1-minute load average {m['loadavg_1min']:.1f} when the results were written.",
        "",
        f"Checkpoint: `{c['preset']}` ({c['n_params']:,} parameters), random bf16 safetensors in "
        f"{c['files']} file(s), **{mb(c['bytes'])} MiB** on disk (in the page cache: just written).",
        "",
        f"Each load in a fresh process; median of {result['repeats']} runs; bf16 on CPU; memory in MiB. "
        "*imports*: RSS once torch and the library are imported. *peak load*: peak RSS (VmHWM) during "
        "`from_pretrained`. *peak forward*: peak RSS up to the end of one 8-token forward pass, when every "
        "weight has been touched (both libraries leave some weights as views of the memory-mapped file, "
        "which become resident only when read). *x ckpt*: (peak - imports) / checkpoint size. "
        "*anon / file*: private vs file-backed (page-cache) RSS after the forward.",
        "",
        "| implementation | load (s) | import (s) | imports | peak load | x ckpt | peak forward | x ckpt "
        "| anon / file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {r['load_s']:.2f} | {r['import_s']:.2f} | {mb(r['rss_after_imports'])} | "
            f"{mb(r['peak_rss_load'])} | {r['load_peak_over_checkpoint']:.2f} | {mb(r['peak_rss_forward'])} | "
            f"{r['forward_peak_over_checkpoint']:.2f} | "
            f"{mb(r['rss_anon_after_forward'])} / {mb(r['rss_file_after_forward'])} |"
        )
    lines += [
        "",
        "Load times of every run (s): "
        + "; ".join(f"{k} {v['load_s_all']}" for k, v in result["results"].items())
        + ".",
        f"Both models loaded {c['n_params']:,} parameters; their last-position logits on an 8-token probe "
        f"differ by at most {result['logits_max_abs_diff']:.4f}, the largest being {result['logits_max_abs']:.2f} "
        "(bf16; our RoPE runs in fp32, HF's in bf16).",
        *[
            f"`{k}`: the load itself imported torch._dynamo (a one-time cost per process: ops on the meta "
            "device go through torch._refs, whose first call imports it)."
            for k, v in result["results"].items()
            if v["dynamo_imported_by_load"]
        ],
        *[
            f"`{k}`: /proc/self/clear_refs was not writable, so its peaks include the imports' peak."
            for k, v in result["results"].items()
            if not v["peak_rss_reset_after_imports"]
        ],
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET, help="a ModelArgs preset (default %(default)s)")
    p.add_argument("--dir", type=Path, help="load this HF checkpoint directory instead of writing a random one")
    p.add_argument("--repeats", type=int, default=3, help="loads per implementation (default %(default)s)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size of the written checkpoint")
    p.add_argument("--only", choices=IMPLS, help="measure one implementation")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint (its path is printed)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "DIR"), help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        print(json.dumps(child(*opts.child)))
        return

    written = opts.dir is None
    if written:
        path, preset = Path(tempfile.mkdtemp(prefix="bench_load-")), opts.preset
        t = time.perf_counter()
        write_checkpoint(path, preset, int(opts.shard_gb * 2**30))
        print(f"wrote {path} ({checkpoint_bytes(path) / 2**20:,.0f} MiB) in {time.perf_counter() - t:.1f} s")
    else:
        path, preset = opts.dir, opts.dir.name
    size = checkpoint_bytes(path)
    impls = [opts.only] if opts.only else list(IMPLS)
    runs: dict[str, list[dict]] = {k: [] for k in impls}
    for i in range(opts.repeats):
        for impl in impls[i % len(impls) :] + impls[: i % len(impls)]:  # rotate the order
            r = run_child(impl, path)
            runs[impl].append(r)
            mib = {k: f"{r[k] / 2**20:,.0f} MiB" for k in ("rss_after_imports", "peak_rss_load", "peak_rss_forward")}
            print(
                f"{impl:24s} load {r['load_s']:.2f} s; RSS after imports {mib['rss_after_imports']}, "
                f"peak in load {mib['peak_rss_load']}, peak by forward {mib['peak_rss_forward']}"
            )
    results = {k: summarize(v, size) for k, v in runs.items()}
    n_params = next(iter(results.values()))["n_params"]
    if "ours" in runs and "transformers" in runs:
        a, b = runs["ours"][0]["last_logits"], runs["transformers"][0]["last_logits"]
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        scale = max(abs(y) for y in b)
        if results["ours"]["n_params"] != results["transformers"]["n_params"]:
            raise SystemExit(f"parameter counts differ: {results}")
    else:
        diff = scale = float("nan")
    result = {
        "benchmark": "load",
        "machine": machine(),
        "checkpoint": {
            "preset": preset,
            "n_params": n_params,
            "bytes": size,
            "files": len(list(path.glob("*.safetensors"))),
            "dtype": "bfloat16",
        },
        "repeats": opts.repeats,
        "results": results,
        "logits_max_abs_diff": diff,
        "logits_max_abs": scale,
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = "load" if preset == DEFAULT_PRESET and opts.dir is None else f"load-{preset}"
    (opts.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (opts.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    if written and opts.keep:
        print(f"kept {path}")
    elif written:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
