"""Checkpoint loading: every format gives transformers' logits, every broken input a named error.

Meta-format checkpoints are written here from a transformers one by undoing the q/k permutation of
transformers' `convert_llama_weights_to_hf.py`, so loading them back must reproduce transformers' logits.
That the writer is right is checked against two sources outside this file: transformers' own copy of the
permutation (its GGUF loader's, as the conversion script is not shipped in transformers 5), and Meta's own
reference model (llama-models' `llama3/model.py`), which must load the written files and give the same logits.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import pathlib
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama3.checks import CheckpointError, ConfigError
from llama3.model.backends import CpuOps
from llama3.model.config import ModelArgs
from llama3.model.transformer import Transformer

VOCAB = 512
INIT = 0.1  # sharper attention than transformers' 0.02, so RoPE and q/k order show in the logits


def random_tokens(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(path: Path, hf, atol: float = 1e-4) -> Transformer:
    """Loads `path` in fp32 and compares with the transformers model on the same tokens."""
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    tokens = random_tokens()
    diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= atol, f"max abs logit difference {diff}"
    return model


# --- Hugging Face safetensors -------------------------------------------------------------------


def test_single_file_checkpoint_loads(tiny_hf):
    path, hf = tiny_hf("llama3-gqa", initializer_range=INIT)
    assert (path / "model.safetensors").exists()
    assert_same_logits(path, hf)


def test_sharded_checkpoint_loads(tmp_path):
    from conftest import save_tiny_hf

    hf = save_tiny_hf(tmp_path, initializer_range=INIT, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_logits(tmp_path, hf)


def test_tied_checkpoint_shares_one_embedding(tiny_hf):
    path, hf = tiny_hf("llama3.2-tied", initializer_range=INIT)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = assert_same_logits(path, hf)
    assert model.output.weight is model.tok_embeddings.weight


def test_defaults_are_cpu_and_bfloat16_without_a_gpu(tiny_hf, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = tiny_hf()
    model = Transformer.from_pretrained(path)
    weights = list(model.parameters())
    assert {p.device.type for p in weights} == {"cpu"}
    assert {p.dtype for p in weights} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    assert model.ops is CpuOps
    assert not model.training


def test_model_is_built_on_the_meta_device(tiny_hf, monkeypatch):
    """No random-initialised copy on a real device first: tensors are materialised once, from the file."""
    seen = []
    init = Transformer.__init__

    def recording_init(self, args):
        init(self, args)
        seen.append(self.tok_embeddings.weight.device.type)

    monkeypatch.setattr(Transformer, "__init__", recording_init)
    path, _ = tiny_hf()
    Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert seen == ["meta"]


@pytest.mark.parametrize("dtype", ["bf16", "float16", torch.float32])
def test_dtype_argument(tiny_hf, dtype):
    path, _ = tiny_hf()
    model = Transformer.from_pretrained(path, device="cpu", dtype=dtype)
    expected = {"bf16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


# --- Meta's consolidated.NN.pth -------------------------------------------------------------------


def hf_to_meta_permutation(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of convert_llama_weights_to_hf.py's `permute`, per head: rotate-half pairs -> interleaved
    pairs. Checked against transformers' own permutation and Meta's reference model below."""
    dim = w.shape[1]
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


class _SingleRankLinear(torch.nn.Linear):
    """fairscale's Column/RowParallelLinear on one rank: a plain linear layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **parallel_options):
        super().__init__(in_features, out_features, bias=bias)


class _SingleRankEmbedding(torch.nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, **parallel_options):
        super().__init__(num_embeddings, embedding_dim)


@functools.cache
def meta_reference() -> types.ModuleType:
    """Meta's own Llama 3 model code: llama-models' `llama3/model.py` (the package the tokenizer file comes
    from). It imports fairscale's model-parallel layers, which are not installed: they are stood in for by
    plain layers on a single rank while the file is imported, and removed from sys.modules afterwards."""
    spec = importlib.util.find_spec("llama_models")  # found, not imported: its __init__ needs more packages
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llama-models package is missing; run the README's setup command")
    stubs = {
        name: types.ModuleType(name)
        for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel")
        + ("fairscale.nn.model_parallel.initialize", "fairscale.nn.model_parallel.layers")
    }
    for name, module in stubs.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stubs[parent], child, module)
    stubs["fairscale.nn.model_parallel.initialize"].get_model_parallel_world_size = lambda: 1
    layers = stubs["fairscale.nn.model_parallel.layers"]
    layers.ColumnParallelLinear = layers.RowParallelLinear = _SingleRankLinear
    layers.VocabParallelEmbedding = _SingleRankEmbedding
    package = types.ModuleType("_meta_llama3")  # llama_models/llama3 as a package whose __init__ is not run
    package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "llama3")]
    added = {**stubs, "_meta_llama3": package}
    assert not set(added) & set(sys.modules), "fairscale already imported: these stand-ins would shadow it"
    sys.modules.update(added)
    try:
        return importlib.import_module("_meta_llama3.model")
    finally:
        for name in [*added, "_meta_llama3.args", "_meta_llama3.model"]:
            sys.modules.pop(name, None)


def meta_ffn_dim(params: dict) -> int:
    """The hidden size of Meta's own FeedForward for these params.json values (built on the meta device)."""
    with torch.device("meta"):
        ffn = meta_reference().FeedForward(
            params["dim"], 4 * params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")
        )
    return ffn.w1.weight.shape[0]


