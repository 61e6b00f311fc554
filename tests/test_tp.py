"""Tensor parallelism (llama3.tp) on the CPU: gloo process groups of 2 and 4 processes spawned here.

Each world loads tiny random checkpoints written by transformers twice per rank, whole (tp=1, no collective) and
sharded, and compares them: logits and greedy tokens, including key/value heads fewer than ranks and tied
embeddings, and int4 weights; the ranks' sampled tokens agree; a rank that leaves fails the others at once.
Loading needs no collective, so the bytes each rank allocates while loading are measured here, rank by rank.
The CLI's generate and chat run under torchrun. Every process is bounded in time and killed on failure.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_hf

WORLD_TIMEOUT_S = 120

# q heads, kv heads, and whether tied: 8 heads / 4 kv heads split evenly over 2 and 4 ranks; 8 / 2 tied has fewer
# kv heads than 4 ranks (each kv head replicated on two); int4 rows need whole groups of 32 inputs per rank.
CHECKPOINTS = {
    "gqa": dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, vocab_size=256),
    "tied-few-kv": dict(
        num_attention_heads=8, num_key_value_heads=2, intermediate_size=128, vocab_size=256, tie_word_embeddings=True
    ),
    "int4": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=256),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    for name, overrides in CHECKPOINTS.items():
        save_tiny_hf(root / name, seed=len(name), **overrides)
    return {name: root / name for name in CHECKPOINTS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    """A rank as torchrun starts one: its world in the environment, picked up by `TensorParallel.from_environment`."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # generators that differ per rank: the world must agree on one
    from llama3.parallel.tp import TensorParallel, shutdown

    tp = TensorParallel.from_environment(torch.device("cpu"), timeout_s=60)
    try:
        fn(tp, *args)
    finally:
        shutdown()


def run_world(fn, world_size: int, *args) -> None:
    """fn(tp, *args) in `world_size` spawned processes of one gloo group; a failure in any is raised
    here with its traceback; all are killed past WORLD_TIMEOUT_S."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"a world of {world_size} processes ran past {WORLD_TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _loaded(path: Path, shard=None, **kwargs):
    """(model, bytes of the CPU memory every op allocated while loading, as PyTorch's profiler records them)."""
    from torch.autograd.profiler import profile

    from llama3.model.transformer import Transformer

    with profile(profile_memory=True) as prof:
        model = Transformer.from_pretrained(
            path, "cpu", kwargs.pop("dtype", torch.float32), progress=False, shard=shard, **kwargs
        )
    return model, sum(max(e.self_cpu_memory_usage, 0) for e in prof.function_events)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    from llama3.generate.llama import Llama

    vocab = model.args.vocab_size
    llm = Llama(model, types.SimpleNamespace(n_words=vocab, stop_tokens=[]), cuda_graphs=True)  # the graph's form
    return llm.generate([prompt], n, temperature=0, stop_tokens=[])[0]


def _sharded_equals_whole(tp, checkpoints: dict[str, Path]) -> None:
    import torch.distributed as dist

    from llama3.generate.llama import Llama
    from llama3.parallel.tp import shutdown

    g = torch.Generator().manual_seed(0)
    for name in ("gqa", "tied-few-kv"):
        whole, _ = _loaded(checkpoints[name])
        sharded, _ = _loaded(checkpoints[name], tp)
        assert sharded.layers[0].attention.wqkv.weight.shape[0] < whole.layers[0].attention.wqkv.weight.shape[0]
        tokens = torch.randint(0, 256, (2, 11), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(sharded(tokens), whole(tokens), rtol=0, atol=1e-5, msg=f"{name} logits")
        prompt = tokens[0, :5].tolist()
        assert _greedy(sharded, prompt, 8) == _greedy(whole, prompt, 8), f"{name}: greedy tokens"
    # sampling with no seed given: every rank draws the same tokens (the seed comes from one generator state)
    llm = Llama(sharded, types.SimpleNamespace(n_words=256, stop_tokens=[]))
    sampled = llm.generate([prompt], 8, temperature=1.0, top_p=1.0, stop_tokens=[])[0]
    every_rank = [None] * tp.world_size
    dist.all_gather_object(every_rank, sampled)
    assert all(tokens == sampled for tokens in every_rank), every_rank
    world_size = tp.world_size
    if world_size == 2:  # int4: the same codes, sliced along whole groups; bf16 activations
        whole, _ = _loaded(checkpoints["int4"], quantize="int4", dtype=torch.bfloat16)
        sharded, _ = _loaded(checkpoints["int4"], tp, quantize="int4", dtype=torch.bfloat16)
        assert type(sharded.layers[0].feed_forward.w2).__name__ == "Int4Linear"
        tokens = torch.randint(0, 256, (1, 9), generator=g)
        with torch.no_grad():
            a, b = sharded(tokens).float(), whole(tokens).float()
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())
        # a rank that fails leaves the group (as the CLI does on an error): the others fail at once, no timeout
        if tp.rank == 1:
            return shutdown()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="Connection (closed|reset) by peer"), torch.no_grad():
            sharded(tokens)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_logits_and_greedy_tokens_equal_one_process(checkpoints, world_size):
    run_world(_sharded_equals_whole, world_size, checkpoints)


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_loads_a_1_over_n_share(checkpoints, world_size):
    """Measured: the memory every op allocates while a rank loads (reading, converting, fusing), and the storage of
    its parameters, are 1/N of a whole load's: no rank reads a whole tensor before cutting its slice. Loading
    needs no collective, so the ranks run here, one after another."""
    from llama3.parallel.tp import TensorParallel

    whole, whole_bytes = _loaded(checkpoints["gqa"])  # 4 kv heads: nothing replicated but the norms
    whole_params = sum(p.untyped_storage().nbytes() for p in whole.parameters())
    for rank in (0, world_size - 1):
        sharded, rank_bytes = _loaded(checkpoints["gqa"], TensorParallel(rank, world_size))
        params = sum(p.untyped_storage().nbytes() for p in sharded.parameters())
        assert abs(rank_bytes / whole_bytes - 1 / world_size) < 0.01, (rank_bytes, whole_bytes)
        assert abs(params / whole_params - 1 / world_size) < 0.01, (params, whole_params)
    if world_size == 2:  # quantized as read: the slice is quantized, never the whole weight
        _, whole_bytes = _loaded(checkpoints["int4"], quantize="int4", dtype=torch.bfloat16)
        _, rank_bytes = _loaded(checkpoints["int4"], TensorParallel(1, 2), quantize="int4", dtype=torch.bfloat16)
        assert rank_bytes < 0.55 * whole_bytes, (rank_bytes, whole_bytes)


