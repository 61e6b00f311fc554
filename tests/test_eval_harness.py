"""`llama3 eval` and its lm-evaluation-harness `LM` (llama3/eval/harness.py) against transformers: the same
log-likelihoods on the same fp32 checkpoint, and the same accuracy (per document too) as lm-eval's own `hf`
model on a local multiple-choice task whose data the test writes (no download: HF_DATASETS_OFFLINE)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports datasets: the task's data is local
lm_eval = pytest.importorskip("lm_eval")

from conftest import run_main, save_tiny_hf  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from llama3 import Llama  # noqa: E402
from llama3.eval.harness import Llama3LM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 12  # max_length: the long context below is cut to it, the rolling text takes several windows


CORPUS = [
    "The capital of France is Paris, the city of light and of many bridges.",
    "Once upon a time there was a small llama who lived high in the mountains of Peru.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Question: 2 + 2 = 4. Answer: yes. The red cat sat down; the blue dog ran far.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dir, transformers model, transformers tokenizer): a tiny random Llama written by transformers with a
    500-token byte-level BPE (SmolLM2's layout, trained here by Hugging Face `tokenizers`), bos = eos = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-eval")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(CORPUS * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    hf = save_tiny_hf(d, vocab_size=len(tok), bos_token_id=0, eos_token_id=0)  # generates only known ids
    return d, hf, tok


@pytest.fixture(scope="module")
def lm(tiny):
    return Llama3LM(llm=Llama.from_pretrained(tiny[0], dtype=torch.float32), max_length=WINDOW, batch_size=3,
                    stride=5, progress=False)  # fmt: skip


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.inference_mode()
def hf_loglikelihood(hf, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's recipe written out on transformers: encode the whole and the context, the continuation is
    the rest; the input is cut on the left to WINDOW tokens; score the continuation's positions."""
    if context:
        n_spaces = len(context) - len(context.rstrip())  # trailing spaces go with the continuation
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        ctx, cont = whole[: len(ctx)], whole[len(ctx) :]
    else:
        ctx, cont = [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    inp = (ctx + cont)[-(WINDOW + 1) : -1]
    logp = hf(torch.tensor([inp])).logits[0, -len(cont) :].log_softmax(-1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihoods_equal_transformers(lm, tiny):
    hf, hf_tok = tiny[1], tiny[2]
    cases = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Paris, the city of light and of many bridges"),  # multi-token
        ("Once upon a time there was a small llama who lived high in the mountains of Peru and", " ate grass"),
        ("Question: 2 + 2 =", " 4"),
        ("", "Hello world"),  # empty context: the bos token stands in
        ("Answer: ", "yes"),  # the trailing space moves to the continuation, as lm-eval does
    ]
    assert len(hf_tok.encode(cases[2][0], add_special_tokens=False)) > WINDOW  # longer than the window: cut
    ours = lm.loglikelihood(requests("loglikelihood", cases), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(cases, ours, strict=True):
        ref, ref_greedy = hf_loglikelihood(hf, hf_tok, context, continuation)
        assert score == pytest.approx(ref, abs=1e-5, rel=1e-6), (context, continuation)
        assert greedy == ref_greedy


@torch.inference_mode()
def test_rolling_loglikelihood_is_the_strided_window_on_transformers(lm, tiny):
    """Windows of WINDOW tokens every 5 (Hugging Face's guide "Perplexity of fixed-length models"), after the
    bos token lm-eval puts first: every token of the text is scored once."""
    hf, hf_tok = tiny[1], tiny[2]
    text = "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles"
    ids = [hf_tok.bos_token_id] + hf_tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3 * WINDOW
    nll, prev_end = 0.0, 0
    for begin in range(0, len(ids), 5):
        end = min(begin + WINDOW, len(ids))
        labels = torch.tensor([ids[begin:end]])
        labels[:, : -(end - prev_end)] = -100
        n = (labels[:, 1:] != -100).sum().item()
        nll += hf(torch.tensor([ids[begin:end]]), labels=labels).loss.item() * n
        prev_end = end
        if end == len(ids):
            break
    [ours] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert ours == pytest.approx(-nll, rel=1e-5)


def test_generate_until_is_greedy_up_to_the_stop_string(lm, tiny):
    hf, hf_tok = tiny[1], tiny[2]
    context = "The llama said"
    with torch.inference_mode():
        ids = hf_tok.encode(context, add_special_tokens=False)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    out = out[: out.index(0)] if 0 in out else out  # our generation stops at eos (id 0) too
    text = hf_tok.decode(out)
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a stop string the greedy text reaches
    assert stop and stop in text
    [ours] = lm.generate_until(
        requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 6, "do_sample": False})]),
        disable_tqdm=True,
    )
    assert ours == text[: text.index(stop)]


def write_task(folder, n_docs: int = 8):
    """A multiple-choice task in lm-eval's YAML format over a JSONL file the test writes."""
    words = ["red", "blue", "green", "old", "new", "big", "small", "fast", "slow", "calm"]
    docs = [
        {"context": f"Q{i}: which words follow 'the {words[i % 10]}'?", "label": (3 * i) % 4,
         "choices": [" cat sat down", " dog", " bird flew over the hill", " fish swam"]}
        for i in range(n_docs)
    ]  # fmt: skip
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_eval_command_scores_a_local_task_as_lm_evals_hf_model(tiny, tmp_path, monkeypatch, capsys):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    out = tmp_path / "ours.json"
    code, stdout, err = run_main(
        monkeypatch, capsys, "eval", "-m", str(tiny[0]), "--tasks", "tiny_mc", "--include-path",
        str(tmp_path), "--json", str(out), "-b", "4", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "tiny_mc" in stdout and "acc" in stdout  # lm-eval's table
    ours = json.loads(out.read_text())
    assert ours["weights"] == "unquantized torch.float32"

    hf = HFLM(pretrained=tiny[1], tokenizer=tiny[2], add_bos_token=False, batch_size=4)
    theirs = lm_eval.simple_evaluate(
        model=hf, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False)
    )
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    by_doc = {s["doc_id"]: s for s in theirs["samples"]["tiny_mc"]}
    for sample in ours["samples"]["tiny_mc"]:  # every choice's log-likelihood, not only the argmax
        ref = [r[0][0] for r in by_doc[sample["doc_id"]]["resps"]]
        got = [r[0][0] for r in sample["resps"]]
        assert got == pytest.approx(ref, abs=1e-5)
        assert math.isfinite(sum(got))


def test_eval_command_names_what_is_wrong(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "eval", "--tasks", "a,,b")
    assert code == 2 and "--tasks" in err
    code, _, err = run_main(monkeypatch, capsys, "eval", "--tasks", "x", "--include-path", str(tmp_path / "none"))
    assert code == 2 and "--include-path" in err