def hf_to_meta_state(hf) -> dict[str, torch.Tensor]:
    c = hf.config
    hd = c.hidden_size // c.num_attention_heads
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"layers.{i}.attention.wq.weight": hf_to_meta_permutation(
                sd[p + "self_attn.q_proj.weight"], c.num_attention_heads, hd
            ),
            f"layers.{i}.attention.wk.weight": hf_to_meta_permutation(
                sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads, hd
            ),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    return out


def meta_params(hf, **extra) -> dict:
    c = hf.config
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.5,  # int(2 * 4 * 64 / 3) = 170 -> 85 -> rounded up to 96
        **extra,
    }
    assert meta_ffn_dim(params) == c.intermediate_size
    return params


# Meta's model-parallel layout: column-parallel weights split their rows, row-parallel ones their columns.
# Llama 3's embedding is a VocabParallelEmbedding (Meta's llama3 model.py): split along the vocabulary, as
# transformers' conversion script merges it (`concat_dim = 0` for Llama 3; Llama 2 split the other way).
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 0}


def write_meta(path: Path, hf, n_shards: int = 1, **params) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(meta_params(hf, **params)))
    state = hf_to_meta_state(hf)
    for r in range(n_shards):
        shard = {}
        for name, t in state.items():
            if t.dim() == 1:  # norms: replicated on every rank
                shard[name] = t.clone()
            else:
                shard[name] = t.chunk(n_shards, dim=SHARD_DIM[name.split(".")[-2]])[r].clone()
        torch.save(shard, path / f"consolidated.{r:02d}.pth")


@pytest.mark.parametrize("variant", ["llama3-gqa", "mqa", "mha"])
def test_meta_writer_inverts_transformers_permutation(tiny_hf, variant):
    """transformers' own interleaved -> rotate-half permutation turns the wq/wk written here back into
    q_proj/k_proj exactly. transformers 5 no longer ships convert_llama_weights_to_hf.py; its GGUF loader
    undoes the same permutation (GGUF keeps Meta's interleaved q/k order; the code is llama.cpp's)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    _, hf = tiny_hf(variant)
    c = hf.config
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads}
    )
    meta, theirs = hf_to_meta_state(hf), hf.state_dict()
    for i in range(c.num_hidden_layers):
        for meta_name, gguf_name, hf_name in (("wq", "attn_q", "q_proj"), ("wk", "attn_k", "k_proj")):
            written = meta[f"layers.{i}.attention.{meta_name}.weight"]
            back = processor.process(written.numpy(), f"blk.{i}.{gguf_name}.weight").weights
            expected = theirs[f"model.layers.{i}.self_attn.{hf_name}.weight"]
            assert torch.equal(torch.from_numpy(back), expected), (i, meta_name)
            assert not torch.equal(written, expected)  # the permutation is not the identity


@pytest.mark.parametrize("variant", ["llama3-gqa", "mqa", "mha"])
@torch.no_grad()
def test_metas_reference_model_reads_the_written_checkpoint_like_transformers(tiny_hf, tmp_path, variant):
    """Meta's own model (interleaved-pair RoPE in complex numbers: no permutation anywhere) loads the files
    written here, strictly, and gives transformers' logits; so does our loader."""
    meta_model = meta_reference()
    _, hf = tiny_hf(variant, initializer_range=INIT)
    write_meta(tmp_path / "meta", hf)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    reference = meta_model.Transformer(meta_model.ModelArgs(**params, max_batch_size=2, max_seq_len=64))
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    reference.load_state_dict(state, strict=True)

    tokens = random_tokens()
    metas = reference(tokens, 0)
    assert (metas - hf(tokens).logits).abs().max() <= 1e-4
    ours = Transformer.from_pretrained(tmp_path / "meta", device="cpu", dtype=torch.float32)
    assert (ours(tokens) - metas).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["llama3-gqa", "mqa", "mha", "llama3.2-tied"])
