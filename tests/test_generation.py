"""Generation against transformers' `generate`, and sampling against the formulas it implements."""

from __future__ import annotations

import shutil

import pytest
import torch

from llama3 import Llama
from llama3.generation import sample

PROMPTS = ["Hello world, this is", "Hi", "The quick brown fox jumps over the lazy dog and keeps running"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama3_tokenizer_path):
    """A tiny random Llama with the real 128,256-token vocabulary and tokenizer (in original/)."""
    from conftest import save_tiny_hf

    d = tmp_path_factory.mktemp("tiny-llama")
    # eos ids as the Llama 3.1 Instruct repos list them (generation_config.json)
    hf = save_tiny_hf(d, vocab_size=128256, eos_token_id=[128001, 128008, 128009])
    (d / "original").mkdir()
    shutil.copy(llama3_tokenizer_path, d / "original" / "tokenizer.model")
    return d, hf


@pytest.fixture(scope="module")
def llm(checkpoint):
    return Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def encode_all(llm):
    return [llm.tokenizer.encode(p, bos=True) for p in PROMPTS]


def test_greedy_equals_transformers_single(llm, checkpoint):
    for prompt in encode_all(llm):
        assert llm.generate([prompt], 16, temperature=0, stop_tokens=[]) == [hf_greedy(checkpoint[1], prompt, 16)]


def test_ragged_batch_equals_each_prompt_alone(llm, checkpoint):
    prompts = encode_all(llm)
    batched = llm.generate(prompts, 16, temperature=0, stop_tokens=[])
    assert batched == [hf_greedy(checkpoint[1], p, 16) for p in prompts]
    assert batched == [llm.generate([p], 16, temperature=0, stop_tokens=[])[0] for p in prompts]


def test_stop_token_ends_its_row_only(llm, checkpoint):
    prompts = encode_all(llm)
    full = [hf_greedy(checkpoint[1], p, 12) for p in prompts]
    stop = full[0][4]  # row 0's fifth token becomes a stop token
    out = llm.generate(prompts, 12, temperature=0, stop_tokens=[stop])
    for row, ref in zip(out, full, strict=True):
        expected = ref[: ref.index(stop)] if stop in ref else ref
        assert row == expected
    assert len(out[0]) == 4 and stop not in out[0]


def test_default_stop_tokens_come_from_the_tokenizer(llm):
    assert sorted(llm.tokenizer.stop_tokens) == [128001, 128008, 128009]  # from generation_config.json
    greedy = llm.generate([encode_all(llm)[0]], 8, temperature=0, stop_tokens=[])[0]
    llm.tokenizer.stop_tokens, saved = [greedy[2]], llm.tokenizer.stop_tokens
    try:
        assert llm.generate([encode_all(llm)[0]], 8, temperature=0)[0] == greedy[:2]
    finally:
        llm.tokenizer.stop_tokens = saved


def test_seeded_sampling_reproduces(llm):
    prompts = encode_all(llm)
    a = llm.generate(prompts, 12, temperature=1.0, top_p=0.95, seed=123, stop_tokens=[])
    b = llm.generate(prompts, 12, temperature=1.0, top_p=0.95, seed=123, stop_tokens=[])
    c = llm.generate(prompts, 12, temperature=1.0, top_p=0.95, seed=124, stop_tokens=[])
    assert a == b
    assert a != c


def test_stream_text_equals_decoded_tokens(llm):
    prompt = "Streaming: 日本語 and emoji 🙂"
    tokens = llm.generate([llm.tokenizer.encode(prompt, bos=True)], 20, temperature=0, stop_tokens=[])[0]
    pieces = list(llm.stream_completion(prompt, 20, temperature=0, stop_tokens=[]))
    assert "".join(pieces) == llm.tokenizer.decode(tokens)
    assert llm.text_completion([prompt], 20, temperature=0, stop_tokens=[]) == [llm.tokenizer.decode(tokens)]


