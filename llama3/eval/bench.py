"""`llama3 bench`: prompt processing and generation rates over a grid, as llama.cpp's `llama-bench` reports them.

Each model configuration (dtype, quantization, backend, compile) is loaded once; for every thread count,
batch size and test it runs one warm-up, then `repetitions` timed runs, and keeps the median and the standard
deviation of the rate (llama-bench prints the mean and the standard deviation; the median is less moved by
one run a busy machine slowed).

- `ppN` (prompt processing): a prefill of N tokens per row, `Llama.generate(prompts, 1)`; tokens/s =
  batch * N / (time to the first token). Its time to first token is the prefill's.
- `tgN` (text generation): N decode steps after a one-token prompt, `Llama.generate(prompts, N + 1)`;
  tokens/s = batch * N / (time after the first token), as llama-bench's tg (which starts from an empty
  context) counts generated tokens only.

The prompt tokens are the same fixed ids for every system (`bench_systems.prompt_ids`), greedy, no stop token: every run
generates exactly what it asks for. Peak host memory is the process's resident high-water mark (VmHWM, reset
before each test where Linux allows it), peak device memory CUDA's allocator peak. Comparison systems
(transformers, llama.cpp) are in `llama3.eval.bench_systems` and run in the same loop, taking turns with ours
run by run (a shared machine drifts within a minute).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama3.eval.bench_systems import make_systems, prompt_ids, sync
from llama3.generate.llama import Llama

# the ISA extensions that decide which kernels a CPU runs (PyTorch's, ggml's), in the order people list them
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass
class Grid:
    """What `llama3 bench` runs: every combination of these, each test `repetitions` times after a warm-up."""

    prompt_lens: list[int] = field(default_factory=lambda: [512])
    gen_lens: list[int] = field(default_factory=lambda: [128])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    threads: list[int | None] = field(default_factory=lambda: [None])  # None: PyTorch's default
    repetitions: int = 3

    def tests(self) -> list[tuple[str, int]]:
        return [(f"pp{n}", n) for n in self.prompt_lens if n] + [(f"tg{n}", n) for n in self.gen_lens if n]


@dataclass
class Config:
    """One way of loading the model: each is loaded once and timed over the whole grid."""

    dtype: str | None = None  # None: the library's default (float32 for GGUF, else bfloat16)
    quantize: str | None = None  # None, "int8", "int4"
    backend: str = "auto"
    compile: bool = False
    group_size: int = 32


def machine() -> dict[str, Any]:
    """CPU model and ISA extensions, core count, accelerator; what a reader needs to compare two tables."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "isa": [f for f in ISA_FLAGS if f in flags] or sorted(flags & {"neon", "asimd", "sve", "sve2"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def versions(systems: Sequence[str] = ()) -> dict[str, str]:
    from llama3 import __version__

    out = {"llama3": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name, module in (("transformers", "transformers"), ("llama.cpp", "llama_cpp")):
        if name in systems:
            try:
                out[name] = __import__(module).__version__
            except ImportError:
                pass
    return out


class PeakMemory:
    """Peak host RSS (Linux VmHWM, reset through /proc/self/clear_refs) and CUDA allocator peak over a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the high-water mark to the current RSS (Linux 4.0+)
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mib = host_peak_rss() / 2**20
        self.cuda_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None


def host_peak_rss() -> int:
    """Bytes: VmHWM on Linux, else getrusage's maximum (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def weights_bytes(model) -> int:
    """Every weight the model holds (parameters, quantized codes and scales; not the KV cache), a tied one once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Ours:
    """Our `Llama` as a benchmarked system: `run(test, n, batch)` -> (tokens/s, time to first token in s)."""

    name = "llama3"

    def __init__(self, llm: Llama):
        self.llm = llm

    def supports(self, kind: str, batch: int) -> bool:
        return True

    def close(self) -> None:
        pass

    def run(self, kind: str, n: int, batch: int) -> tuple[float, float]:
        vocab = self.llm.model.args.vocab_size
        sync(self.llm.device)
        if kind == "pp":
            self.llm.generate(prompt_ids(batch, n, vocab), 1, temperature=0, stop_tokens=[])
            ttft = self.llm.last_stats["time_to_first_token_s"]
            return batch * n / ttft, ttft
        self.llm.generate(prompt_ids(batch, 1, vocab), n + 1, temperature=0, stop_tokens=[])
        s = self.llm.last_stats
        return batch * n / max(s["seconds"] - s["time_to_first_token_s"], 1e-9), s["time_to_first_token_s"]


def load_ours(src: str | os.PathLike, config: Config, device: str | None, grid: Grid) -> tuple[Llama, float]:
    """The model once per configuration, its KV cache sized for the whole grid (no regrowth in a timed run)."""
    t0 = time.perf_counter()
    llm = Llama.from_pretrained(
        src,
        device=device,
        dtype=getattr(torch, config.dtype) if config.dtype else None,
        backend=config.backend,
        quantize=config.quantize,
        group_size=config.group_size,
        progress=False,
        compile=config.compile,
    )
    load_s = time.perf_counter() - t0
    longest = max([*grid.prompt_lens, 1]) + max([*grid.gen_lens, 1]) + 1
    if longest > llm.model.args.max_seq_len:
        raise ValueError(
            f"-p {max(grid.prompt_lens)} / -n {max(grid.gen_lens)}: the tests need {longest} tokens, the model's "
            f"context is {llm.model.args.max_seq_len}"
        )
    llm.max_seq_len, llm.max_batch_size = longest, max(grid.batch_sizes)
    return llm, load_s


def run_bench(
    src: str | os.PathLike,
    configs: Sequence[Config],
    grid: Grid,
    *,
    device: str | None = None,
    compare: Sequence[str] = (),
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole grid for every configuration, and for each comparison system that can run it. Returns the
    JSON-ready result: {"header", "grid", "rows", "skipped", "wall_seconds"}."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    name = Path(str(src)).name
    for config in configs:
        llm, load_s = load_ours(src, config, device, grid)
        m = llm.model
        weight_type = describe_weights(m, config)
        log(f"llama3 bench: {name} {weight_type}, loaded in {load_s:.2f} s")
        systems = [Ours(llm)]
        systems += make_systems(compare, src, llm, grid, skipped, log)
        model_info = {
            "model": name,
            "model_source": str(src),
            "weights": weight_type,
            "size_bytes": weights_bytes(m),
            "params": m.args.num_params(),
            "backend": m.ops.name + (", compiled" if config.compile else ""),
            "device": str(llm.device),
            "config": asdict(config),
            "load_seconds": load_s,
        }
        for threads in grid.threads:
            if threads is not None:
                torch.set_num_threads(threads)
            for batch in grid.batch_sizes:
                for test, n in grid.tests():
                    kind = test[:2]
                    runners = [s for s in systems if s.supports(kind, batch)] if len(systems) > 1 else systems
                    for s in runners:  # warm-up: caches, compiled graphs, the allocator
                        s.run(kind, n, batch)
                    samples: dict[str, list[tuple[float, float]]] = {s.name: [] for s in runners}
                    peaks: dict[str, PeakMemory] = {}
                    for _ in range(grid.repetitions):
                        for s in runners:  # interleaved: the systems take turns run by run
                            with PeakMemory(llm.device) as peak:
                                samples[s.name].append(s.run(kind, n, batch))
                            if s.name not in peaks or peak.rss_mib > peaks[s.name].rss_mib:
                                peaks[s.name] = peak
                    for s in runners:
                        rates = [r for r, _ in samples[s.name]]
                        row = {
                            **model_info,
                            "system": s.name,
                            "system_weights": getattr(s, "weights", weight_type),
                            "threads": threads or torch.get_num_threads(),
                            "batch": batch,
                            "test": test,
                            "n_tokens": n,
                            "tokens_per_second": statistics.median(rates),
                            "tokens_per_second_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                            "samples_tokens_per_second": rates,
                            "time_to_first_token_ms": statistics.median(t for _, t in samples[s.name]) * 1000,
                            "peak_host_rss_mib": peaks[s.name].rss_mib,
                            "peak_cuda_mib": peaks[s.name].cuda_mib,
                            "repetitions": grid.repetitions,
                        }
                        rows.append(row)
                        log(
                            f"llama3 bench: {s.name} {test} batch {batch} threads {row['threads']}: "
                            f"{row['tokens_per_second']:.2f} ± {row['tokens_per_second_std']:.2f} t/s"
                        )
        for s in systems:
            s.close()
        del llm, systems
    return {
        "header": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": versions(compare),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "grid": asdict(grid),
        "rows": rows,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - started,
    }


def describe_weights(model, config: Config) -> str:
    """ "int4 (group 32)", "int8", or the float dtype the projections are stored in."""
    w2 = model.layers[0].feed_forward.w2
    kind = type(getattr(w2, "base", w2)).__name__
    if kind == "Int4Linear":
        return f"int4 (group {config.group_size})"
    if kind == "Int8Linear":
        return "int8"
    return str(model.tok_embeddings.weight.dtype).removeprefix("torch.")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def markdown(result: dict[str, Any]) -> str:
    """llama-bench's table (model, size, params, backend, threads, test, t/s) with our extra columns, the
    header above it, the ratios to each comparison system below it."""
    h = result["header"]
    mach = h["machine"]
    isa = ", ".join(mach["isa"]) or "?"
    lines = [
        f"{mach['gpu'] or mach['cpu']} ({mach['cores']} cores; ISA {isa}; torch CPU kernels "
        f"{mach['torch_cpu_capability']}); "
        + ", ".join(f"{k} {v}" for k, v in h["versions"].items())
        + f"; {h['date']}",
        "",
        "| model | size | params | backend | threads | batch | test | t/s | ttft ms | peak RSS MiB |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        who = r["model"] if r["system"] == "llama3" else r["system"]
        lines.append(
            f"| {who} {r['system_weights']} | {_size(r['size_bytes']) if r['system'] == 'llama3' else '-'} | "
            f"{_params(r['params'])} | "
            f"{r['backend'] if r['system'] == 'llama3' else r['system']} | {r['threads']} | {r['batch']} | "
            f"{r['test']} | {r['tokens_per_second']:.2f} ± {r['tokens_per_second_std']:.2f} | "
            f"{r['time_to_first_token_ms']:.0f} | {r['peak_host_rss_mib']:.0f} |"
        )
    ratios = ratio_lines(result["rows"])
    if ratios:
        lines += ["", *ratios]
    if any(r["peak_cuda_mib"] is not None for r in result["rows"]):
        lines += ["", "Peak CUDA memory (MiB): " + ", ".join(
            f"{r['system']} {r['test']} b{r['batch']}: {r['peak_cuda_mib']:.0f}" for r in result["rows"]
            if r["peak_cuda_mib"] is not None)]  # fmt: skip
    loads = {(r["model"], r["weights"], r["backend"]): r["load_seconds"] for r in result["rows"]}
    lines += ["", "Load: " + "; ".join(f"{m} {w} ({b}) {s:.2f} s" for (m, w, b), s in loads.items())]
    lines += [f"Skipped: {s}" for s in result["skipped"]]
    lines += [
        f"Median ± standard deviation of {result['grid']['repetitions']} runs after a warm-up; ppN: a prefill of "
        "N tokens per row, tgN: N decode steps after a one-token prompt; ttft: time to the first token.",
    ]
    return "\n".join(lines)


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """ "llama3 / transformers: pp128 1.20x, tg32 0.95x" for each comparison system, per configuration."""
    ours = {_key(r): r for r in rows if r["system"] == "llama3"}
    by_system: dict[tuple, list[str]] = {}
    for r in rows:
        if r["system"] == "llama3" or _key(r) not in ours:
            continue
        ratio = ours[_key(r)]["tokens_per_second"] / max(r["tokens_per_second"], 1e-12)
        label = (r["system"], r["system_weights"], ours[_key(r)]["system_weights"])
        by_system.setdefault(label, []).append(f"{r['test']} b{r['batch']} t{r['threads']} {ratio:.2f}x")
    return [
        f"llama3 ({mine}) / {system} ({theirs}), tokens/s: " + ", ".join(parts)
        for (system, theirs, mine), parts in by_system.items()
    ]


def _key(r: dict[str, Any]) -> tuple:
    return (r["weights"], r["backend"], r["threads"], r["batch"], r["test"])


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """A bar chart of tokens/s (with the spread as error bars), one group per test, one bar per system and
    configuration. Needs matplotlib (the plot extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tests = list(dict.fromkeys(f"{r['test']} b{r['batch']} t{r['threads']}" for r in rows))
    series = list(dict.fromkeys(f"{r['system']} {r['system_weights']} ({r['backend']})" for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tests) * max(1, len(series)) / 2), 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values, errors = [], []
        for t in tests:
            match = [r for r in rows if f"{r['test']} b{r['batch']} t{r['threads']}" == t
                     and f"{r['system']} {r['system_weights']} ({r['backend']})" == name]  # fmt: skip
            values.append(match[0]["tokens_per_second"] if match else 0)
            errors.append(match[0]["tokens_per_second_std"] if match else 0)
        ax.bar([j + i * width for j in range(len(tests))], values, width, yerr=errors, label=name, capsize=3)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(tests))], tests)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{rows[0]['model'] if rows else ''}: {result['header']['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
