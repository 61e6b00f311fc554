"""Decode speed and time to first token: our engine against transformers' `generate`, same run, same shapes.

    python benchmarks/bench_generate.py                      # CPU: 155M Llama-3-shaped config, bf16 + fp32
    python benchmarks/bench_generate.py --device cuda         # GPU: Llama-3-8B shape, bf16, batch 1 and 8,
                                                              # 2048-token prefill, peak memory
    python benchmarks/bench_generate.py --model path.gguf     # a real checkpoint (e.g. the embedded SmolLM2)
    python benchmarks/bench_generate.py --dtypes int4 --compile   # + the compiled CPU decode step beside eager
    python benchmarks/bench_generate.py --llama-cpp           # CPU: the embedded SmolLM2 loaded the library's and
                                                              # the CLI's default ways against llama.cpp, decode and
                                                              # time to first token (benchmarks/cpu_defaults.py)
    python benchmarks/bench_generate.py --model path.gguf --dtypes float32,int4 --compile --llama-cpp
                                                              # + llama.cpp on the same file (see below)
    python benchmarks/bench_generate.py --device cuda --gpt-fast third_party/gpt-fast   # + gpt-fast, batch 1
    python benchmarks/bench_generate.py --device cuda --dtypes bfloat16,int8,int4 --group-size 128
                                                              # weight-only int8 / int4: on CUDA the Triton
                                                              # backend runs llama3.kernels.quant_gemv
    python benchmarks/bench_generate.py --device cuda --preset llama-3-70b --dtypes int4 --batches 1
                                                              # 70B in int4 on one GPU (made layer by layer)

gpt-fast (github.com/pytorch-labs/gpt-fast) is never part of this repository: put a checkout of its
model.py and generate.py (and quantize.py, for its int8 / int4 rows) in an ignored folder (third_party/ is
ignored) and pass the folder. Its int8 / int4 rows quantize its own random model with its own handlers
(`WeightOnlyInt8QuantHandler`, `WeightOnlyInt4QuantHandler`: tinygemm), which quantize the output projection
too (int4 at 4 bits; ours keeps it at int8).

llama.cpp (`--llama-cpp`, with `--model X.gguf` on CPU) decodes the same GGUF file through llama-cpp-python,
which is never a dependency of this repository. Build it from source in the benchmark's environment, so that
ggml is compiled for this CPU's instruction set (several minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36

It runs in each dtype's group of turn-taking systems at batch 1, so it appears once per dtype.

Random weights are made on the device (no download). Results go to benchmarks/results/generate-<device>.json
and .md. Decode tokens/s counts the steps after the first token: (new_tokens - 1) / (total - time to first).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3 import Llama, ModelArgs, Transformer  # noqa: E402
from llama3.model.backends import get_ops  # noqa: E402
from llama3.model.functional import rope_inv_freq  # noqa: E402
from llama3.quant.weight_only import is_quantized_layer, mode_for, quantize, quantized_linear  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_CPP = "llama.cpp (llama-cpp-python)"


class NullTokenizer:
    """Generation on random weights needs no text: just the vocabulary size and no stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{cpu}, {torch.get_num_threads()} threads"


def cpu_flags() -> set[str]:
    return next((set(ln.split(":", 1)[1].split()) for ln in open("/proc/cpuinfo") if ln.startswith("flags")), set())


def amx() -> bool:
    return "amx_int8" in cpu_flags()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, backend: str) -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: an 8B model in fp32 would not fit twice
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.set_ops(get_ops(backend, device))
    return model.eval()


