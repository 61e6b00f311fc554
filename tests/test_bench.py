"""`llama3 bench` (llama3/eval/bench.py, bench_systems.py, cli/bench.py): on a tiny checkpoint it times every
cell of the grid for ours and transformers, writes the JSON with every field, and its numbers hang together."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import needs_cc, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROW_FIELDS = {
    "model", "model_source", "weights", "size_bytes", "params", "backend", "device", "config", "load_seconds",
    "system", "system_weights", "threads", "batch", "test", "n_tokens", "tokens_per_second",
    "tokens_per_second_std", "samples_tokens_per_second", "time_to_first_token_ms", "peak_host_rss_mib",
    "peak_cuda_mib", "repetitions", "aten_ops_per_layer", "load_average_1min",
}  # fmt: skip


def test_bench_writes_every_field_for_every_cell(tiny_llama3, tmp_path, monkeypatch, capsys):
    d, hf = tiny_llama3
    out = tmp_path / "bench.json"
    code, stdout, err = run_main(
        monkeypatch, capsys, "bench", "-m", str(d), "-p", "8", "-n", "4", "-b", "1,2", "-r", "3",
        "--dtype", "float32", "--compare", "transformers,llama.cpp,floor", "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    header = result["header"]
    assert {"date", "machine", "versions", "load_average_1min", "load_average"} <= header.keys()
    assert {"cpu", "isa", "torch_cpu_capability", "cores", "threads", "omp_wait_policy", "gpu"} <= header[
        "machine"
    ].keys()
    assert {"llama3", "torch", "python", "transformers"} <= header["versions"].keys()
    rows = result["rows"]
    cells = {(r["system"], r["batch"], r["test"]) for r in rows}
    grid = {(s, b, t) for s in ("llama3", "transformers") for b in (1, 2) for t in ("pp8", "tg4")}
    grid.add(("floor", 1, "tg4"))  # the floor decodes one row and has no prompt
    assert cells == grid and len(rows) == len(grid)
    for r in rows:
        assert set(r) == ROW_FIELDS
        assert len(r["samples_tokens_per_second"]) == 3 and r["tokens_per_second"] > 0
        assert r["params"] == sum(p.numel() for p in hf.parameters())  # transformers' own count of the model
        assert r["weights"] == "float32" and r["system_weights"] == "float32"
        if r["system"] == "llama3":  # the profile is of our decode step
            assert r["aten_ops_per_layer"] > 0
        else:
            assert r["aten_ops_per_layer"] is None
        assert (r["time_to_first_token_ms"] is None) == (r["system"] == "floor")
        if r["test"].startswith("pp"):  # tokens/s is the prefill's tokens over its time (median of 3: the same run)
            assert r["tokens_per_second"] == pytest.approx(
                r["batch"] * r["n_tokens"] / r["time_to_first_token_ms"] * 1e3
            )
    # llama.cpp reads GGUF only: skipped, said so, and no row
    assert any(s.startswith("llama.cpp:") for s in result["skipped"]) and "Skipped: llama.cpp" in stdout
    # the markdown: llama-bench's columns, a line per row, the ratios to transformers
    assert "| model | size | params | backend | threads | batch | test | t/s | ttft ms | aten ops / layer |" in stdout
    assert sum(line.startswith("| ") for line in stdout.splitlines()) == 2 + len(rows)  # + the header and rule
    assert "llama3 (float32) / transformers (float32), tokens/s: pp8 b1" in stdout


@pytest.mark.parametrize(
    "args, flag",
    [
        (["-p", "8,x"], "-p/--n-prompt"),
        (["-p", "0", "-n", "0"], "-p/-n"),
        (["-b", "0"], "-b/--batch-size"),
        (["--compare", "vllm"], "--compare"),
        (["--dtype", "float64"], "--dtype"),
        (["-r", "0"], "-r/--repetitions"),
    ],
)
def test_bench_bad_arguments_name_the_flag(args, flag, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "bench", *args)
    assert code == 2 and flag in err.splitlines()[-1]


def test_bench_refuses_tests_longer_than_the_context(tiny_llama3, monkeypatch, capsys):
    d, _ = tiny_llama3  # max_position_embeddings 256
    code, _, err = run_main(monkeypatch, capsys, "bench", "-m", str(d), "-p", "300", "-n", "4", "-q")
    assert code == 1 and "context is 256" in err and len(err.strip().splitlines()) == 1


def test_bench_counts_fewer_aten_ops_for_the_cpu_step_than_the_reference_block(
    tiny_llama3, tmp_path, monkeypatch, capsys
):
    """The ops column: the CPU backend's decode step (CpuOps.run_block, fused projections, in-place ops) dispatches
    fewer top-level aten ops per layer than the reference block (TorchOps) on the same weights."""
    d, _ = tiny_llama3
    out = tmp_path / "ops.json"
    code, _, err = run_main(
        monkeypatch, capsys, "bench", "-m", str(d), "-p", "0", "-n", "2", "-r", "1", "--dtype", "float32",
        "--backend", "auto,torch", "--device", "cpu", "--json", str(out), "-q",
    )  # fmt: skip
    assert code == 0, err
    ops = {r["backend"]: r["aten_ops_per_layer"] for r in json.loads(out.read_text())["rows"]}
    assert set(ops) == {"cpu", "torch"}, ops
    assert 0 < ops["cpu"] < ops["torch"], ops


def test_random_weights_model_is_the_same_model_in_transformers():
    """`--model random:PRESET --compare transformers` copies our random weights into transformers' Llama: the two
    must compute the same logits (a wrong copy, a swapped gate/up or q/k/v split, would not)."""
    import torch

    from llama3.eval.bench_random import hf_model_like, random_model
    from llama3.model.config import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300, max_seq_len=64)
    torch.manual_seed(0)
    ours = random_model(args, torch.device("cpu"), torch.float32, "torch")
    hf = hf_model_like(ours)
    tokens = torch.tensor([[5, 17, 250, 3, 99, 42]])
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_counting_the_decode_steps_aten_ops_prints_nothing(tiny_llama3, capfd):
    """torch.profiler's tracer writes two lines to the process's stderr at every profile: the count hides them."""
    import torch

    from llama3 import Transformer
    from llama3.eval.bench import aten_ops_per_layer

    model = Transformer.from_pretrained(tiny_llama3[0], device="cpu", dtype=torch.float32)
    assert aten_ops_per_layer(model) > 0
    assert capfd.readouterr() == ("", "")
    print("after", file=sys.stderr)  # and stderr works again
    assert capfd.readouterr().err == "after\n"


def test_an_unknown_random_preset_is_named_as_typed(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "bench", "-m", "random:nope", "-p", "8", "-n", "4")
    assert code == 1
    assert err.strip().startswith("llama3: error: --model random:nope: unknown model name 'nope'; known: ")


@needs_cc
def test_bench_times_kernel_plans_side_by_side(tiny_llama3, tmp_path, monkeypatch, capsys):
    """--kernel a,b: one row set per CPU kernel plan, each model loaded with that plan's layers."""
    d, _ = tiny_llama3
    out = tmp_path / "kernels.json"
    code, _, err = run_main(
        monkeypatch, capsys, "bench", "-m", str(d), "-p", "0", "-n", "2", "-r", "1", "--kernel", "int4,int4-dot",
        "--device", "cpu", "--json", str(out), "-q",
    )  # fmt: skip
    assert code == 0, err
    weights = [r["weights"] for r in json.loads(out.read_text())["rows"]]
    assert weights == ["int4 (group 32), kernel int4", "int4 (dot), kernel int4-dot"], weights
    code, _, err = run_main(monkeypatch, capsys, "bench", "--kernel", "avx")
    assert code == 2 and "--kernel" in err.splitlines()[-1]
