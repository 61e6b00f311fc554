"""`llama3 bench`'s output: the llama-bench markdown table (with the header above it and the ratios to each
comparison system below it) and the bar chart, from the JSON-ready result `llama3.eval.bench.run_bench` returns."""

from __future__ import annotations

import os
from typing import Any


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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
        f"{mach.get('threads', '?')} threads, OMP_WAIT_POLICY {mach.get('omp_wait_policy') or 'unset'}, "
        f"GOMP_SPINCOUNT {mach.get('gomp_spincount') or 'unset'}{held_to(mach)}; load average "
        + " -> ".join(" ".join(map(str, v)) for v in (h.get("load_average") or {}).values() if v),
        "",
        "| model | size | params | backend | threads | batch | test | t/s | ttft ms | aten ops / layer "
        "| peak RSS MiB |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        who = r["model"] if r["system"] == "llama3" else r["system"]
        lines.append(
            f"| {who} {r['system_weights']} | {_size(r['size_bytes']) if r['system'] == 'llama3' else '-'} | "
            f"{_params(r['params'])} | "
            f"{r['backend'] if r['system'] == 'llama3' else r['system']} | {r['threads']} | {r['batch']} | "
            f"{r['test']} | {r['tokens_per_second']:.2f} ± {r['tokens_per_second_std']:.2f} | "
            f"{_whole(r['time_to_first_token_ms'])} | {_whole(r['aten_ops_per_layer'])} | "
            f"{r['peak_host_rss_mib']:.0f} |"
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


def held_to(mach: dict) -> str:
    """ ", fbgemm held to AVX2, oneDNN to AVX2" where the run emulated a CPU without AVX-512; "" otherwise."""
    held = [(lib, mach.get(key)) for lib, key in (("fbgemm", "fbgemm_instructions"), ("oneDNN", "onednn_max_cpu_isa"))]
    return "".join(f", {lib} held to {isa}" for lib, isa in held if isa)