def test_meta_checkpoint_loads(tiny_hf, tmp_path, variant):
    _, hf = tiny_hf(variant, initializer_range=INIT)
    write_meta(tmp_path / "meta", hf)
    model = assert_same_logits(tmp_path / "meta", hf)
    assert model.args.tie_embeddings == hf.config.tie_word_embeddings


def test_meta_checkpoint_in_original_subfolder_loads(tiny_hf, tmp_path):
    _, hf = tiny_hf(initializer_range=INIT)
    write_meta(tmp_path / "repo" / "original", hf)  # the layout of the official HF repos' original/ folder
    assert_same_logits(tmp_path / "repo", hf)


@pytest.mark.parametrize("vocab_size", [VOCAB, -1])  # -1: Meta's "as many as the embedding has rows"
def test_model_parallel_meta_shards_merge(tiny_hf, tmp_path, vocab_size):
    _, hf = tiny_hf("llama3-gqa", initializer_range=INIT)  # 2 kv heads: one per rank
    write_meta(tmp_path / "meta", hf, n_shards=2, vocab_size=vocab_size)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard["tok_embeddings.weight"].shape == (VOCAB // 2, 64)
    assert_same_logits(tmp_path / "meta", hf)


@pytest.mark.parametrize("factor", [8.0, 32.0])
@torch.no_grad()
def test_meta_use_scaled_rope(tiny_hf, tmp_path, factor):
    """params.json's `use_scaled_rope` is Meta's apply_scaling: factor 8 (3.1) unless
    `rope_scaling_factor` says otherwise (3.2), low/high 1/4, original context 8192."""
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    _, hf = tiny_hf("llama3-gqa", initializer_range=INIT, rope_scaling=rope, max_position_embeddings=131072)
    extra = {"use_scaled_rope": True} | ({"rope_scaling_factor": factor} if factor != 8.0 else {})
    write_meta(tmp_path / "scaled", hf, **extra)
    model = assert_same_logits(tmp_path / "scaled", hf)
    assert model.args.rope_scaling.factor == factor and model.args.max_seq_len == 131072

    write_meta(tmp_path / "unscaled", hf)  # the same weights without scaling must give other logits
    unscaled = Transformer.from_pretrained(tmp_path / "unscaled", device="cpu", dtype=torch.float32)
    tokens = random_tokens()
    assert (unscaled(tokens) - hf(tokens).logits).abs().max() > 1e-2


# --- errors a user can act on -------------------------------------------------------------------


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json .*params.json .*gguf"):
        Transformer.from_pretrained(tmp_path, device="cpu")


def test_config_without_weights(tiny_hf):
    path, _ = tiny_hf()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        Transformer.from_pretrained(path, device="cpu")


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Transformer.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_missing_shard_file_is_named(tmp_path):
    from conftest import save_tiny_hf

    save_tiny_hf(tmp_path, max_shard_size="50KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard files {victim.name}"):
        Transformer.from_pretrained(tmp_path, device="cpu")


def rewrite_weights(path: Path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_hf):
    path, _ = tiny_hf()
    rewrite_weights(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(path, device="cpu")


def test_missing_lm_head_of_untied_model_is_named(tiny_hf):
    path, _ = tiny_hf()
    rewrite_weights(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight"):
        Transformer.from_pretrained(path, device="cpu")


def test_unexpected_tensor_is_named(tiny_hf):
    path, _ = tiny_hf()
    rewrite_weights(path, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.q_proj\.bias"):
        Transformer.from_pretrained(path, device="cpu")


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_hf):
    path, _ = tiny_hf()
    rewrite_weights(path, lambda s: s.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 95)}))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 95\), expected \(64, 96\)"
    ):
        Transformer.from_pretrained(path, device="cpu")


