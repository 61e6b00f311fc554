"""`llama3 pretrain`: a few steps end to end, the checkpoint against transformers, resume, init, weight decay,
and the architecture variant (position_embedding none) trained with the same command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama3.cli import main
from llama3.model.config import ModelArgs
from llama3.model.transformer import Transformer
from llama3.train import pretrain as pt
from llama3.train.corpus import ByteTokenizer, encode_documents, text_file, validation_windows

TINY = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=1",
        "--set", "ffn_dim=64", "--set", "max_seq_len=32"]  # fmt: skip
TINY_ARGS = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)


def _text() -> str:
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (8,), generator=g)) for _ in range(120)]
    return "\n".join(lines) + "\n"  # about 6 KB of ASCII


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "text.txt"
    data.write_text(_text())
    out = root / "out"
    argv = ["pretrain", "--data", str(data), "--output", str(out), *TINY, "--batch-size", "4", "--max-steps", "4",
            "--warmup-steps", "2", "--eval-interval", "2", "--sample-tokens", "8", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return data, out


def test_pretrain_writes_a_checkpoint_transformers_loads_with_equal_logits(trained):
    from transformers import AutoTokenizer, LlamaForCausalLM

    data, out = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoint.pt", "train_log.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = Transformer(ModelArgs.from_hf_config(out / "config.json"))  # the trained weights, as training left them
    ours.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    tokens = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    text = "Ay, there's the rub — O Ophelia!\n"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ByteTokenizer().encode(text, bos=True)

    # the last validation record: bits per character of all validation windows, recomputed with transformers
    record = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 4 and "sample" in record
    windows = validation_windows(encode_documents(ByteTokenizer(), text_file(data).validation), 32)
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    targets = windows[:, 1:]
    text_targets = targets != 256  # bos is no character
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")[text_targets.flatten()]
    assert record["val_bpc"] == pytest.approx(nats.mean().item() / math.log(2), rel=1e-4)  # ASCII: a byte a char


def test_generate_runs_the_pretrained_model(trained, capsys):
    _, out = trained
    assert main(["generate", "--model", str(out), "to be", "-n", "5", "--dtype", "float32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finish_reason"] in ("length", "stop")


def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_text(_text())

    def config(output, resume=False):
        return pt.PretrainConfig(output=str(output), data=str(data), model_args=TINY_ARGS, batch_size=4,
                                 max_steps=6, warmup_steps=2, eval_interval=3, sample_tokens=1, eval_tokens=64,
                                 progress=False, resume=resume, log=lambda m: None)  # fmt: skip

    whole = pt.pretrain(config(tmp_path / "whole"))
    draws = {"n": 0}
    real = pt.random_windows

    def interrupted(*args, **kwargs):
        draws["n"] += 1
        if draws["n"] == 5:  # in step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pt, "random_windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(config(tmp_path / "split"))
    monkeypatch.setattr(pt, "random_windows", real)
    resumed = pt.pretrain(config(tmp_path / "split", resume=True))
    assert resumed["losses"] == whole["losses"][3:]
    log = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == whole["losses"]  # steps 4 and 5 of the broken run dropped
    a = Transformer.from_pretrained(tmp_path / "whole", dtype=torch.float32, progress=False).state_dict()
    b = Transformer.from_pretrained(tmp_path / "split", dtype=torch.float32, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_follows_gpt2_scaled_normal():
    """N(0, 0.02), and 0.02 / sqrt(2 n_layers) for the residual projections (GPT-2 section 2.3), norms 1."""
    args = ModelArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, max_seq_len=64)
    model = pt.build_model(args, 0.02, seed=0, device=torch.device("cpu"))
    residual = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = residual if name.endswith(("wo.weight", "w2.weight")) else 0.02
        assert p.mean().abs().item() < 3 * expected / math.sqrt(p.numel()) + 1e-6, name
        assert p.std().item() == pytest.approx(expected, rel=0.03), name


def test_weight_decay_applies_to_matrices_only():
    """With zero gradients AdamW's step is the decay alone: matrices shrink by lr * wd, the norm weights stay."""
    model = pt.build_model(ModelArgs(vocab_size=64, **TINY_ARGS), 0.02, seed=0, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(pt.param_groups(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


def test_nope_variant_trains_with_the_same_command_and_ignores_order(trained, tmp_path):
    """position_embedding=none: no position signal, so in one layer the last position's logits do not depend on the
    order of the tokens before it (its attention sees a set of keys and values, each made from one token); with
    RoPE they do. Trained by `llama3 pretrain --set`."""
    data, _ = trained
    out = tmp_path / "nope"
    argv = ["pretrain", "--data", str(data), "--output", str(out), *TINY, "--set", "n_layers=1",
            "--set", "position_embedding=none", "--batch-size", "2", "--max-steps", "2", "--eval-tokens", "64",
            "--sample-tokens", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["position_embedding"] == "none"
    nope = Transformer.from_pretrained(out, dtype=torch.float32, progress=False)
    assert nope.args.position_embedding == "none"
    rope = pt.build_model(
        ModelArgs(vocab_size=258, **(TINY_ARGS | {"n_layers": 1})), 0.02, seed=0, device=torch.device("cpu")
    )
    rope.load_state_dict(nope.state_dict())
    with torch.no_grad():  # sharp attention (after 2 steps from N(0, 0.02) it is near uniform, in any order)
        for model in (nope, rope):
            model.layers[0].attention.wqkv.weight.mul_(30)
    tokens = torch.tensor([[256, 10, 20, 30, 40, 50]])
    shuffled = torch.tensor([[256, 40, 20, 30, 10, 50]])  # the last token kept
    with torch.no_grad():
        torch.testing.assert_close(nope(tokens)[:, -1], nope(shuffled)[:, -1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(rope(tokens)[:, -1], rope(shuffled)[:, -1], atol=1e-3)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--set", "depth=3"], 2, "argument --set: expected FIELD=VALUE"),
        (["--set", "n_heads=3"], 2, "argument --set: dim 32 is not divisible by n_heads 3"),
        (["--learning-rate", "-1"], 2, "argument --learning-rate: must be a number in (0, 1]"),
        (["--seq-len", "64"], 2, "argument --seq-len: must be at most the model's context 32"),
        (["--data", "missing.txt"], 1, "data file not found: missing.txt (--data)"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys, extra, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(_text())
    argv = ["pretrain", "--data", "t.txt", "--output", "out", *TINY, "--quiet", *extra]
    with pytest.raises(SystemExit) if code == 2 else _no_raise():
        assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
