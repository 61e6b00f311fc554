"""The model against transformers' LlamaForCausalLM, the static KV cache against the cache-free
forward, and ModelArgs / RoPE against the published configs and formulas.

The tiny checkpoints use `initializer_range=0.1` instead of transformers' 0.02: at 0.02 the attention
scores of a random dim-64 model are ~0, attention is nearly uniform and positions hardly matter (a 0.1%
error in the RoPE frequencies moves the logits by 6e-5, under the 1e-4 tolerance). At 0.1 the same
error moves them by 5e-2, so a position or cache mistake cannot hide.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import TINY_CONFIGS

from llama3.model.config import ModelArgs, RopeScaling
from llama3.model.functional import rope_inv_freq
from llama3.model.transformer import RMSNorm, Transformer

VARIANTS = list(TINY_CONFIGS)
INIT = 0.1  # see the module docstring
VOCAB = 512


@pytest.fixture
def tiny(tiny_hf):
    """Factory: tiny(variant) -> (checkpoint dir, fp32 HF model, fp32 Transformer of the same weights)."""

    def make(variant: str = "llama3-gqa", **overrides):
        path, hf = tiny_hf(variant, initializer_range=INIT, **overrides)
        return path, hf, Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)

    return make


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def llama3_rope_bands(head_dim: int, theta: float, scaling: dict) -> dict[str, list[float]]:
    """The published frequencies theta^(-2i/D), sorted into the bands of Llama 3.1's scaling (llama-models'
    `apply_scaling`, docs/llama3-facts.md): wavelength 2*pi/f below L/high_freq_factor kept, above L/low_freq_factor
    divided by `factor`, blended in between (L = original_max_position_embeddings)."""
    L = scaling["original_max_position_embeddings"]
    bands = {"kept": [], "blended": [], "divided": []}
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < L / scaling["high_freq_factor"]:
            bands["kept"].append(f)
        elif wavelen > L / scaling["low_freq_factor"]:
            bands["divided"].append(f)
        else:
            bands["blended"].append(f)
    return bands


def assert_rope_blend_is_exercised(config, scaling: dict, length: int) -> None:
    """Every band holds a frequency of this config, and over `length` positions a blended frequency turns
    at least a radian away from both the kept and the divided frequency: a wrong blend shows in the logits."""
    bands = llama3_rope_bands(config.head_dim, config.rope_parameters["rope_theta"], scaling)
    assert all(bands.values()), {band: len(freqs) for band, freqs in bands.items()}
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    L = scaling["original_max_position_embeddings"]

    def blend(f: float) -> float:
        smooth = (L * f / (2 * math.pi) - low) / (high - low)
        return (1 - smooth) * f / factor + smooth * f

    turn = max(min(f - blend(f), blend(f) - f / factor) * (length - 1) for f in bands["blended"])
    assert turn >= 1.0, f"positions up to {length - 1} turn a blended frequency by only {turn:.2f} rad"


# --- logits against transformers ---------------------------------------------------------------

LOGITS_LENGTH = 64  # long enough for the blended RoPE frequencies to turn (assert_rope_blend_is_exercised)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_fp32_logits_match_transformers(tiny, variant):
    _, hf, model = tiny(variant)
    if "rope_scaling" in TINY_CONFIGS[variant]:
        assert_rope_blend_is_exercised(hf.config, TINY_CONFIGS[variant]["rope_scaling"], LOGITS_LENGTH)
    tokens = random_tokens(2, LOGITS_LENGTH)
    ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, LOGITS_LENGTH, VOCAB)
    assert ours.dtype == torch.float32
    assert max_diff(ours, theirs) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_bf16_logits_as_accurate_as_transformers_bf16(tiny, variant):
    """bf16 is not bitwise equal to transformers' bf16 (our RoPE runs in fp32 as in Meta's reference,
    HF rotates in bf16), so both are measured against an fp32 forward of the same bf16-rounded weights:
    ours must be about as accurate as HF's (measured: equal within a few percent, both ~1 bf16 ulp of
    the logits at worst), and agree with the fp32 top-1 wherever its margin clearly exceeds the error.
    """
    from transformers import LlamaForCausalLM

    path, hf, _ = tiny(variant)
    reference = copy.deepcopy(hf)
    for p in reference.parameters():
        p.copy_(p.bfloat16().float())  # the weights both bf16 models compute with, computed in fp32
    hf_bf16 = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours_bf16 = Transformer.from_pretrained(path, device="cpu", dtype=torch.bfloat16)

    tokens = random_tokens(2, 96, seed=1)
    ref = reference(tokens).logits
    ours, theirs = ours_bf16(tokens), hf_bf16(tokens).logits
    assert ours.dtype == torch.bfloat16
    err_ours, err_hf = (ours.float() - ref).abs(), (theirs.float() - ref).abs()

    assert err_ours.mean() <= 1.25 * err_hf.mean()
    assert err_ours.max() <= 2.0 * err_hf.max()
    assert err_ours.max() <= 0.03 * ref.abs().max()  # absolute sanity bound: ~1-2 bf16 ulps of the logits

    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err_ours.max()  # no rounding can flip these
    assert clear.sum() >= 0.4 * clear.numel()  # the check below is not vacuous
    assert torch.equal(ours.float().argmax(-1)[clear], ref.argmax(-1)[clear])


@torch.no_grad()
def test_bf16_cached_decode_as_accurate_as_transformers_bf16(tiny):
    """The bf16 decode path (prefill, then one token at a time through the cache, which the CPU keeps in
    fp32) measured like the cache-free forward above: against fp32 over the same bf16-rounded weights,
    about as accurate as transformers' bf16 forward. The cache holds the bf16-rounded keys and values, so
    keeping it in fp32 changes memory, not numbers: every cached value is a bf16 value."""
    from transformers import LlamaForCausalLM

    path, hf, _ = tiny("llama3-gqa")
    reference = copy.deepcopy(hf)
    for p in reference.parameters():
        p.copy_(p.bfloat16().float())
    hf_bf16 = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(path, device="cpu", dtype=torch.bfloat16)

    tokens = random_tokens(2, 48, seed=4)
    ours.setup_cache(max_batch_size=2, max_seq_len=64)
    steps = [ours(tokens[:, :16], input_pos=torch.arange(16))]
    steps += [ours(tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(16, 48)]
    decoded = torch.cat(steps, dim=1)
    cache = ours.layers[0].attention.cache
    assert cache.k.dtype == torch.float32
    assert torch.equal(cache.k[:, :, :48].bfloat16().float(), cache.k[:, :, :48])  # bf16 values, stored wide

    ref = reference(tokens).logits
    err_ours, err_hf = (decoded.float() - ref).abs(), (hf_bf16(tokens).logits.float() - ref).abs()
    assert err_ours.mean() <= 1.25 * err_hf.mean()
    assert err_ours.max() <= 2.0 * err_hf.max()


# --- RMSNorm rounding ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_rms_norm_rounds_like_transformers(dtype):
    """RMSNorm is transformers' LlamaRMSNorm bit for bit in 16-bit dtypes: normalize in fp32, cast to the
    input dtype, then `weight * x`. Multiplying by the weight before the cast moves ~25% of the elements
    by an ulp, which no logits tolerance notices. The inputs are multiples of 1/16 up to 8, so the fp32
    sum of squares is exact in any order (1000 * 128^2 < 2^24 multiples of 2^-8): the two
    implementations may reduce differently, only the rounding order can tell them apart."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    dim, eps = 1000, 1e-5
    hidden = (torch.randint(-64, 65, (2, 5, dim), generator=g) / 16).to(dtype)
    weight = (torch.randn(dim, generator=g) * 4).to(dtype)  # not near 1: the product's rounding matters
    hf_norm = LlamaRMSNorm(dim, eps=eps).to(dtype)
    hf_norm.weight.copy_(weight)
    ref = hf_norm(hidden)

    norm = RMSNorm(dim, eps).to(dtype)
    norm.weight.copy_(weight)
    out = norm(hidden)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    # the check has teeth: the other rounding order differs in many elements of these inputs
    h32 = hidden.float()
    wrong_order = (weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps))).to(dtype)
    assert (wrong_order != ref).float().mean() > 0.1