@torch.no_grad()
def random_quantized_model(
    args: ModelArgs, device: torch.device, mode: str, group_size: int, backend: str
) -> Transformer:
    """A random bf16-activation model whose projections are quantized as each is made, on the device: the float
    model never exists whole (a 70B model's bf16 weights alone would fill a GPU that holds its int4 copy
    several times over). The weights are drawn as `random_model` draws them; int4 keeps the output at int8."""
    with torch.device("meta"):
        model = Transformer(args)
    for name in [n for n, _ in model.named_modules() if is_quantized_layer(n)]:
        layer = model.get_submodule(name)
        w = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
        q = quantize(w, mode_for(name, mode), group_size, name)
        del w
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, quantized_linear(q, torch.bfloat16, device))
    for name, p in list(model.named_parameters()):  # what is left: the embedding and the norms
        value = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        value.normal_(0, 0.02) if p.dim() > 1 else value.fill_(1.0)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, torch.nn.Parameter(value, requires_grad=False))
    model.inv_freq = rope_inv_freq(args, device)
    model.set_ops(get_ops(backend, device))
    return model.eval()


def hf_model_like(model: Transformer):
    """transformers' LlamaForCausalLM with the same shapes and weights as `model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(**a.to_hf_config())
    w = model.tok_embeddings.weight
    default = torch.get_default_dtype()
    torch.set_default_dtype(w.dtype)  # allocate in the target dtype: an fp32 8B copy would not fit beside ours
    try:
        with torch.device("meta"):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    hf = hf.to_empty(device=w.device)
    hf.model.rotary_emb.inv_freq = model.inv_freq.clone()  # to_empty left the buffers uninitialised
    hf.model.rotary_emb.original_inv_freq = model.inv_freq.clone()
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(w)
        hf.model.norm.weight.copy_(model.norm.weight)
        if not a.tie_embeddings:
            hf.lm_head.weight.copy_(model.output.weight)
        D = a.head_dim
        for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
            q, k, v = ours.attention.wqkv.weight.split([a.n_heads * D, a.n_kv_heads * D, a.n_kv_heads * D])
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(ours.attention.wo.weight)
            gate, up = ours.feed_forward.w13.weight.chunk(2)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(ours.feed_forward.w2.weight)
            theirs.input_layernorm.weight.copy_(ours.attention_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.ffn_norm.weight)
    return hf.eval()


def prompts_for(batch: int, prompt_len: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 1000 + 100 for j in range(prompt_len)] for i in range(batch)]


class Ours:
    """One timed generate call of our engine: decode tokens/s after the first token, and time to first token."""

    def __init__(self, llm: Llama, batch: int, prompt_len: int, new_tokens: int):
        self.llm, self.prompts, self.new_tokens = llm, prompts_for(batch, prompt_len), new_tokens
        llm.generate(self.prompts, min(new_tokens, 8), temperature=0, stop_tokens=[])  # warm-up: cache, graphs

    def __call__(self) -> dict:
        sync(self.llm.device)
        # stop_tokens=[]: a real model's EOS must not end a run early; every system decodes new_tokens
        self.tokens = self.llm.generate(self.prompts, self.new_tokens, temperature=0, stop_tokens=[])
        s = self.llm.last_stats
        return {"tok_s": s["tokens_per_second"], "ttft_ms": s["time_to_first_token_s"] * 1000}


class Transformers:
    """The same measurement for transformers' generate: total time minus a one-token generate."""

    def __init__(self, hf, batch: int, prompt_len: int, new_tokens: int, static: bool):
        self.hf, self.new_tokens = hf, new_tokens
        self.x = torch.tensor(prompts_for(batch, prompt_len), device=hf.device)
        self.kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        if static:
            self.kw["cache_implementation"] = "static"
        self.run(min(new_tokens, 8))
        self.run(min(new_tokens, 8))  # a second warm-up: compiled generate recompiles once for decode shapes

    def run(self, n: int) -> float:
        sync(self.hf.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.hf.generate(self.x, max_new_tokens=n, min_new_tokens=n, **self.kw)
        sync(self.hf.device)
        assert out.shape[1] == self.x.shape[1] + n
        return time.perf_counter() - t

    def __call__(self) -> dict:
        ttft = self.run(1)
        total = self.run(self.new_tokens)
        return {"tok_s": (self.new_tokens - 1) / max(total - ttft, 1e-9), "ttft_ms": ttft * 1000}


class GptFast:
    """gpt-fast's own model and `generate` loop, its decode step compiled with mode="reduce-overhead" and
    fullgraph as its generate.py does with --compile; the same shapes with random weights of its own."""

    # the inductor settings its generate.py sets at import; they apply to its compilation only
    INDUCTOR = ("coordinate_descent_tuning", "triton.unique_kernel_names", "fx_graph_cache")

    def __init__(self, model, generate_module, inductor: dict, batch: int, prompt_len: int, new_tokens: int):
        self.model, self.gen, self.batch, self.new_tokens = model, generate_module, batch, new_tokens
        self.prompt = torch.tensor(prompts_for(1, prompt_len)[0], device=model.tok_embeddings.weight.device)
        with torch._inductor.config.patch(inductor):
            self.run(new_tokens)  # compile; the cache reaches its final size first, so no recompile later
            self.run(2)
            self.run(new_tokens)

    @staticmethod
    def load(
        path: str,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        quantize: str | None = None,
        group_size: int = 128,
    ):
        sys.path.insert(0, str(Path(path).resolve()))
        tokenizer_stub = types.ModuleType("tokenizer")  # its tokenizer module needs sentencepiece; unused here
        tokenizer_stub.get_tokenizer = None
        sys.modules.setdefault("tokenizer", tokenizer_stub)
        import torch._inductor.config as inductor

        ours = {key: inductor.get_config_copy()[key] for key in GptFast.INDUCTOR}
        import generate as gen  # noqa: PLC0415  (gpt-fast's, from `path`)
        import model as gf  # noqa: PLC0415

        theirs = {key: inductor.get_config_copy()[key] for key in GptFast.INDUCTOR}
        for key, value in ours.items():  # transformers' compilation keeps the defaults
            *section, name = key.split(".")
            setattr(getattr(inductor, section[0]) if section else inductor, name, value)

        config = gf.ModelArgs(
            block_size=args.max_seq_len,
            vocab_size=args.vocab_size,
            n_layer=args.n_layers,
            n_head=args.n_heads,
            dim=args.dim,
            intermediate_size=args.ffn_dim,
            n_local_heads=args.n_kv_heads,
            rope_base=args.rope_theta,
            norm_eps=args.norm_eps,
        )
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = gf.Transformer(config)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        if quantize:  # as its quantize.py does, on the random bf16 weights: codes first, then the modules
            import quantize as gq  # noqa: PLC0415  (gpt-fast's, from `path`)

            if quantize == "int8":
                handler = gq.WeightOnlyInt8QuantHandler(model)
            else:
                handler = gq.WeightOnlyInt4QuantHandler(model, group_size)
            state = handler.create_quantized_state_dict()
            model = handler.convert_for_runtime()
            model.load_state_dict(state, assign=True)
            del state
        # compiled from the eager function each time: a second load must not compile the compiled one
        eager = gen.__dict__.setdefault("_eager_decode_one_token", gen.decode_one_token)
        gen.decode_one_token = torch.compile(eager, mode="reduce-overhead", fullgraph=True)
        return model.eval(), gen, theirs

    def run(self, n: int) -> float:
        sync(self.prompt.device)
        t = time.perf_counter()
        seq, _ = self.gen.generate(
            self.model, self.prompt, n, batch_size=self.batch, interactive=False, draft_model=None, temperature=0.0
        )
        sync(self.prompt.device)
        assert seq.shape == (self.batch, self.prompt.numel() + n)
        return time.perf_counter() - t

    def __call__(self) -> dict:
        # its loop cannot stop after the prefill's token: time 2 and N tokens, the difference is N - 2 steps
        two = self.run(2)
        total = self.run(self.new_tokens)
        step = (total - two) / (self.new_tokens - 2)
        return {"tok_s": 1 / max(step, 1e-9), "ttft_ms": (two - step) * 1000}


class LlamaCpp:
    """llama.cpp on the same GGUF file through llama-cpp-python: greedy, exactly `new_tokens` (its `generate` is
    an endless token generator with no EOS check of its own), measured as `Ours` is, inside one call."""

    def __init__(self, gguf: str, prompt_len: int, new_tokens: int, n_threads: int, n_ctx: int | None = None):
        import llama_cpp  # noqa: PLC0415  (optional: checked in main)
        from llama_cpp import llama_cpp as bindings  # noqa: PLC0415  (the ctypes functions `Llama` calls)

        self.extra_buffers = not amx()
        if not self.extra_buffers:
            # ggml's AMX weight buffers (an "extra buffer type") run tile instructions before configuring the
            # tiles here and die with an invalid opcode (llama-cpp-python 0.3.36 on a Xeon with AMX, in a VM);
            # without extra buffers it runs its AVX-512 kernels. llama-cpp-python offers no argument for it.
            defaults = bindings.llama_model_default_params

            def no_extra_buffers():
                params = defaults()
                params.use_extra_bufts = False
                return params

            bindings.llama_model_default_params = no_extra_buffers
        try:
            self.llm = llama_cpp.Llama(
                gguf,
                n_ctx=n_ctx or prompt_len + new_tokens,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=0,
                verbose=False,
            )
        finally:
            if not self.extra_buffers:
                bindings.llama_model_default_params = defaults
        self.prompt, self.new_tokens = prompts_for(1, prompt_len)[0], new_tokens
        if max(self.prompt) >= self.llm.n_vocab():
            raise SystemExit(f"prompt ids up to {max(self.prompt)} are outside {gguf}'s {self.llm.n_vocab()} tokens")
        self.dtype = self.llm._model.desc().split()[-1]  # "llama 135M Q4_1": the file's weight type
        self.run(min(new_tokens, 8))  # warm-up

    def run(self, n: int) -> tuple[float, float]:
        """Seconds to the first token and in all for `n` greedy tokens from an empty cache."""
        t = time.perf_counter()
        self.llm.reset()  # else `generate` reuses the previous run's cache for the same prompt: no prefill
        self.tokens, first = [], 0.0
        for token in self.llm.generate(self.prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=False):
            self.tokens.append(token)
            if len(self.tokens) == 1:
                first = time.perf_counter() - t
            if len(self.tokens) == n:  # stop before it evaluates the last token: as ours, n - 1 decode steps
                break
        return first, time.perf_counter() - t

    def __call__(self) -> dict:
        ttft, total = self.run(self.new_tokens)
        return {"tok_s": (self.new_tokens - 1) / max(total - ttft, 1e-9), "ttft_ms": ttft * 1000}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two systems produce alike before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def interleaved(runners: dict, repeats: int) -> dict[str, dict]:
    """Alternates the systems run by run (machines drift; a shared VM drifts a lot) and keeps medians."""
    samples: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            samples[name].append(run())
    return {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}


def time_prefill(llm: Llama, prompt_len: int, repeats: int) -> dict:
    tokens = [[(13 * j) % 1000 + 100 for j in range(prompt_len)]]
    llm.generate(tokens, 1, temperature=0)
    times = []
    for _ in range(repeats):
        llm.generate(tokens, 1, temperature=0)
        times.append(llm.last_stats["time_to_first_token_s"])
    return {"prefill_tokens": prompt_len, "prefill_tok_s": prompt_len / min(times), "ttft_ms": min(times) * 1000}


class Floor:
    """A lower bound on a batch-1 decode step: every projection weight once through `linear`, nothing else
    (on a GPU inside one CUDA graph, so launches cost what they cost in our decode graph)."""

    def __init__(self, model: Transformer, linear):
        """`linear(x, layer)`: F.linear over the layer's weight, or the backend's `ops.linear`."""
        projections = [p for b in model.layers for p in (b.attention.wqkv, b.attention.wo)]
        projections += [p for b in model.layers for p in (b.feed_forward.w13, b.feed_forward.w2)]
        projections.append(model.output)
        self.device = model.tok_embeddings.weight.device
        dtype = model.tok_embeddings.weight.dtype
        sizes = {p.in_features for p in projections}
        x = {k: torch.randn(1, 1, k, dtype=dtype, device=self.device) for k in sizes}

        def step():
            with torch.inference_mode():
                for p in projections:
                    linear(x[p.in_features], p)

        step()  # the backend's one-time choices (GEMV or cuBLAS per shape) happen here
        self.step = step
        if self.device.type == "cuda":
            self.step = _graphed(step)

    def __call__(self) -> dict:
        return {"tok_s": 1000 / _median_ms(self.step, self.device, 5), "ttft_ms": float("nan")}


def weights_bytes(model: Transformer) -> int:
    """Bytes of every weight the model holds: parameters and the quantized layers' codes and scales (buffers
    that are saved; the KV cache is not), a tied tensor once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth in TB/s, as a 1 GiB copy measures it (bytes read + written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() / ms / 1e9


def _graphed(step):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _median_ms(step, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", help="ModelArgs preset (default: llama-3-155m on CPU, llama-3-8b on CUDA)")
    p.add_argument("--model", help="a real checkpoint instead of random weights (dir, .gguf or repo id)")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: bfloat16, float32, float16, int8, int4 (weight-only, bf16 activations); "
        "default: bfloat16,float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1 on CPU, 1,8 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 on CPU, 128 on CUDA")
    p.add_argument(
        "--prefill-len", type=int, default=None, help="long-prompt prefill (default: 2048 on CUDA, off on CPU)"
    )
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per system; medians reported")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument(
        "--hf-eager", action="store_true", help="on CUDA also time transformers' eager dynamic-cache generate"
    )
    p.add_argument(
        "--compile", action="store_true", help="CPU: also time Llama(compile=True) (its compile time is reported)"
    )
    p.add_argument("--gpt-fast", default=None, help="folder with gpt-fast's model.py and generate.py (batch 1)")
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="CPU, with --model X.gguf: also time llama.cpp (llama-cpp-python) on the same file, batch 1; "
        "without --model: the embedded SmolLM2 loaded the default ways against llama.cpp (cpu_defaults.py)",
    )
    p.add_argument("--out", default=None, help="results file stem (default: benchmarks/results/generate-<device>)")
    a = p.parse_args()
    if a.llama_cpp and not a.model and a.device == "cpu":  # the defaults against llama.cpp: cpu_defaults.py
        import cpu_defaults  # noqa: PLC0415

        cpu_defaults.main(a.new_tokens or 64, a.repeats, a.out)
        return

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtypes = (a.dtypes or ("bfloat16" if cuda else "bfloat16,float32")).split(",")
    batches = [int(b) for b in (a.batches or ("1,8" if cuda else "1")).split(",")]
    prompt_len = a.prompt_len or (128 if cuda else 32)
    new_tokens = a.new_tokens or (128 if cuda else 64)
    prefill_len = a.prefill_len if a.prefill_len is not None else (2048 if cuda else 0)
    preset = a.preset or ("llama-3-8b" if cuda else "llama-3-155m")
    rows: list[dict] = []
    extra: dict = {}
    cpp = None
    if a.llama_cpp:
        if cuda or not (a.model or "").endswith(".gguf"):
            p.error("--llama-cpp needs --model X.gguf on the CPU: llama.cpp decodes the same file")
        try:
            import llama_cpp  # noqa: PLC0415
        except ImportError:
            sys.exit(
                "--llama-cpp needs llama-cpp-python, built from source for this CPU:\n"
                '    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36'
            )
        cpp = LlamaCpp(a.model, prompt_len, new_tokens, torch.get_num_threads())
        extra["llama_cpp"] = {"version": llama_cpp.__version__, "weights": cpp.dtype, "agreeing_tokens": {}}

    # One cache for every run, sized up front: growing it mid-benchmark would recapture graphs in a timed run
    cache = dict(max_batch_size=max(batches), max_seq_len=max(prompt_len + new_tokens, prefill_len + 1))
    started = time.perf_counter()
    for dtype_name in dtypes:
        quantize = dtype_name if dtype_name in ("int8", "int4") else None
        dtype = torch.bfloat16 if quantize else getattr(torch, dtype_name)
        torch.manual_seed(0)
        if a.model:
            llm = Llama.from_pretrained(
                a.model, device, dtype, a.backend, quantize=quantize, group_size=a.group_size, **cache
            )
        else:
            args = ModelArgs.from_name(preset)
            if quantize:
                model = random_quantized_model(args, device, quantize, a.group_size, a.backend)
            else:
                model = random_model(args, device, dtype, a.backend)
            llm = Llama(model, NullTokenizer(model.args.vocab_size), **cache)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ours_name = f"llama3 ({llm.model.ops.name})"
        ours = {batch: Ours(llm, batch, prompt_len, new_tokens) for batch in batches}  # warm-ups
        stats = extra.setdefault("by_dtype", {}).setdefault(dtype_name, {})
        compiled = {}
        if a.compile:  # the same model and cache; the warm-up (first generate) is where it compiles
            t = time.perf_counter()
            compiled_llm = Llama(llm.model, llm.tokenizer, compile=True, **cache)
            compiled = {batch: Ours(compiled_llm, batch, prompt_len, new_tokens) for batch in batches}
            stats["compile_and_warm_up_s"] = time.perf_counter() - t
            print(f"{dtype_name}: compiled decode warmed up in {stats['compile_and_warm_up_s']:.1f} s", flush=True)
        if prefill_len:
            stats["prefill"] = time_prefill(llm, prefill_len, a.repeats)
            print(stats["prefill"], flush=True)
        if cuda:  # before the baseline model exists: this is our own peak
            stats["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            stats["weights_gb"] = weights_bytes(llm.model) / 1e9
            kv = llm.model.layers[0].attention.cache
            stats["kv_cache_gb"] = 2 * kv.k.numel() * kv.k.element_size() * len(llm.model.layers) / 1e9
        if cuda and "copy_bandwidth_tb_s" not in extra:
            extra["copy_bandwidth_tb_s"] = copy_bandwidth(device)
        hf = None if a.no_transformers or quantize else hf_model_like(llm.model)  # float rows carry the baseline
        gpt_fast = None
        if a.gpt_fast:
            try:
                gpt_fast = GptFast.load(a.gpt_fast, llm.model.args, device, dtype, quantize, a.group_size)
            except Exception as e:  # noqa: BLE001  its quantizer may not suit this torch: say so, keep our rows
                print(f"gpt-fast {dtype_name} could not load: {type(e).__name__}: {e}", flush=True)
                extra.setdefault("gpt_fast_errors", {})[dtype_name] = f"{type(e).__name__}: {e}"
        for batch in batches:
            runners = {ours_name: ours[batch]}
            if compiled:
                runners[f"{ours_name}, compiled"] = compiled[batch]
            if batch == 1:  # every weight once through a matrix-vector product: the floor under any system
                if not quantize:
                    runners["floor: weights via F.linear"] = Floor(
                        llm.model, lambda x, p: torch.nn.functional.linear(x, p.weight)
                    )
                if quantize or llm.model.ops.name != "torch":  # the torch backend's ops.linear is F.linear
                    runners["floor: weights via ops.linear"] = Floor(llm.model, llm.model.ops.linear)
            if hf is not None:
                if cuda:
                    runners["transformers static+compile"] = Transformers(hf, batch, prompt_len, new_tokens, True)
                    if a.hf_eager:
                        runners["transformers eager"] = Transformers(hf, batch, prompt_len, new_tokens, False)
                else:
                    runners["transformers generate"] = Transformers(hf, batch, prompt_len, new_tokens, False)
            if gpt_fast is not None and batch == 1:
                runners["gpt-fast (compiled)"] = GptFast(*gpt_fast, batch, prompt_len, new_tokens)
            if cpp is not None and batch == 1:
                runners[LLAMA_CPP] = cpp
            for name, r in interleaved(runners, a.repeats).items():
                rows.append(
                    {
                        "system": name,
                        "dtype": cpp.dtype if name == LLAMA_CPP else dtype_name,
                        "batch": batch,
                        "decode_tok_s": r["tok_s"] * batch,
                        "ttft_ms": r["ttft_ms"],
                    }
                )
                if name == LLAMA_CPP:
                    rows[-1]["timed_beside"] = dtype_name
                print(rows[-1], flush=True)
            if cpp is not None and batch == 1:  # the same file decoded: how long the greedy tokens agree
                agree = agreeing_prefix(ours[batch].tokens[0], cpp.tokens)
                extra["llama_cpp"]["agreeing_tokens"][dtype_name] = agree
        del llm, hf, gpt_fast
        if not a.model:
            del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    result = {
        "benchmark": "generate",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": Path(a.model).name if a.model else preset,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rows": rows,
        **extra,
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(a.out) if a.out else RESULTS / f"generate-{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Decode, {result['model']}, prompt {prompt_len} tokens, {new_tokens} new, greedy; median of "
        f"{a.repeats} runs, the systems taking turns. {result['machine']}, torch {result['torch']}, {result['date']}.",
        "",
        "| system | dtype | batch | decode tok/s | time to first token (ms) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['system']} | {r['dtype']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
        + ("-" if r["ttft_ms"] != r["ttft_ms"] else f"{r['ttft_ms']:.0f}")
        + " |"
        for r in rows
    ]
    for dtype_name, st in extra.get("by_dtype", {}).items():
        lines += [""] if st else []
        if "prefill" in st:
            pf = st["prefill"]
            lines.append(f"{dtype_name}: prefill of {pf['prefill_tokens']} tokens: {pf['prefill_tok_s']:.0f} tok/s.")
        if "compile_and_warm_up_s" in st:
            lines.append(
                f"{dtype_name}: the compiled decode's first generate (compile + warm-up) took "
                f"{st['compile_and_warm_up_s']:.1f} s (inductor's on-disk cache may hold earlier compiles)."
            )
        if "peak_gpu_memory_gb" in st:
            budget = st["weights_gb"] + st["kv_cache_gb"] + 2**30 / 1e9
            lines.append(
                f"{dtype_name}: peak GPU memory {st['peak_gpu_memory_gb']:.2f} GB: weights {st['weights_gb']:.2f} GB "
                f"+ KV cache {st['kv_cache_gb']:.2f} GB + {st['peak_gpu_memory_gb'] - budget + 2**30 / 1e9:.2f} GB "
                f"of the rest ({'within' if st['peak_gpu_memory_gb'] <= budget else 'over'} the 1 GiB allowance)."
            )
        if "copy_bandwidth_tb_s" in extra and "weights_gb" in st:
            weights_ms = st["weights_gb"] / extra["copy_bandwidth_tb_s"]
            lines.append(
                f"{dtype_name}: copy roofline: the weights ({st['weights_gb']:.2f} GB) at the measured copy bandwidth "
                f"({extra['copy_bandwidth_tb_s']:.2f} TB/s) take {weights_ms:.2f} ms: "
                f"{1000 / weights_ms:.0f} tok/s at batch 1."
            )
    if "llama_cpp" in extra:
        lc = extra["llama_cpp"]
        agree = ", ".join(f"{d} {n}" for d, n in lc["agreeing_tokens"].items())
        lines += [
            "",
            f"{LLAMA_CPP}: llama-cpp-python {lc['version']}, the file's {lc['weights']} weights, "
            f"{torch.get_num_threads()} threads; timed in each dtype's group, so one row per group. Its greedy "
            f"tokens equal ours (eager) for the first {agree} of {new_tokens} tokens.",
        ]
    for dtype_name, error in extra.get("gpt_fast_errors", {}).items():
        lines += ["", f"gpt-fast {dtype_name} did not run: {error}"]
    lines += [
        "",
        f"The whole benchmark took {result['wall_seconds']:.0f} s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
