from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from llama3.checks import CheckpointError, read_json_object
from llama3.model.config import ModelArgs
from llama3.weights.safetensors import HFTensors

# Meta's original names -> HF names; q/k additionally need the RoPE permutation (see _meta_to_hf).
_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


# How Meta's model-parallel shards split each tensor: column-parallel along 0, row-parallel along 1.
# Llama 3's embedding is a VocabParallelEmbedding (split by vocabulary, as transformers' conversion
# script merges it: concat_dim 0 for Llama 3); Llama 2's ParallelEmbedding split it along dim 1.
_META_SHARD_DIM = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 0,
}


def _open_meta(path: Path) -> tuple[ModelArgs, HFTensors, int]:
    params = read_json_object(path / "params.json", CheckpointError)
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth shard files")
    numbers = [int(re.search(r"consolidated\.(\d+)\.pth", s.name).group(1)) for s in shards]
    if numbers != list(range(len(shards))):
        raise CheckpointError(f"{path}: shard files are not consolidated.00..{len(shards) - 1:02d}.pth: {numbers}")
    states = [_load_meta_shard(s) for s in shards]
    if params.get("vocab_size", -1) == -1 and "tok_embeddings.weight" in states[0]:  # -1: "from the tokenizer"
        params["vocab_size"] = sum(s["tok_embeddings.weight"].shape[0] for s in states)  # split by vocabulary
    args = ModelArgs.from_meta_params(params)
    if "output.weight" not in states[0]:
        args.tie_embeddings = True

    def merged(name: str) -> Tensor:
        parts = [s[name] for s in states]
        if len(parts) == 1 or parts[0].dim() == 1:  # norms are replicated on every shard
            return parts[0]
        kind = name.split(".")[-2]
        if kind not in _META_SHARD_DIM:
            raise CheckpointError(f"{path}: do not know how to merge sharded tensor {name!r}")
        return torch.cat(parts, dim=_META_SHARD_DIM[kind])

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name in states[0]:
            if name.endswith("rope.freqs"):  # Meta's recomputable buffer, not a weight
                continue
            yield _meta_to_hf(name, merged(name), args)

    return args, tensors, len(states[0])


def _load_meta_shard(path: Path) -> dict[str, Tensor]:
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save has written a zip archive since PyTorch 1.6
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save's files are zip archives)")
    # mmap keeps the shards on disk until each tensor is needed; weights_only refuses arbitrary pickles
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line), str(e))
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors, and checkpoints are unpickled with "
            f"weights_only=True so that loading one cannot run code ({reason})"
        ) from None
    except RuntimeError as e:  # torch's zip reader: a truncated or damaged archive
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def permute_meta_to_hf(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Meta's interleaved RoPE pairs (x[2i], x[2i+1]) -> HF's rotate-half pairs (x[i], x[i + D/2]), per head."""
    rows = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rows).transpose(1, 2).reshape(n_heads * head_dim, *rows)


def _meta_to_hf(name: str, t: Tensor, args: ModelArgs) -> tuple[str, Tensor]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    key = m.group(2) if m else name
    if key not in _META_TO_HF:
        return name, t  # reported as unexpected by build_model
    if key == "attention.wq.weight":
        t = permute_meta_to_hf(t, args.n_heads, args.head_dim)
    elif key == "attention.wk.weight":
        t = permute_meta_to_hf(t, args.n_kv_heads, args.head_dim)
    hf = _META_TO_HF[key]
    return (f"model.layers.{m.group(1)}.{hf}" if m else hf), t