# --- static KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_incremental_decode_matches_full_forward(tiny, variant):
    _, hf, model = tiny(variant)
    tokens = random_tokens(2, 40, seed=2)
    full = hf(tokens).logits  # transformers' cache-free forward

    model.setup_cache(max_batch_size=2, max_seq_len=64)
    steps = [model(tokens[:, :8], input_pos=torch.arange(8))]
    for t in range(8, 40):
        steps.append(model(tokens[:, t : t + 1], input_pos=torch.tensor([t])))
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4


@torch.no_grad()
def test_chunked_prefill_matches_full_forward(tiny):
    _, hf, model = tiny("llama3.1-scaled")
    tokens = random_tokens(3, 48, seed=3)
    full = hf(tokens).logits  # transformers' cache-free forward

    model.setup_cache(max_batch_size=4, max_seq_len=64)  # a batch smaller than the cache is fine too
    chunks, start = [], 0
    for size in (5, 11, 1, 16, 15):
        pos = torch.arange(start, start + size)
        chunks.append(model(tokens[:, start : start + size], input_pos=pos))
        start += size
    assert start == 48
    assert max_diff(torch.cat(chunks, dim=1), full) <= 1e-4


@torch.no_grad()
def test_ragged_batch_rows_compute_what_they_would_alone(tiny):
    """Right-padded prompts of different lengths, prefilled together and then decoded with a per-row
    (B, 1) input_pos: each row's logits equal that row run alone, cache-free, by transformers, whatever the
    padding holds."""
    _, hf, model = tiny("llama3-gqa")
    lengths = [30, 17, 9]
    prompts = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    padded = random_tokens(len(lengths), T, seed=99)  # padding is garbage, not zeros, and must not matter
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p

    model.setup_cache(max_batch_size=3, max_seq_len=64)
    last = torch.tensor(lengths) - 1
    prefill = model(padded, input_pos=torch.arange(T), logits_pos=last)  # (B, 1, vocab)
    assert prefill.shape == (3, 1, VOCAB)
    seqs = [p.clone() for p in prompts]
    for i, s in enumerate(seqs):
        alone = hf(s[None]).logits
        assert max_diff(prefill[i, 0], alone[0, -1]) <= 1e-4

    next_pos = torch.tensor(lengths)
    for step in range(4):
        new = random_tokens(3, 1, seed=200 + step)
        logits = model(new, input_pos=next_pos[:, None])  # row b writes and reads at its own position
        for i in range(3):
            seqs[i] = torch.cat([seqs[i], new[i]])
            assert max_diff(logits[i, 0], hf(seqs[i][None]).logits[0, -1]) <= 1e-4, (step, i)
        next_pos += 1


