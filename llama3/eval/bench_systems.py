"""The systems `llama3 bench --compare` times beside ours, on the same source, prompts and grid, greedy.

- transformers: `AutoModelForCausalLM` from the same directory or GGUF file, in our float dtype (it runs no
  int4 / int8 of ours: beside a quantized model of ours it runs bfloat16, and the table says so), timed as
  its `generate` is used: ppN = a 1-token `generate` of an N-token prompt, tgN = (N + 1)-token `generate`
  minus the 1-token one.
- llama.cpp through llama-cpp-python (never a dependency: build it for the CPU's ISA with
  `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python`), on a GGUF
  source only (it reads no other format), in the file's own weight types, batch 1, on the CPU: ppN =
  `eval` of N tokens from an empty cache, tgN = N greedy tokens after the first.

- floor: every projection weight once through the backend's `ops.linear` per token and nothing else (batch 1,
  tgN only; on CUDA inside one CUDA graph): a lower bound under any decode step with these weights and kernels.

On a `random:PRESET` source transformers runs `LlamaForCausalLM` with our random float weights copied in. A
system that is not installed or cannot run the source is skipped with a line saying why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llama3.generate.llama import Llama
from llama3.quant.isa import isa

SYSTEMS = ("transformers", "llama.cpp", "floor")


def prompt_ids(batch: int, n: int, vocab: int) -> list[list[int]]:
    """Fixed token ids, different per row, inside the vocabulary's ordinary range (ids 100..1099 where the
    vocabulary holds them): the same prompts for every system."""
    span = min(1000, max(vocab - 100, 1))
    base = 100 if vocab > 1100 else 0
    return [[(7 * b + 13 * j) % span + base for j in range(n)] for b in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_systems(
    names: Sequence[str], src, llm: Llama, grid, skipped: list[str], log: Callable[[str], None]
) -> list[Any]:
    """The comparison systems that can run here; each one that cannot adds a line to `skipped` (once)."""
    from llama3.weights.build import gguf_file
    from llama3.weights.hub import resolve

    path = None if str(src).startswith("random:") else resolve(src)
    gguf = None if path is None else gguf_file(path)
    out: list[Any] = []
    for name in names:
        try:
            if name == "transformers":
                out.append(Transformers(path, gguf, llm))
            elif name == "llama.cpp":
                if gguf is None:
                    raise _Skip("reads GGUF files only; the source is not one")
                if llm.device.type != "cpu":
                    raise _Skip("timed on the CPU only (llama-cpp-python's CPU build)")
                out.append(LlamaCpp(gguf, grid))
            elif name == "floor":
                out.append(Floor(llm))
            else:
                raise _Skip(f"unknown system (known: {', '.join(SYSTEMS)})")
        except _Skip as e:
            line = f"{name}: {e}"
            if line not in skipped:
                skipped.append(line)
                log(f"llama3 bench: skipped {line}")
            continue
        log(f"llama3 bench: comparing with {name} ({getattr(out[-1], 'weights', 'our weights')})")
    return out


class _Skip(Exception):
    pass


class Transformers:
    name = "transformers"

    def __init__(self, path, gguf, llm: Llama):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise _Skip("transformers is not installed (pip install transformers)") from None
        dtype = llm.model.tok_embeddings.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            dtype = torch.bfloat16
        try:
            if path is None:  # random weights: ours, copied into transformers' model
                from llama3.eval.bench_random import hf_model_like

                if not isinstance(llm.model.layers[0].feed_forward.w2, torch.nn.Linear):
                    raise _Skip("on random weights it runs our float weights only, and these are quantized")
                hf = hf_model_like(llm.model)
            elif gguf is not None:
                hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
            else:
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except _Skip:
            raise
        except Exception as e:  # noqa: BLE001  a format transformers cannot read: skip it, keep our rows
            raise _Skip(f"could not load {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        self.hf = hf.to(llm.device).eval()
        self.weights = str(dtype).removeprefix("torch.")
        self.vocab = llm.model.args.vocab_size

    def supports(self, kind: str, batch: int) -> bool:
        return True

    def _generate(self, ids: torch.Tensor, n: int) -> float:
        sync(self.hf.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        sync(self.hf.device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    def run(self, kind: str, n: int, batch: int) -> tuple[float, float]:
        if kind == "pp":
            ids = torch.tensor(prompt_ids(batch, n, self.vocab), device=self.hf.device)
            ttft = self._generate(ids, 1)
            return batch * n / ttft, ttft
        ids = torch.tensor(prompt_ids(batch, 1, self.vocab), device=self.hf.device)
        ttft = self._generate(ids, 1)
        total = self._generate(ids, n + 1)
        return batch * n / max(total - ttft, 1e-9), ttft

    def close(self) -> None:
        del self.hf


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf, grid):
        try:
            import llama_cpp
        except ImportError:
            raise _Skip(
                'llama-cpp-python is not installed (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary '
                "llama-cpp-python llama-cpp-python)"
            ) from None
        self.module, self.gguf = llama_cpp, str(gguf)
        self.n_ctx = max([*grid.prompt_lens, 1]) + max([*grid.gen_lens, 1]) + 2
        self.n_batch = max([*grid.prompt_lens, 1])
        self.models: dict[int, Any] = {}  # one per thread count
        self.extra_buffers = not isa()["amx"]  # off where the CPU has AMX (see `_model`)
        self.weights = self._model(torch.get_num_threads())._model.desc().split()[-1]  # "llama 135M Q4_1"

    def _model(self, threads: int):
        if threads not in self.models:
            from llama_cpp import llama_cpp as bindings  # the ctypes functions `Llama` calls

            defaults = bindings.llama_model_default_params
            if self.extra_buffers is False:
                # ggml's AMX weight buffers (an "extra buffer type") ran tile instructions before configuring the
                # tiles and died with an invalid opcode (llama-cpp-python 0.3.36, a Xeon with AMX in a VM);
                # without them it runs its AVX-512 kernels. llama-cpp-python offers no argument for it.
                def no_extra_buffers():
                    params = defaults()
                    params.use_extra_bufts = False
                    return params

                bindings.llama_model_default_params = no_extra_buffers
            try:
                self.models[threads] = self.module.Llama(
                    self.gguf,
                    n_ctx=self.n_ctx,
                    n_batch=self.n_batch,
                    n_ubatch=self.n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=0,
                    verbose=False,
                )
            finally:
                bindings.llama_model_default_params = defaults
        return self.models[threads]

    def supports(self, kind: str, batch: int) -> bool:
        return batch == 1

    def run(self, kind: str, n: int, batch: int) -> tuple[float, float]:
        llm = self._model(torch.get_num_threads())
        vocab = llm.n_vocab()
        llm.reset()  # an empty cache: `generate` would reuse the previous run's prefix
        if kind == "pp":
            t = time.perf_counter()
            llm.eval(prompt_ids(1, n, vocab)[0])
            ttft = time.perf_counter() - t
            return n / ttft, ttft
        t, first, count = time.perf_counter(), 0.0, 0
        for _ in llm.generate(prompt_ids(1, 1, vocab)[0], top_k=1, temp=0.0, repeat_penalty=1.0, reset=False):
            count += 1
            if count == 1:
                first = time.perf_counter() - t
            if count == n + 1:  # stop before it evaluates the last token: n decode steps, as ours
                break
        return n / max(time.perf_counter() - t - first, 1e-9), first

    def close(self) -> None:
        for m in self.models.values():
            m.close()
        self.models.clear()


class Floor:
    """Every projection weight once through the backend's `ops.linear` per token, nothing else: a lower bound
    under any batch-1 decode step with these weights and kernels (on CUDA inside one CUDA graph, so that launches
    cost what they cost in our decode graph). tgN only; it has no first token."""

    name = "floor"

    def __init__(self, llm: Llama):
        model = llm.model
        projections = [p for b in model.layers for p in (b.attention.wqkv, b.attention.wo)]
        projections += [p for b in model.layers for p in (b.feed_forward.w13, b.feed_forward.w2)]
        projections.append(model.output)
        self.device, linear = llm.device, model.ops.linear
        dtype = model.tok_embeddings.weight.dtype
        x = {k: torch.randn(1, 1, k, dtype=dtype, device=self.device) for k in {p.in_features for p in projections}}

        def step():
            with torch.inference_mode():
                for p in projections:
                    linear(x[p.in_features], p)

        step()  # the backend's one-time choices (GEMV or cuBLAS per shape) happen here
        self.step = _graphed(step) if self.device.type == "cuda" else step

    def supports(self, kind: str, batch: int) -> bool:
        return kind == "tg" and batch == 1

    def run(self, kind: str, n: int, batch: int) -> tuple[float, None]:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        return n / max(time.perf_counter() - t, 1e-9), None

    def close(self) -> None:
        del self.step


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
