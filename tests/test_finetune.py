"""LoRA fine-tuning: which tokens are learned (against transformers' rendering of the Llama 3 chat template),
the masked loss (against transformers' own loss with -100 labels), training, resume, gradient checkpointing,
QLoRA, the CLI end to end (the merged checkpoint loaded by us and by transformers), and bad data named.

The training runs use a byte-level Llama 3 tokenizer (256 single-byte ranks, then the 256 Llama 3 special
tokens: the real chat format over a 512-token vocabulary), so a step of a tiny model takes milliseconds.
"""

from __future__ import annotations

import base64
import json
import math
import shutil

import pytest
import torch
from conftest import tiny_hf_model

from llama3.model.lora import LoRAConfig, add_lora, lora_parameters
from llama3.model.transformer import Transformer
from llama3.train.data import (
    IGNORE,
    DataError,
    collate,
    encode_example,
    length_grouped_batches,
    prepare,
    read_chat_rows,
)
from llama3.train.finetune import TrainConfig, enable_gradient_checkpointing, finetune, token_loss_sum

DIALOGS = [
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Ada."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Favourite colour?"},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "It is calm."},
    ],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]


def write_jsonl(path, dialogs) -> str:
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    return str(path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """(dir, HF model): a tiny random Llama 3 with a byte-level tiktoken file in original/tokenizer.model.

    The final norm is scaled up 4x: behind a norm of weight ~1 a random dim-64 model's logits span too little
    for any adapter to make one token likely (the loss stalls near 0.7), and the end-to-end test needs ~0."""
    d = tmp_path_factory.mktemp("byte-llama")
    hf = tiny_hf_model(vocab_size=512, bos_token_id=256, eos_token_id=[257, 264, 265], initializer_range=0.1)
    with torch.no_grad():
        hf.model.norm.weight.mul_(4)
    hf.save_pretrained(d)
    (d / "original").mkdir()
    lines = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (d / "original" / "tokenizer.model").write_text(lines)
    return d, hf


def config(byte_llama, tmp_path, **kwargs) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", DIALOGS)
    defaults = dict(
        data=data,
        output=str(tmp_path / "out"),
        model=str(byte_llama[0]),
        dtype="float32",
        batch_size=2,
        learning_rate=1e-2,
        lora_rank=4,
        progress=False,
        log=lambda msg: None,
    )
    return TrainConfig(**(defaults | kwargs))


def log_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_labels_are_the_assistant_turns_of_transformers_chat_template(llama3_tokenizer_path):
    """Ids equal transformers' rendering of the Llama 3 Instruct template; the learned tokens are exactly
    what each assistant turn adds after the prompt that asks for it (its content and <|eot_id|>)."""
    from conftest import hf_llama3_tokenizer

    from llama3.text.chat_format import ChatFormat
    from llama3.text.tokenizer import Tokenizer

    hf = hf_llama3_tokenizer(llama3_tokenizer_path)
    render = lambda msgs, gen: list(hf.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False))
    dialog = DIALOGS[1]
    ids, labels = encode_example(ChatFormat(Tokenizer(llama3_tokenizer_path)), dialog)
    assert ids == render(dialog, False)
    expected = [IGNORE] * len(ids)
    for k, message in enumerate(dialog):
        if message["role"] == "assistant":
            start, end = len(render(dialog[:k], True)), len(render(dialog[: k + 1], False))
            expected[start:end] = ids[start:end]
    assert labels == expected
    assert hf.decode([t for t in labels if t != IGNORE]) == "Teal.<|eot_id|>It is calm.<|eot_id|>"


def test_chatml_learns_content_and_im_end_only():
    from llama3.text.chat_format import ChatMLFormat
    from llama3.text.tokenizer import Tokenizer

    ranks = {bytes([i]): i for i in range(256)}
    tok = Tokenizer.from_encoding(
        name="bytes-chatml",
        mergeable_ranks=ranks,
        special_tokens={"<|im_start|>": 256, "<|im_end|>": 257},
        pat_str=r"\S+|\s+",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token=None,
    )
    ids, labels = encode_example(ChatMLFormat(tok, default_system="Sys."), DIALOGS[0])
    assert ids == ChatMLFormat(tok, default_system="Sys.").encode_dialog_prompt(DIALOGS[0])[: len(ids)]
    assert tok.decode(ids).endswith("<|im_start|>assistant\nMy name is Ada.<|im_end|>\n")
    assert tok.decode([t for t in labels if t != IGNORE]) == "My name is Ada.<|im_end|>"