@torch.no_grad()
def test_logits_pos_selects_one_position_per_row(tiny):
    _, hf, model = tiny("llama3.2-tied")
    tokens = random_tokens(3, 20, seed=4)
    full = hf(tokens).logits
    pos = torch.tensor([19, 0, 7])
    picked = model(tokens, logits_pos=pos)
    assert picked.shape == (3, 1, VOCAB)
    assert max_diff(picked[:, 0], full[torch.arange(3), pos]) <= 1e-4
    last = model(tokens, logits_pos=torch.full((3,), 19))
    assert max_diff(last[:, 0], full[:, -1]) <= 1e-4


@torch.no_grad()
def test_forward_without_input_pos_leaves_the_cache_alone(tiny):
    _, _, model = tiny("llama3-gqa")
    tokens = random_tokens(2, 12, seed=5)
    before = model(tokens)
    model.setup_cache(2, 32)
    model(tokens[:, :6], input_pos=torch.arange(6))
    cached = [layer.attention.cache.k.clone() for layer in model.layers]
    assert max_diff(model(tokens), before) == 0.0  # cache-free forward, even with a cache allocated
    for layer, k in zip(model.layers, cached, strict=True):
        assert torch.equal(layer.attention.cache.k, k)


def test_cache_misuse_is_reported():
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=48, max_seq_len=16)
    )
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        model.setup_cache(1, 17)


# --- ModelArgs, presets and config readers ------------------------------------------------------

# docs/llama3-facts.md's table (from the official config.json files): dim, layers, heads, kv heads, ffn, tied, context
PUBLISHED_SHAPES = {
    "llama-3-8b": (4096, 32, 32, 8, 14336, False, 8192),
    "llama-3-70b": (8192, 80, 64, 8, 28672, False, 8192),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, False, 131072),
    "llama-3.1-70b": (8192, 80, 64, 8, 28672, False, 131072),
    "llama-3.1-405b": (16384, 126, 128, 8, 53248, False, 131072),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, True, 131072),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, True, 131072),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_presets_have_the_published_shapes(name):
    a = ModelArgs.from_name(name)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.tie_embeddings, a.max_seq_len) == (
        PUBLISHED_SHAPES[name]
    )
    assert (a.vocab_size, a.rope_theta, a.norm_eps) == (128256, 500000.0, 1e-5)
    expected_factor = {"3": None, "3.1": 8.0, "3.2": 32.0}[name.split("-")[1]]
    assert (a.rope_scaling.factor if a.rope_scaling else None) == expected_factor


def test_llama3_8b_has_8_030_261_248_parameters():
    assert ModelArgs.from_name("llama-3-8b").num_params() == 8_030_261_248
    assert ModelArgs.from_name("meta-llama/Meta-Llama-3-8B-Instruct").num_params() == 8_030_261_248