def test_chat_completion_uses_the_llama3_prompt(llm, checkpoint):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello <|eot_id|>"}]
    prompt = llm.chat_format.encode_dialog_prompt(dialog)
    assert prompt[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n
    assert prompt.count(128009) == 2  # the user's "<|eot_id|>" text is not a special token
    ref = hf_greedy(checkpoint[1], prompt, 10)
    for stop in (128001, 128008, 128009):
        if stop in ref:
            ref = ref[: ref.index(stop)]
    reply = llm.chat_completion([dialog], 10, temperature=0)[0]
    assert reply == {"role": "assistant", "content": llm.tokenizer.decode(ref)}


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[]], {}, "prompt 0 is empty"),
        ([], {}, "empty"),
        ([[1, 2, 128256]], {}, "outside"),
        ([[1, -1]], {}, "outside"),
        ([[1, 2]], {"max_new_tokens": 300}, "exceeds"),
        ([[1, 2]], {"temperature": -1}, "temperature"),
        ([[1, 2]], {"top_p": 0}, "top_p"),
        ([[1, 2]], {"top_k": 0}, "top_k"),
    ],
)
def test_bad_generate_arguments_are_named(llm, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}  # the tiny config's context is 256 tokens
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, **kwargs)


def test_fixed_cache_limits_batch_and_length(checkpoint):
    llm = Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32, max_seq_len=32, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        llm.generate([[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="cache length of 32"):
        llm.generate([[1] * 30], 4)
    assert len(llm.generate([[1] * 28], 4, temperature=0, stop_tokens=[])[0]) == 4


# -- sampling on crafted logits -----------------------------------------------------------------


def draws(logits: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(n, -1)
    return sample(batch, generator=g, **{"temperature": 1.0, "top_p": 1.0, "top_k": None, **kwargs})


def test_greedy_is_argmax():
    logits = torch.randn(5, 100)
    assert torch.equal(sample(logits, 0.0, 0.9, None), logits.argmax(-1))


def test_top_k_never_emits_tokens_outside_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]])
    seen = set(draws(logits, 4000, top_k=3).tolist())
    assert seen == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    # mass before each token: 0, .5, .75, .9, .97 -> with p=0.8 tokens 0, 1, 2 stay (Meta's sample_top_p)
    seen = draws(logits, 4000, top_p=0.8)
    assert set(seen.tolist()) == {0, 1, 2}
    freq = torch.bincount(seen, minlength=5).float() / len(seen)
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.03)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([[1.0, 0.0, -0.5, 0.5]])
    n = 20000
    freq = torch.bincount(draws(logits, n, temperature=temperature), minlength=4).float() / n
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-3)


def test_graph_form_decode_step_equals_transformers_over_a_stale_cache(checkpoint):
    """The step a CUDA graph captures (fixed buffers, attention over every cache slot with the unused
    ones masked, no host-known length), run eagerly on the CPU, with garbage in the cache slots that
    no row has reached yet."""
    from conftest import fill_cache_with_garbage

    d, hf = checkpoint
    llm = Llama.from_pretrained(d, device="cpu", dtype=torch.float32, cuda_graphs=True)
    prompts = encode_all(llm)
    fill_cache_with_garbage(llm.model, batch=2, slots=256)
    assert llm.generate(prompts[:2], 12, temperature=0, stop_tokens=[]) == [hf_greedy(hf, p, 12) for p in prompts[:2]]
    assert all(step.static and step.graph is None for step in llm._steps.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_gives_the_eager_tokens(checkpoint, backend):
    d = checkpoint[0]
    graphed = Llama.from_pretrained(d, device="cuda", dtype=torch.float32, backend=backend, cuda_graphs=True)
    eager = Llama.from_pretrained(d, device="cuda", dtype=torch.float32, backend=backend, cuda_graphs=False)
    prompts = encode_all(graphed)
    for kwargs in ({"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}):
        a = graphed.generate(prompts, 24, stop_tokens=[], **kwargs)
        b = eager.generate(prompts, 24, stop_tokens=[], **kwargs)
        assert a == b
    assert any(s.graph is not None for s in graphed._steps.values())
