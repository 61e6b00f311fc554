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

import contextlib
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
from llama3.quant.isa import cpu_model

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
    kernel: str | None = None  # a CPU kernel plan forced (`llama3.quant.choice.KERNELS`); None: measured


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo "flags", "Features" on ARM); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, Any]:
    """CPU model and ISA extensions, core count, accelerator; what a reader needs to compare two tables. The
    threads and OpenMP's waiting too (OMP_WAIT_POLICY, GOMP_SPINCOUNT: the `llama3` command sets them,
    `llama3.cli.common.set_thread_defaults`; a plain Python program leaves GNU OpenMP's own), and the instruction
    sets fbgemm and oneDNN were held to (FBGEMM_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA: an AVX2 CPU emulated)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": [f for f in ISA_FLAGS if f in flags] or sorted(flags & {"neon", "asimd", "sve", "sve2"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "fbgemm_instructions": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for a results table: "Intel(R) Xeon(R) Processor, 2 threads (ISA avx2, avx512f, ...)", or the GPU."""
    m = info or machine()
    if m["gpu"]:
        return m["gpu"]
    return f"{m['cpu']}, {m['threads']} threads (ISA {', '.join(m['isa']) or '?'})"


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): other work on a shared machine slows
    every timing, so each result records it before and after."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def versions(systems: Sequence[str] = ()) -> dict[str, str]:
    from llama3 import __version__

    out = {"llama3": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name, module in (("transformers", "transformers"), ("llama.cpp", "llama_cpp")):
        if name in systems:
            try:
                out[name] = __import__(module).__version__
            except ImportError:
                pass
    if "llama.cpp" in out:  # what its build uses: "AVX2 = 1 | AVX512 = 1 | ..." (a native build, or one made for AVX2)
        flags = __import__("llama_cpp").llama_print_system_info().decode(errors="replace")
        used = [f.split("=")[0].strip() for f in flags.split("|") if f.strip().endswith("= 1")]
        out["llama.cpp"] += f" ({' '.join(u for u in used if u.startswith(('AVX', 'AMX', 'NEON', 'SVE', 'FMA')))})"
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
    """Every weight the model holds (parameters, quantized codes and scales; not the KV cache), a tied one once.
    fbgemm's packed layers (`DynInt8Linear`) hold theirs outside the state dict: int8 codes and a float32 scale
    per row, counted from their shape."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    from llama3.quant.dynamic import DynInt8Linear

    packed = sum(m.out_features * (m.in_features + 4) for m in model.modules() if isinstance(m, DynInt8Linear))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed


@contextlib.contextmanager
def _stderr_to_devnull():
    """The process's stderr (file descriptor 2) to /dev/null: torch.profiler's tracer (Kineto) writes a "USDT: ...
    profiler_start" and a "profiler_stop" line there at every profile, and no setting turns them off."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@torch.inference_mode()
def aten_ops_per_layer(model) -> float:
    """Top-level aten ops (called by no other aten op) inside the blocks of one batch-1 decode step after a
    32-token prompt, per layer, as torch.profiler records them: what a decode step dispatches besides its matmuls.
    The second step is counted, as every later one (the first also gathers each block's cache views, `CpuOps`).
    Sets up the `Transformer`'s own cache (a `Llama` over it sizes it again on its next `generate`)."""
    from torch.profiler import profile, record_function

    device = model.tok_embeddings.weight.device
    model.setup_cache(1, 64)
    model(torch.arange(100, 132, device=device)[None], torch.arange(32, device=device), kv_len=32)
    model(torch.tensor([[104]], device=device), torch.tensor([[32]], device=device), kv_len=33)

    def block(layer, *args):
        with record_function("block"):
            return model.ops.run_block(layer, *args)

    with _stderr_to_devnull(), profile() as prof:
        model(torch.tensor([[105]], device=device), torch.tensor([[33]], device=device), kv_len=34, run_block=block)

    def in_block(e) -> bool:
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name.startswith("aten::"):
                return False
            if e.name == "block":
                return True
        return False

    return sum(e.name.startswith("aten::") and in_block(e) for e in prof.events()) / model.args.n_layers


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
    if str(src).startswith("random:"):  # a preset's shape with random weights, made on the device
        from llama3.eval.bench_random import random_llama

        llm = random_llama(str(src).removeprefix("random:"), device, config)
    else:
        llm = Llama.from_pretrained(
            src,
            device=device,
            dtype=getattr(torch, config.dtype) if config.dtype else None,
            backend=config.backend,
            quantize=config.quantize,
            group_size=config.group_size,
            progress=False,
            compile=config.compile,
            kernel=config.kernel,
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
    started, load_before = time.perf_counter(), load_average()
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
            "aten_ops_per_layer": aten_ops_per_layer(m),
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
                            "time_to_first_token_ms": _median_ms([t for _, t in samples[s.name] if t is not None]),
                            "peak_host_rss_mib": peaks[s.name].rss_mib,
                            "peak_cuda_mib": peaks[s.name].cuda_mib,
                            "repetitions": grid.repetitions,
                            "load_average_1min": (load_average() or [None])[0],  # when this test ended
                        }
                        if s.name != Ours.name:  # the profile is of our decode step
                            row["aten_ops_per_layer"] = None
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
            "load_average_1min": (load_average() or [None])[0],
            "load_average": {"before": load_before, "after": load_average()},
        },
        "grid": asdict(grid),
        "rows": rows,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - started,
    }


def _median_ms(seconds: list[float]) -> float | None:
    return statistics.median(seconds) * 1000 if seconds else None  # None: a system with no first token (floor)


def describe_weights(model, config: Config) -> str:
    """ "int4 (group 32)", "int8", "int8 (fbgemm)" or the float dtype the projections are stored in, with the CPU
    kernel plan where `quantize="auto"` chose one ("int4 (group 32), kernel int4-fbgemm")."""
    w2 = model.layers[0].feed_forward.w2
    w2 = getattr(w2, "base", w2)
    kind = type(w2).__name__
    if kind == "Int4Linear":
        text = f"int4 (group {getattr(w2, 'group_size', None) or config.group_size})"
    elif kind == "Int8Linear":
        text = "int8"
    elif kind == "DynInt8Linear":
        text = "int8 (fbgemm)"
    elif kind == "DotLinear":
        text = f"{w2.mode} (dot)"
    else:
        text = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    choice = getattr(model, "kernel_choice", None)
    return text + (f", kernel {choice.plan}" if choice is not None else "")
