"""A model trained here written as a Hugging Face Llama checkpoint: config.json, model.safetensors, tokenizer files.

The tensors get transformers' names, the inverse of `llama3.weights.build` (which fuses q, k, v into `wqkv` and
gate, up into `w13`): no permutation, since our RoPE pairs dimensions the rotate-half way HF checkpoints do.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from llama3.model.transformer import Transformer
from llama3.train.corpus import write_byte_tokenizer
from llama3.weights.save import SIDE_FILES, copy_files, save_safetensors, write_text


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's tensors under transformers' `LlamaForCausalLM` names (contiguous copies)."""
    args, sd = model.args, model.state_dict()
    H, KVH, D = args.n_heads, args.n_kv_heads, args.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(args.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attention.wqkv.weight"].split([H * D, KVH * D, KVH * D])
        gate, up = sd[ours + "feed_forward.w13.weight"].chunk(2)
        out |= {
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": sd[ours + "attention.wo.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": sd[ours + "feed_forward.w2.weight"],
            hf + "input_layernorm.weight": sd[ours + "attention_norm.weight"],
            hf + "post_attention_layernorm.weight": sd[ours + "ffn_norm.weight"],
        }
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def save_pretrained(model: Transformer, output: str | Path, token_ids: dict[str, int] | None = None) -> Path:
    """model.safetensors and config.json (with `token_ids`: bos_token_id, eos_token_id) in `output`."""
    output = Path(output)
    tensors = hf_state_dict(model)
    save_safetensors(tensors, output / "model.safetensors")
    dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config = model.args.to_hf_config() | {"torch_dtype": dtype} | (token_ids or {})
    write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    return output


def write_tokenizer(name: str, output: Path) -> dict[str, int]:
    """The tokenizer files of `name` ("byte", "model" or a checkpoint) in `output`, and a generation_config.json
    for the byte tokenizer (stop at eos); returns the bos/eos ids the files name, for config.json."""
    if name == "byte":
        ids = write_byte_tokenizer(output)
        write_text(output / "generation_config.json", json.dumps(ids, indent=2) + "\n")
        return ids
    if name == "model":
        from llama3.train.merge import _write_gguf_tokenizer
        from llama3.weights.hub import default_model

        return _write_gguf_tokenizer(default_model(), output)
    from llama3.text.tokenizer import _tokenizer_dir

    directory = _tokenizer_dir(name)
    copy_files(directory, output, SIDE_FILES)
    source = directory / "config.json"
    config = json.loads(source.read_text()) if source.is_file() else {}
    return {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}


__all__ = ["hf_state_dict", "save_pretrained", "write_tokenizer"]