def test_masked_loss_equals_transformers_loss_with_ignored_labels(byte_llama):
    """Our loss over a right-padded batch of two rows = transformers' mean cross-entropy with labels -100
    on everything that is not an assistant token (and an attention mask over the padding)."""
    d, hf = byte_llama
    from llama3.generate.llama import Llama

    llm = Llama.from_pretrained(d, dtype="float32", progress=False)
    examples = prepare(DIALOGS[:2], llm.chat_format, 1024, "rows", print)
    inputs, targets = collate(examples, llm.device)
    n = sum(e.n_targets for e in examples)
    with torch.no_grad():
        ours = token_loss_sum(llm.model, inputs, targets) / n
    L = max(len(e.ids) for e in examples)
    ids = torch.tensor([e.ids + [0] * (L - len(e.ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE] * (L - len(e.labels)) for e in examples])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (L - len(e.ids)) for e in examples])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert 0 < n < (mask.sum() - 2) / 2  # most tokens are not learned


def test_training_lowers_the_loss_and_writes_peft_files(byte_llama, tmp_path):
    c = config(
        byte_llama, tmp_path, max_steps=8, logging_steps=2, eval_data=write_jsonl(tmp_path / "e.jsonl", DIALOGS[:2])
    )
    summary = finetune(c)
    out = tmp_path / "out"
    assert summary["losses"][-1] < 0.85 * summary["losses"][0]
    records = log_records(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in train)
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in train)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8] and evals[0]["eval_loss"] == summary["eval_loss"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="pass --resume"):  # a second run does not overwrite the first
        finetune(c)


def test_resume_repeats_the_losses_of_an_uninterrupted_run(byte_llama, tmp_path, monkeypatch):
    """Dropout, accumulation over micro-batches, and more than one epoch of data: 6 steps in one go equal
    3 steps, a crash, and a resumed run of the other 3 (losses, final adapters)."""
    import llama3.train.finetune as ft

    kwargs = dict(max_steps=6, save_steps=3, logging_steps=1, lora_dropout=0.2, grad_accum=2, warmup_steps=2)
    whole = finetune(config(byte_llama, tmp_path / "a", **kwargs))

    save = ft._save_checkpoint

    def crash_after_first_save(*args, **kw):
        save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(byte_llama, tmp_path / "b", **kwargs))
    monkeypatch.setattr(ft, "_save_checkpoint", save)
    resumed = finetune(config(byte_llama, tmp_path / "b", resume=True, **kwargs))
    assert resumed["losses"] == whole["losses"][3:]
    losses = lambda d: [r["loss"] for r in log_records(d / "out")]
    assert losses(tmp_path / "b") == losses(tmp_path / "a") == whole["losses"]
    a, b = (tmp_path / d / "out" / "adapter_model.safetensors" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match=r"other settings or data \(--learning-rate 0.01\)"):
        finetune(config(byte_llama, tmp_path / "b", resume=True, **(kwargs | {"learning_rate": 1e-3})))