def test_integer_tensor_is_refused(tiny_hf):
    path, _ = tiny_hf()
    rewrite_weights(path, lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype torch\.int32"):
        Transformer.from_pretrained(path, device="cpu")


@pytest.mark.parametrize(
    ("dtype", "message"),
    [(torch.int8, "unsupported dtype torch.int8"), (torch.float64, "unsupported dtype torch.float64"),
     ("float64", "unsupported dtype 'float64'")],
)  # fmt: skip
def test_unsupported_dtype_argument(tiny_hf, dtype, message):
    path, _ = tiny_hf()
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(path, device="cpu", dtype=dtype)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not a Llama model: model_type='mistral'"),
        ({"architectures": ["GPT2LMHeadModel"]}, r"not a Llama model: .*GPT2LMHeadModel"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_non_llama_config_is_refused(tiny_hf, changes, message):
    path, _ = tiny_hf()
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=message):
        Transformer.from_pretrained(path, device="cpu")


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}},  # transformers 5.x
        {"rope_parameters": None, "rope_theta": 500000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},  # 4.x
    ],
)
def test_unknown_rope_type_is_refused(tiny_hf, changes):
    path, _ = tiny_hf()
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match="unsupported rope scaling type 'yarn'"):
        Transformer.from_pretrained(path, device="cpu")


def test_transformers_4_config_json_loads(tiny_hf):
    """The same weights under a config.json in the 4.x layout (top-level rope_theta and rope_scaling)."""
    path, hf = tiny_hf("llama3.1-scaled", initializer_range=INIT)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(config))
    assert_same_logits(path, hf)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a local path
    return cache


def test_uncached_repo_id_offline_is_file_not_found(empty_hub_cache):
    with pytest.raises(FileNotFoundError, match=r"acme/no-such-llama .*offline mode: HF_HUB_OFFLINE=1"):
        Transformer.from_pretrained("acme/no-such-llama", device="cpu")


def test_cached_repo_id_loads_offline(empty_hub_cache, tmp_path):
    from conftest import save_tiny_hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--acme--tiny-llama"
    hf = save_tiny_hf(repo / "snapshots" / commit, initializer_range=INIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert_same_logits("acme/tiny-llama", hf)


def test_meta_pickle_with_code_is_refused(tiny_hf, tmp_path):
    """consolidated.*.pth are unpickled with weights_only=True: a file cannot run code when loaded."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    _, hf = tiny_hf()
    write_meta(tmp_path / "meta", hf)
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    state["extra"] = Payload()
    torch.save(state, tmp_path / "meta" / "consolidated.00.pth")

    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused: .*weights_only=True"):
        Transformer.from_pretrained(tmp_path / "meta", device="cpu")
    assert not marker.exists()
    torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=False)  # the payload is real:
    assert marker.exists()  # an unrestricted unpickler would have run it


def test_meta_shard_numbering_gap_is_reported(tiny_hf, tmp_path):
    _, hf = tiny_hf()
    write_meta(tmp_path / "meta", hf, n_shards=2)
    (tmp_path / "meta" / "consolidated.01.pth").rename(tmp_path / "meta" / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"not consolidated\.00\.\.01\.pth: \[0, 2\]"):
        Transformer.from_pretrained(tmp_path / "meta", device="cpu")


def test_meta_params_derive_ffn_dim_like_meta():
    """The released 8B/70B/405B params.json (multiple_of, ffn_dim_multiplier) give the published ffn sizes."""
    released = {
        "llama-3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                       "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
        "llama-3-70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                        "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
        "llama-3.1-405b": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128256,
                           "multiple_of": 4096, "ffn_dim_multiplier": 1.2, "norm_eps": 1e-05,
                           "rope_theta": 500000.0, "use_scaled_rope": True},
    }  # fmt: skip
    for name, params in released.items():
        assert ModelArgs.from_meta_params(params) == ModelArgs.from_name(name), name
        assert meta_ffn_dim(params) == ModelArgs.from_name(name).ffn_dim
    assert math.isclose(ModelArgs.from_meta_params(released["llama-3.1-405b"]).rope_scaling.factor, 8.0)


@pytest.mark.parametrize("keep", [4, 100, -64])
def test_truncated_safetensors_is_named(tiny_hf, keep):
    d, _ = tiny_hf("llama3-gqa")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(d, device="cpu", dtype=torch.float32)


def test_bf16_checkpoint_loads_bit_exact(tiny_hf):
    d, hf = tiny_hf("llama3-gqa")
    hf.to(torch.bfloat16).save_pretrained(d)
    ours = Transformer.from_pretrained(d, device="cpu", dtype=torch.bfloat16)
    q, k, v = ours.layers[0].attention.wqkv.weight.split([64, 32, 32])
    assert torch.equal(q, hf.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(v, hf.model.layers[0].self_attn.v_proj.weight)
    assert torch.equal(ours.tok_embeddings.weight, hf.model.embed_tokens.weight)