@pytest.mark.parametrize("name", ["llama-3-155m", *sorted(PUBLISHED_SHAPES)])
def test_num_params_counts_the_modules_parameters(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ModelArgs.from_name(name)
    with torch.device("meta"):  # no memory: even 405B is free to build here
        model = Transformer(args)
        hf = LlamaForCausalLM(LlamaConfig(**args.to_hf_config()))
    assert sum(p.numel() for p in model.parameters()) == args.num_params()  # a tied weight counts once
    assert sum(p.numel() for p in hf.parameters()) == args.num_params()  # and transformers counts the same
    assert (model.output.weight is model.tok_embeddings.weight) == args.tie_embeddings


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model name 'llama-4-8b'.*llama-3-8b"):
        ModelArgs.from_name("llama-4-8b")


# config.json as the official repos ship them, written by transformers 4.4x (top-level rope_theta/rope_scaling)
HF4_LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
HF4_LLAMA_3_1_8B = {
    **HF4_LLAMA_3_8B,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "transformers_version": "4.43.0.dev0",
}
HF4_LLAMA_3_2_1B = {
    **HF4_LLAMA_3_1_8B,
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.45.0.dev0",
}
HF4_CONFIGS = {"llama-3-8b": HF4_LLAMA_3_8B, "llama-3.1-8b": HF4_LLAMA_3_1_8B, "llama-3.2-1b": HF4_LLAMA_3_2_1B}


@pytest.mark.parametrize("name", sorted(HF4_CONFIGS))
def test_from_hf_config_reads_transformers_4_and_5_layouts(name):
    from transformers import LlamaConfig

    hf4 = HF4_CONFIGS[name]
    hf5 = LlamaConfig.from_dict(hf4).to_dict()  # transformers 5 rewrites it: rope_parameters, no rope_theta
    assert "rope_parameters" in hf5 and "rope_theta" not in hf5 and not hf5.get("rope_scaling")
    preset = ModelArgs.from_name(name)
    assert ModelArgs.from_hf_config(hf4) == preset
    assert ModelArgs.from_hf_config(hf5) == preset


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_hf_config_reads_save_pretrained_output(tiny_hf, variant):
    path, hf = tiny_hf(variant)
    c = hf.config
    args = ModelArgs.from_hf_config(path / "config.json")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size) == (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    )
    assert args.rope_theta == c.rope_parameters["rope_theta"] == 500000.0
    assert args.tie_embeddings == c.tie_word_embeddings
    assert (args.rope_scaling is not None) == ("rope_scaling" in TINY_CONFIGS[variant])


# --- RoPE frequencies ---------------------------------------------------------------------------


def meta_apply_scaling(freqs: list[float], s: RopeScaling) -> list[float]:
    """llama-models' `apply_scaling`, transcribed, in float64."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


ROPE_CASES = {
    "llama-3-8b": ModelArgs.from_name("llama-3-8b"),
    "llama-3.1-8b": ModelArgs.from_name("llama-3.1-8b"),
    "llama-3.2-1b": ModelArgs.from_name("llama-3.2-1b"),
    # short original context: every band (kept, blended, divided) is populated at head_dim 16 (asserted below)
    "tiny-scaled": ModelArgs(
        dim=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=1,
        ffn_dim=96,
        vocab_size=VOCAB,
        rope_scaling=RopeScaling(original_max_position_embeddings=64),
        max_seq_len=256,
    ),
}


def transformers_inv_freq(args: ModelArgs) -> torch.Tensor:
    """transformers' inverse frequencies for the same config (LlamaRotaryEmbedding's init functions)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    s = args.rope_scaling
    config = LlamaConfig(
        hidden_size=args.dim,
        num_attention_heads=args.n_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        rope_scaling=None if s is None else {"rope_type": "llama3", **dataclasses.asdict(s)},
    )
    if s is None:
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    return ROPE_INIT_FUNCTIONS["llama3"](config, device="cpu")[0]


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_inv_freq_matches_transformers_and_meta_formula(case):
    args = ROPE_CASES[case]
    s = args.rope_scaling
    ours = rope_inv_freq(args)
    assert ours.dtype == torch.float32 and ours.shape == (args.head_dim // 2,)
    assert torch.equal(ours, transformers_inv_freq(args))  # same fp32 ops: bit for bit

    hd = args.head_dim
    published = [args.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]
    if s is not None:
        bands = llama3_rope_bands(hd, args.rope_theta, dataclasses.asdict(s))
        assert all(bands.values()), {band: len(freqs) for band, freqs in bands.items()}  # every branch is used
        published = meta_apply_scaling(published, s)
        assert published != [args.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]  # scaling did something
    published = torch.tensor(published, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), published, rtol=1e-5, atol=0)


def test_to_bfloat16_keeps_rope_frequencies_fp32():
    torch.manual_seed(0)
    args = ROPE_CASES["tiny-scaled"]
    model = Transformer(args).to(torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, transformers_inv_freq(args))
    model.to(torch.float16).to(torch.float32)
    assert torch.equal(model.inv_freq, transformers_inv_freq(args))


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3.1-70b", "llama-3.2-1b", "llama-3.2-3b"])
def test_to_hf_config_round_trips_through_transformers(name):
    from transformers import LlamaConfig

    args = ModelArgs.from_name(name)
    config = LlamaConfig(**args.to_hf_config()).to_dict()
    assert (config["hidden_size"], config["num_key_value_heads"]) == (args.dim, args.n_kv_heads)
    assert ModelArgs.from_hf_config(config) == args