def test_accumulating_two_micro_batches_equals_one_batch_of_both(byte_llama, tmp_path):
    """The loss of a step is the mean over all its learned tokens, however they are split into micro-batches."""
    losses = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        c = config(byte_llama, tmp_path / str(batch_size), batch_size=batch_size, grad_accum=grad_accum, max_steps=3)
        c.data = write_jsonl(tmp_path / "four.jsonl", DIALOGS[:4])  # one step = one epoch = the same 4 rows
        c.lora_dropout = 0.0
        losses.append(finetune(c)["losses"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(byte_llama):
    grads = []
    for checkpointing in (False, True):
        model = Transformer.from_pretrained(byte_llama[0], dtype=torch.float32, progress=False)
        torch.manual_seed(0)
        add_lora(model, LoRAConfig(r=4, dropout=0.1))
        with torch.no_grad():
            for p in lora_parameters(model):
                p.normal_(0, 0.05)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)  # the same dropout masks, replayed by the recomputation
        token_loss_sum(model, x[:, :-1], x[:, 1:]).backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_trains_over_a_quantized_base(byte_llama, tmp_path, mode):
    summary = finetune(config(byte_llama, tmp_path, max_steps=6, quantize=mode, dtype=None))
    assert summary["losses"][-1] < 0.9 * summary["losses"][0]


def test_length_grouped_batches_cover_every_row_once_in_a_seeded_order():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 10]
    batches = length_grouped_batches(lengths, 2, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, 2, seed=3, epoch=0)
    assert batches != length_grouped_batches(lengths, 2, seed=3, epoch=1)
    # one window here (2 x 16 rows): every batch holds neighbours in length order
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert sorted(batches) == sorted(order[i : i + 2] for i in range(0, len(order), 2))


def test_cli_finetune_merge_and_adapter_end_to_end(byte_llama, tmp_path, capsys):
    """`llama3 finetune --merge` on two short dialogues drives the loss near zero; the merged checkpoint, loaded
    by us and by transformers, gives the same logits; greedy chat answers with the trained reply, merged or
    with --adapter."""
    from transformers import LlamaForCausalLM

    from llama3.cli import main
    from llama3.generate.llama import Llama

    d, _ = byte_llama
    data = write_jsonl(tmp_path / "two.jsonl", DIALOGS[:1] * 2 + DIALOGS[2:3] * 2)
    out = tmp_path / "out"
    args = ["finetune", "--model", str(d), "--data", data, "--output", str(out), "--dtype", "float32", "--quiet"]
    args += ["--max-steps", "40", "--learning-rate", "2e-2", "--lora-rank", "8", "--lora-dropout", "0", "--merge"]
    args += ["--batch-size", "4", "--warmup-steps", "5", "--logging-steps", "10", "--seed", "1"]
    assert main(args) == 0, capsys.readouterr().err
    assert log_records(out)[-1]["loss"] < 0.01
    merged = Llama.from_pretrained(out / "merged", dtype="float32", progress=False)
    question = [{"role": "user", "content": "What is your name?"}]
    reply = merged.chat_completion([question], max_new_tokens=30, temperature=0)[0]["content"]
    assert reply == "My name is Ada."
    hf = LlamaForCausalLM.from_pretrained(out / "merged").eval()
    prompt = torch.tensor([merged.chat_format.encode_dialog_prompt(question)])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(prompt), hf(prompt).logits, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    code = main(["generate", "--model", str(d), "--adapter", str(out), "--chat", "What is your name?", "-t", "0"]
                + ["--dtype", "float32", "-n", "30", "--quiet"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.strip() == "My name is Ada."


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', r"bad.jsonl, line 2: not JSON"),
        ('{"messages": []}\n', r"bad.jsonl, line 1: expected an object with a non-empty 'messages' list"),
        ('{"text": "hi"}\n', r"line 1: .*'messages'.*got keys \['text'\]"),
        ("[1, 2]\n", r"line 1: .*got a JSON list"),
    ],
)
def test_bad_rows_are_named(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        read_chat_rows(tmp_path / "bad.jsonl")


def test_bad_messages_and_files_are_named(byte_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.jsonl"):
        finetune(config(byte_llama, tmp_path, data=str(tmp_path / "missing.jsonl")))
    bad_role = DIALOGS[:1] + [[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]]
    with pytest.raises(DataError, match=r"train2.jsonl, row 2: message 1: unknown role 'bot'"):
        finetune(config(byte_llama, tmp_path, data=write_jsonl(tmp_path / "train2.jsonl", bad_role)))
    no_answer = [[{"role": "user", "content": "x"}]]
    with pytest.raises(DataError, match=r"row 1: no assistant message"):
        finetune(config(byte_llama, tmp_path, data=write_jsonl(tmp_path / "train3.jsonl", no_answer)))
    no_content = [[{"role": "user", "content": "x"}, {"role": "assistant"}]]
    with pytest.raises(DataError, match=r"row 1: message 1: missing 'content'"):
        finetune(config(byte_llama, tmp_path, data=write_jsonl(tmp_path / "train4.jsonl", no_content)))
    with pytest.raises(ValueError, match="LoRA rank r must be an integer >= 1, got 0"):
        finetune(config(byte_llama, tmp_path, lora_rank=0))
    with pytest.raises(ValueError, match="unknown LoRA target module.*'qkv'"):
        finetune(config(byte_llama, tmp_path, target_modules=("qkv",)))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(config(byte_llama, tmp_path, resume=True))


def test_long_rows_are_truncated_and_rows_left_without_answers_dropped(byte_llama):
    from llama3.generate.llama import Llama

    llm = Llama.from_pretrained(byte_llama[0], dtype="float32", progress=False)
    messages = []
    examples = prepare(DIALOGS[:2], llm.chat_format, 60, "rows", messages.append)
    # row 1 (57 tokens) is kept whole; row 2 is cut at 60 tokens, where its first answer would begin
    assert [e.ids for e in examples] == [encode_example(llm.chat_format, DIALOGS[0])[0]]
    assert "1 of 2 rows of rows are longer than 60 tokens" in messages[0] and "1 of them kept no" in messages[0]
    examples = prepare(DIALOGS[1:2], llm.chat_format, 70, "rows", messages.append)
    assert len(examples[0].ids) == 70 and examples[0].n_targets == 6  # "Teal.<|eot_id|>", the rest cut
    with pytest.raises(DataError, match="no row has an assistant token within 20 tokens"):
        prepare(DIALOGS[:1], llm.chat_format, 20, "rows", messages.append)


def test_parquet_rows_read_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"messages": d} for d in DIALOGS]), tmp_path / "rows.parquet")
    assert read_chat_rows(tmp_path / "rows.parquet") == read_chat_rows(write_jsonl(tmp_path / "rows.jsonl", DIALOGS))


