"""Tensor parallelism on torch.distributed, in the Megatron layout: one model over N processes (ranks).

Each rank holds an ordinary `Transformer` built with its share of the heads and of the feed-forward:
- q, k, v and gate, up are column-parallel: a rank holds the output rows of its query heads, of the key/value
  heads those heads read, and of its slice of the FFN. With more ranks than key/value heads, each key/value head
  is replicated on the ranks whose query heads share it.
- o and down are row-parallel: a rank holds the input columns matching its heads / FFN slice, so its output is a
  partial sum; one all-reduce after each (a forward hook on `Attention` and `FeedForward`: two per layer).
- the embedding and the output projection are split by vocabulary (`vocab_parallel`, the default): a rank looks
  up only its ids (the others' are zero there, filled in by an all-reduce) and computes its slice of the logits,
  gathered along the vocabulary. Replicated (`vocab_parallel=False`) they are whole on every rank: the same
  numbers, each rank streaming the whole output projection per token (see benchmarks/bench_tp.py).
The model code is untouched: the loader (`llama3.weights.build.build_model(..., shard=tp)`) asks `slice` for each
rank's rows or columns of every checkpoint tensor before anything is copied, builds the model with
`local_args`, and `parallelize` adds the collectives.

Plain collectives rather than DTensor: the fused `wqkv` holds [q | k | v] rows and a key/value head may be
replicated, which no DTensor placement describes (Shard(0) of the fused weight would cut across q, k and v); the
hooks are three lines, the model's modules stay plain tensors, and an in-place `dist.all_reduce` on NCCL is what
a CUDA graph can capture (the decode step's graph then holds the collectives; not run here: no GPUs).

Every rank computes bit-identical logits (the all-reduced activations and the gathered logits are the same bytes
on every rank), so the same seed gives every rank the same token with no per-token broadcast. The seed of
`generate(seed=None)` is drawn from torch's default generator, which `from_environment` seeds alike on every rank
with a value broadcast from rank 0; a caller that starts the process group itself seeds alike itself.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.config import ModelArgs
from llama3.model.transformer import Transformer
from llama3.quant.weight_only import QuantizedWeight

T = TypeVar("T")


class TensorParallelError(ValueError):
    """A world size that cannot split the model, or a setting tensor parallelism does not support."""


# How each HF tensor is split: column-parallel ones by output rows (dim 0), row-parallel by input columns (dim 1).
_SPLIT = {
    "self_attn.q_proj.weight": ("q", 0),
    "self_attn.k_proj.weight": ("kv", 0),
    "self_attn.v_proj.weight": ("kv", 0),
    "self_attn.o_proj.weight": ("q", 1),
    "mlp.gate_proj.weight": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),
    "model.embed_tokens.weight": ("vocab", 0),
    "lm_head.weight": ("vocab", 0),
}


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel world, and how it shards a model."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # None: the default group
    vocab_parallel: bool = True

    @classmethod
    def from_environment(cls, device: torch.device, timeout_s: float = 600.0) -> TensorParallel | None:
        """The world torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), its process group
        started if it is not yet (gloo on the CPU, NCCL on CUDA, `timeout_s` on every collective so a rank
        that stops answering fails the others instead of hanging them); None for a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return None
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(local_device(device))
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            # Every rank must sample the same tokens: with the same seed in torch's default generator, the
            # seed `generate(seed=None)` draws from it is the same on every rank (no per-token broadcast)
            torch.manual_seed(rank0_value(int(torch.randint(0, 2**62, ()).item())))
        return cls(dist.get_rank(), dist.get_world_size())

    # -- the split --------------------------------------------------------------------------------

    def check(self, args: ModelArgs, quantize: str | None = None, group_size: int = 32) -> None:
        """Refuses, before anything is read, a world size that does not divide the model."""
        problems = _problems(args, self.world_size, self.vocab_parallel, quantize, group_size)
        if problems:
            fits = [n for n in range(1, 65) if not _problems(args, n, self.vocab_parallel, quantize, group_size)]
            raise TensorParallelError(
                f"tensor parallelism over {self.world_size} ranks cannot split this model: {'; '.join(problems)}. "
                f"World sizes that fit: {', '.join(map(str, fits))}"
            )

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shapes of this rank's model: its query heads, key/value heads and FFN slice (the vocabulary and
        head_dim are the model's: a vocabulary-parallel rank still takes and returns every token id)."""
        N = self.world_size
        return dataclasses.replace(
            args,
            n_heads=args.n_heads // N,
            n_kv_heads=max(args.n_kv_heads // N, 1),
            ffn_dim=args.ffn_dim // N,
            head_dim=args.head_dim,
        )

    def _range(self, kind: str, args: ModelArgs) -> tuple[int, int]:
        """(first, count) of this rank's rows (or columns) of a tensor split by `kind`."""
        N, r, D = self.world_size, self.rank, args.head_dim
        if kind == "q":
            n = args.n_heads // N * D
            return r * n, n
        if kind == "kv":  # rank r's query heads read key/value head r * KVH // N when ranks outnumber those heads
            n = max(args.n_kv_heads // N, 1) * D
            return (r * n if args.n_kv_heads >= N else r * args.n_kv_heads // N * D), n
        if kind == "ffn":
            n = args.ffn_dim // N
            return r * n, n
        n = args.vocab_size // N
        return r * n, n

    def slice(self, name: str, t: Tensor | QuantizedWeight, args: ModelArgs) -> Tensor | QuantizedWeight:
        """This rank's part of the HF tensor `name` (the whole tensor for norms, and for the embedding and the
        output projection when replicated). A view: the caller copies it (only it) where it belongs."""
        key = name if name in _SPLIT else name.partition(".layers.")[2].partition(".")[2]
        kind, dim = _SPLIT.get(key, (None, 0))
        if kind is None or (kind == "vocab" and not self.vocab_parallel):
            start, length = 0, t.shape[0]
        else:
            start, length = self._range(kind, args)
        if isinstance(t, QuantizedWeight):
            return _slice_quantized(t, dim, start, length)
        return t.narrow(dim, start, length)

    # -- the model --------------------------------------------------------------------------------

    def parallelize(self, model: Transformer) -> Transformer:
        """Adds the collectives to a model built with `local_args` (on the meta device when loading): an
        all-reduce after each row-parallel projection and, vocabulary-parallel, this rank's slice of the
        embedding and of the output projection with their all-reduce and gather."""
        for layer in model.layers:
            layer.attention.register_forward_hook(self._all_reduce_output)
            layer.feed_forward.register_forward_hook(self._all_reduce_output)
        if self.vocab_parallel:
            start, rows = self._range("vocab", model.args)
            w = model.tok_embeddings.weight
            model.tok_embeddings = VocabParallelEmbedding(rows, model.args.dim, start, self.group, w.device, w.dtype)
            model.output = nn.Linear(model.args.dim, rows, bias=False, device=w.device, dtype=w.dtype)
            if model.args.tie_embeddings:
                model.output.weight = model.tok_embeddings.weight
            model.register_forward_hook(self._gather_logits)
        return model

    def _all_reduce_output(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        dist.all_reduce(output, group=self.group)  # the partial sums of the row-parallel projection
        return output

    def _gather_logits(self, module: nn.Module, inputs, logits: Tensor) -> Tensor:
        """(B, T, V / N) on each rank -> (B, T, V) on every rank, the ranks' slices side by side."""
        B, T, n = logits.shape
        parts = logits.new_empty(self.world_size * B, T, n)
        _all_gather(parts, logits.contiguous(), group=self.group)
        return parts.view(self.world_size, B, T, n).permute(1, 2, 0, 3).reshape(B, T, self.world_size * n)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the embedding. Ids of other ranks look up zeros here; the all-reduce adds
    the one rank that holds each id, so every rank gets exactly the full embedding's rows."""

    def __init__(self, rows: int, dim: int, start: int, group, device, dtype):
        super().__init__(rows, dim, _weight=torch.empty(rows, dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight)
        self.start, self.group = start, group

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.where(mine, 0), self.weight).masked_fill_(~mine[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def _problems(args: ModelArgs, N: int, vocab_parallel: bool, quantize: str | None, group_size: int) -> list[str]:
    problems = []
    H, KVH, D = args.n_heads, args.n_kv_heads, args.head_dim
    if H % N:
        problems.append(f"its {H} query heads do not split over {N} ranks")
    if KVH % N and N % KVH:
        problems.append(f"its {KVH} key/value heads neither split over {N} ranks nor replicate evenly onto them")
    if args.ffn_dim % N:
        problems.append(f"its feed-forward size {args.ffn_dim} does not split over {N} ranks")
    if vocab_parallel and args.vocab_size % N:
        problems.append(f"its vocabulary of {args.vocab_size} does not split over {N} ranks")
    if quantize == "int4" and not problems:  # row-parallel slices cut along inputs, where int4 groups lie
        for what, inputs in (("attention output (o_proj)", H * D // N), ("feed-forward down_proj", args.ffn_dim // N)):
            if inputs % group_size:
                problems.append(f"each rank's {inputs} {what} inputs are not whole int4 groups of {group_size}")
    return problems


def _slice_quantized(q: QuantizedWeight, dim: int, start: int, length: int) -> QuantizedWeight:
    """Rows or columns of a weight quantized already (a quantized checkpoint, GGUF 4-bit codes), copied out of the
    file's mapping: int8 keeps its per-row scales; int4 columns are whole groups (checked in `check`), so its
    scales and zeros slice with them."""
    g = q.group_size or 1
    cut = lambda t, d, s, n: None if t is None else t.narrow(d, s, n).clone()
    if dim == 0:
        return QuantizedWeight(q.mode, cut(q.codes, 0, start, length), cut(q.scales, 0, start, length),
                               cut(q.zeros, 0, start, length), q.group_size)  # fmt: skip
    codes = cut(q.codes, 1, start, length)
    if q.mode == "int8":
        return QuantizedWeight(q.mode, codes, q.scales.clone())
    return QuantizedWeight(
        q.mode, codes, cut(q.scales, 1, start // g, length // g), cut(q.zeros, 1, start // g, length // g), g
    )


def local_device(device: torch.device) -> torch.device:
    """cuda without an index means this rank's GPU: cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def run_on_rank0(fn: Callable[..., T], *args) -> T:
    """fn(*args) on rank 0 alone (reading the user's input), its result, or the exception it raised, on every rank."""
    if not _distributed():
        return fn(*args)
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = ("value", fn(*args))
        except (Exception, KeyboardInterrupt) as e:
            outcome = ("raise", e)
    kind, value = rank0_value(outcome)
    if kind == "raise":
        raise value
    return value


_lines: queue.Queue | None = None


def rank0_input(prompt: str = "", heartbeat_s: float = 30.0) -> str:
    """input(prompt) on rank 0, the line (or its EOFError) on every rank. A chat waits on its user for as long as
    they like; the other ranks wait in collectives bounded by the process group's timeout, so while rank 0 waits
    it tells them so every `heartbeat_s` (its stdin is read by a thread)."""
    global _lines
    if not _distributed():
        return input(prompt)
    if dist.get_rank() == 0 and _lines is None:
        _lines = queue.Queue()

        def read() -> None:
            for line in sys.stdin:
                _lines.put(line.rstrip("\n"))
            _lines.put(None)  # end of input

        threading.Thread(target=read, daemon=True).start()
    if dist.get_rank() == 0 and prompt:
        print(prompt, end="", flush=True)
    while True:
        outcome = None
        if dist.get_rank() == 0:
            try:
                line = _lines.get(timeout=heartbeat_s)
                outcome = ("eof", None) if line is None else ("line", line)
            except queue.Empty:
                outcome = ("wait", None)
        kind, line = rank0_value(outcome)
        if kind == "line":
            return line
        if kind == "eof":
            if dist.get_rank() == 0:
                _lines.put(None)  # a later call sees the end again
            raise EOFError


def rank0_value(value):
    """`value` as rank 0 has it, on every rank of the default group (as it is without a distributed world)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a distributed world)."""
    return dist.get_rank() if dist.is_initialized() else 0


def shutdown() -> None:
    """Leaves the process group, if one was started (so a rank that stops early releases the others)."""
    if dist.is_initialized():
        dist.destroy_process_group()