def test_world_size_that_does_not_divide_is_refused_before_reading(checkpoints):
    from llama3.model.transformer import Transformer
    from llama3.parallel.tp import TensorParallel, TensorParallelError
    from llama3.weights.build import build_model, open_checkpoint

    args, _, count = open_checkpoint(checkpoints["gqa"])

    def nothing_may_be_read():
        raise AssertionError("a tensor was read")
        yield

    with pytest.raises(TensorParallelError, match=r"8 query heads do not split over 3 ranks.*fit: 1, 2, 4, 8"):
        build_model(
            args,
            nothing_may_be_read,
            count,
            torch.device("cpu"),
            torch.float32,
            shard=TensorParallel(0, 3),
            model_cls=Transformer,
        )
    int4_args, _, count = open_checkpoint(checkpoints["int4"])  # 4 ranks: 64 inputs of o_proj each, groups of 128
    with pytest.raises(TensorParallelError, match="64 attention output.*groups of 128"):
        build_model(int4_args, nothing_may_be_read, count, torch.device("cpu"), torch.bfloat16, quantize="int4",
                    group_size=128, shard=TensorParallel(0, 4), model_cls=Transformer)  # fmt: skip


@pytest.mark.parametrize(
    "command, stdin",
    [
        (["generate", "The sky is"], ""),
        (["chat"], "Hi there\n/reset\nWhat is 2+2?\n"),  # rank 0 reads each line, every rank answers it
    ],
    ids=["generate", "chat"],
)
def test_cli_under_torchrun_prints_the_single_process_text(tiny_llama3, capsys, monkeypatch, command, stdin):
    from llama3.cli import main

    d, _ = tiny_llama3
    args = [*command, "--model", str(d), "--dtype", "float32", "-n", "10", "-t", "0", "--quiet"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(args) == 0
    single = capsys.readouterr().out
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "llama3", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(torchrun, input=stdin, capture_output=True, text=True, timeout=WORLD_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == single and single.strip()