def test_output_dir_is_left_alone_without_resume(byte_llama, tmp_path):
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds a checkpoint of an earlier run"):
        finetune(config(byte_llama, tmp_path, max_steps=1))
    shutil.rmtree(tmp_path / "out")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from llama3.cli import main

    code = main(["finetune", "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err == f"llama3: error: data file not found: {tmp_path / 'none.jsonl'} (--data)\n"
    data = write_jsonl(tmp_path / "t.jsonl", DIALOGS)
    code = main(["finetune", "--data", data, "--output", str(tmp_path / "o"), "--target-modules", "lm_head", "-q"])
    assert code == 1 and "unknown LoRA target module(s) 'lm_head'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--data", data, "--output", str(tmp_path / "o"), "--lora-rank", "0"])
    assert e.value.code == 2 and "argument --lora-rank: must be >= 1, got 0" in capsys.readouterr().err


def tree_hashes(root) -> dict[str, str]:
    """sha256 of every file under `root` (relative name -> digest): what a refused or failed run must not change."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning-rate", "inf"], "argument --learning-rate: must be a number in (0, 1], got inf"),
        (["--learning-rate", "-1e-3"], "argument --learning-rate: must be a number in (0, 1], got -0.001"),
        (["--lr", "nan"], "argument --learning-rate: must be a number in (0, 1], got nan"),
        (["--learning-rate", "10"], "argument --learning-rate: must be a number in (0, 1], got 10.0"),
        (["--lora-alpha", "inf"], "argument --lora-alpha: must be a finite number > 0, got inf"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be a number in [0, 1], got -1.0"),
        (["--max-grad-norm", "inf"], "argument --max-grad-norm: must be a finite number > 0, got inf"),
        (["--warmup-steps", "-1"], "argument --warmup-steps: must be an integer >= 0, got -1"),
    ],
)
def test_cli_refuses_non_finite_and_absurd_hyper_parameters_by_flag(tmp_path, capsys, argv, message):
    from llama3.cli import main

    data = write_jsonl(tmp_path / "t.jsonl", DIALOGS)
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--data", data, "--output", str(tmp_path / "o"), "-q", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1] == f"llama3 finetune: error: {message}", err
    assert not (tmp_path / "o").exists()


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(
    byte_llama, tmp_path, monkeypatch
):
    import llama3.train.finetune as ft
    from llama3.model.lora import read_adapter

    real, calls = ft.token_loss_sum, []

    def nan_at_step_3(*args):
        calls.append(1)
        loss = real(*args)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(ft, "token_loss_sum", nan_at_step_3)
    c = config(byte_llama, tmp_path, max_steps=5, save_steps=1, batch_size=8, lora_dropout=0.0)
    with pytest.raises(ft.DivergedError, match=r"stopped at step 3: loss nan.*checkpoint of step 2 .* is kept"):
        finetune(c)
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists()  # no adapter of NaNs under the final name
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    _, tensors = read_adapter(out / "checkpoint")  # refuses NaN or inf: the kept checkpoint is good
    assert state["step"] == 2 and all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)


def test_output_never_overwrites_the_model_or_the_data(byte_llama, tmp_path, capsys, monkeypatch):
    """--output equal to, inside or around the model (also through a symlink), or writing over --data, is
    refused before anything is read, and the files are left exactly as they were; beside the data is fine."""
    from llama3.cli import main

    d, _ = byte_llama
    model = tmp_path / "model"
    shutil.copytree(d, model)
    (tmp_path / "link").symlink_to(model)
    data = write_jsonl(model / "train.jsonl", DIALOGS)
    before = tree_hashes(tmp_path)
    cases = {
        str(model): "is the model",
        str(tmp_path / "link"): "is the model",
        str(model / "sub"): "lies inside the model",
        str(tmp_path): "contains the model",
    }
    for output, message in cases.items():
        code = main(["finetune", "--model", str(tmp_path / "link"), "--data", data, "-o", output, "-q", "--merge"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1, (output, err)
    (tmp_path / "elsewhere").mkdir()
    data = write_jsonl(tmp_path / "elsewhere" / "train_log.jsonl", DIALOGS)
    before = tree_hashes(tmp_path)
    for output, flag in ((tmp_path / "elsewhere", "--data"), (tmp_path / "elsewhere" / "train_log.jsonl", "--data")):
        code = main(["finetune", "--model", str(model), "--data", data, "-o", str(output), "-q"])
        err = capsys.readouterr().err
        assert code == 1 and f"{flag} {data} would be overwritten" in err, err
    for flag in ("--data", "--eval-data"):
        code = main(["finetune", "--model", str(model), "--data", write_jsonl(tmp_path / "ok.jsonl", DIALOGS)]
                    + [flag, str(model), "-o", str(tmp_path / "o2"), "-q"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and f"{model} is a directory; expected a data file" in err and flag in err, err
    assert tree_hashes(tmp_path) == before | {"ok.jsonl": tree_hashes(tmp_path)["ok.jsonl"]}
    # the data's own directory is a fine --output: the outputs go beside it
    (tmp_path / "beside").mkdir()
    monkeypatch.chdir(tmp_path / "beside")
    rows = write_jsonl(tmp_path / "beside" / "rows.jsonl", DIALOGS)
    assert main(["finetune", "--model", str(model), "--data", "rows.jsonl", "-o", ".", "-q", "--max-steps", "1",
                 "--dtype", "float32"]) == 0  # fmt: skip
    assert (tmp_path / "beside" / "adapter_model.safetensors").is_file()
    assert tree_hashes(model) == {k.removeprefix("model/"): v for k, v in before.items() if k.startswith("model/")}
    # --resume finds the same data given by an absolute path instead of a relative one
    assert main(["finetune", "--model", str(model), "--data", rows, "-o", ".", "-q", "--max-steps", "1",
                 "--dtype", "float32", "--resume"]) == 0, capsys.readouterr().err  # fmt: skip


def test_resume_message_names_flags_not_fields(byte_llama, tmp_path):
    finetune(config(byte_llama, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"other settings or data \(--max-seq-len 1024\)$"):
        finetune(config(byte_llama, tmp_path, max_steps=1, resume=True, max_seq_len=512))
