"""Model hyper-parameters: `ModelArgs`, its named presets, and readers for HF and Meta configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama3.checks import ConfigError, _is_int, _is_real, read_json_object


@dataclass
class RopeScaling:
    """Llama 3.1's frequency scaling (`rope_type: "llama3"`), as in Meta's `apply_scaling`."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336  # hidden size of the SwiGLU feed-forward
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192  # the model's context length
    tie_embeddings: bool = False
    head_dim: int | None = None  # dim // n_heads unless a config says otherwise
    # "rope", or "none": no position signal at all (NoPE, Kazemnejad et al. 2023), an architecture variant for
    # pretraining experiments (docs/pretraining.md); transformers' Llama knows only RoPE
    position_embedding: str = "rope"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len", "head_dim"):
            value = getattr(self, name)
            if not (value is None and name == "head_dim") and not _is_int(value, low=1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"position_embedding must be one of {', '.join(POSITION_EMBEDDINGS)}, got {self.position_embedding!r}"
            )

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        """A preset by name, e.g. "llama-3-8b", "llama-3.1-70b", "llama-3.2-1b" (case-insensitive)."""
        key = name.lower().replace("meta-llama/", "").replace("meta-", "").replace("_", "-")
        key = key.removesuffix("-instruct")
        if key not in PRESETS:
            raise ConfigError(f"unknown model name {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[key])

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> ModelArgs:
        """From a transformers `config.json` (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        source = "config.json"
        if not isinstance(config, dict):
            source, config = str(config), read_json_object(Path(config))
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"{source}: not a Llama model: model_type={model_type!r}, architectures={archs!r} "
                "(expected model_type 'llama' and LlamaForCausalLM)"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in config:
                raise ConfigError(f"{source} is missing {key!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {config['hidden_act']!r} (Llama uses 'silu')")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias are not part of Llama 3 and are not supported")
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        _check_numbers(
            {**config, "rope_theta": theta},
            source,
            ints=(
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
                "head_dim",
            ),
            positives=("rms_norm_eps", "rope_theta"),
        )
        n_heads = config["num_attention_heads"]
        return _build(
            cls,
            source,
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config.get("vocab_size", 128256),
            ffn_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(config.get("rope_scaling") or rope, source),
            max_seq_len=config.get("max_position_embeddings", 8192),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            position_embedding=config.get("position_embedding", "rope"),
        )

    @classmethod
    def from_meta_params(cls, params: dict[str, Any] | str | Path) -> ModelArgs:
        """From Meta's `params.json` (ffn size derived as in Meta's `FeedForward`)."""
        source = "params.json"
        if not isinstance(params, dict):
            source, params = str(params), read_json_object(Path(params))
        for key in ("dim", "n_layers", "n_heads"):
            if key not in params:
                raise ConfigError(f"{source} is missing {key!r}")
        _check_numbers(
            params,
            source,
            ints=("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"),
            positives=("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"),
        )
        vocab = params.get("vocab_size", -1)
        if vocab is None or (vocab != -1 and not _is_int(vocab, low=1)):
            raise ConfigError(f"{source}: vocab_size must be a positive integer (or -1), got {vocab!r}")
        dim, n_heads = params["dim"], params["n_heads"]
        hidden = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            # Meta's reference hard-codes factor 8 for 3.1; 3.2 1B/3B ship `rope_scaling_factor: 32`.
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
        return _build(
            cls,
            source,
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=vocab if vocab > 0 else 128256,
            ffn_dim=hidden,
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=131072 if scaling else 8192,
            tie_embeddings=bool(params.get("tie_embeddings", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hugging Face Llama checkpoint of this model holds, with its shape."""
        D, H, KVH = self.head_dim, self.n_heads, self.n_kv_heads
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.dim), "model.norm.weight": (self.dim,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.dim)
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "self_attn.q_proj.weight": (H * D, self.dim),
                p + "self_attn.k_proj.weight": (KVH * D, self.dim),
                p + "self_attn.v_proj.weight": (KVH * D, self.dim),
                p + "self_attn.o_proj.weight": (self.dim, H * D),
                p + "mlp.gate_proj.weight": (self.ffn_dim, self.dim),
                p + "mlp.up_proj.weight": (self.ffn_dim, self.dim),
                p + "mlp.down_proj.weight": (self.dim, self.ffn_dim),
                p + "input_layernorm.weight": (self.dim,),
                p + "post_attention_layernorm.weight": (self.dim,),
            }
        return shapes

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers `LlamaConfig` keyword arguments for this model (the inverse of `from_hf_config`).
        A variant's `position_embedding` is written only when it is not RoPE (transformers ignores the key)."""
        s = self.rope_scaling
        variant = {} if self.position_embedding == "rope" else {"position_embedding": self.position_embedding}
        return variant | dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.ffn_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None if s is None else {"rope_type": "llama3", **dataclasses.asdict(s)},
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_embeddings,
        )

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        ffn = 3 * self.dim * self.ffn_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + self.dim + emb * (1 if self.tie_embeddings else 2)


POSITION_EMBEDDINGS = ("rope", "none")


def _rope_scaling(scaling: Any, source: str) -> RopeScaling | None:
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (supported: 'default', 'llama3')")
    if "factor" not in scaling:
        raise ConfigError(f"{source}: llama3 rope scaling needs a 'factor'")
    _check_numbers(
        scaling,
        source,
        ints=("original_max_position_embeddings",),
        positives=("factor", "low_freq_factor", "high_freq_factor"),
    )
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _check_numbers(config: dict[str, Any], source: str, ints: tuple[str, ...], positives: tuple[str, ...]) -> None:
    """Each key present (and not null) must hold a positive integer (`ints`) or a positive finite number."""
    for key in ints:
        if config.get(key) is not None and not _is_int(config[key], low=1):
            raise ConfigError(f"{source}: {key} must be a positive integer, got {config[key]!r}")
    for key in positives:
        if key in config and config[key] is not None and not (_is_real(config[key]) and config[key] > 0):
            raise ConfigError(f"{source}: {key} must be a positive number, got {config[key]!r}")


def _build(cls: type[ModelArgs], source: str, **fields: Any) -> ModelArgs:
    try:
        return cls(**fields)
    except ConfigError as e:  # a consistency check across fields (heads, head_dim): say which file
        raise ConfigError(f"{source}: {e}") from None


_L3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, n_kv_heads=8)


_SCALED = dict(rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072)


PRESETS: dict[str, ModelArgs] = {
    "llama-3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, max_seq_len=8192, **_L3),
    "llama-3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672, max_seq_len=8192, **_L3),
    "llama-3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, **_SCALED, **_L3),
    "llama-3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672, **_SCALED, **_L3),
    "llama-3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, ffn_dim=53248, **_SCALED, **_L3),
    "llama-3.2-1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        ffn_dim=8192,
        tie_embeddings=True,
        max_seq_len=131072,
        rope_scaling=RopeScaling(factor=32.0),
        **_L3,
    ),
    "llama-3.2-3b": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        ffn_dim=8192,
        tie_embeddings=True,
        max_seq_len=131072,
        rope_scaling=RopeScaling(factor=32.0),
        **_L3,
    ),
    # Not a released model: the Llama-3-shaped 155M config the CPU benchmarks use (docs/llama3-facts.md).
    "llama-3-155m": ModelArgs(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=1536,
        vocab_size=128256,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}
