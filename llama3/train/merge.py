"""A merged checkpoint: a float checkpoint with a model's LoRA adapters added into its weights, written in the
Hugging Face layout (`llama3 finetune --merge`), so that it loads without the adapters, here and in transformers.

    save_merged("HuggingFaceTB/SmolLM2-135M-Instruct", model_with_adapters, "out/merged")
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import Tensor, nn

from llama3.model.lora import LoRAError, lora_deltas
from llama3.weights.save import SIDE_FILES, check_output, copy_files, save_safetensors, write_text


def save_merged(src: str | os.PathLike, model: nn.Module, output: str | os.PathLike, progress: bool = True) -> Path:
    """Writes the float checkpoint `src` with `model`'s adapters merged into it, in the Hugging Face layout
    (config.json, model.safetensors, generation_config.json, tokenizer files) to the directory `output`.

    The merge is onto the source's float weights, not onto a quantized copy (the QLoRA recipe): each projection
    is read, gets its update in float32 and is stored in its own dtype (float32 for a GGUF source, whose
    dequantized weights are exact in it). `Llama.from_pretrained(output)` and transformers both load it.
    """
    from llama3.weights.build import gguf_file, open_checkpoint, stored_quantization
    from llama3.weights.hub import resolve

    path, output = resolve(src), Path(output)
    check_output(output, path)
    if stored_quantization(path) is not None:
        raise LoRAError(f"{path} holds quantized weights; merge into the float checkpoint it was made from")
    deltas = lora_deltas(model)
    args, tensors, _ = open_checkpoint(path, progress)
    out: dict[str, Tensor] = {}
    for name, t in tensors():
        if name in deltas:
            t = (t.float() + deltas.pop(name)).to(t.dtype)
        if name == "lm_head.weight" and args.tie_embeddings:
            continue
        out[name] = t.contiguous()
    if deltas:
        raise LoRAError(f"{path}: the checkpoint has no tensors {', '.join(sorted(deltas)[:5])} for the adapter")
    save_safetensors(out, output / "model.safetensors")
    dtype = str(out["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config = args.to_hf_config() | {"torch_dtype": dtype}
    gguf = gguf_file(path)
    if gguf is not None:
        config |= _write_gguf_tokenizer(gguf, output)
    else:
        copy_files(path, output, SIDE_FILES)
        source_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        config |= {k: source_config[k] for k in ("bos_token_id", "eos_token_id") if k in source_config}
    write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    return output


def _write_gguf_tokenizer(gguf: Path, output: Path) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json for a GGUF
    source, converted by transformers' GGUF reader (transformers is needed for this case only)."""
    try:
        from transformers import AutoTokenizer, GenerationConfig
    except ImportError:
        raise LoRAError(
            f"merging onto {gguf.name} writes its tokenizer as tokenizer.json, which needs transformers and gguf "
            "(pip install transformers gguf)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer.tmp-", dir=output) as tmp:  # then each file moved in
        tokenizer.save_pretrained(tmp)
        GenerationConfig(**ids).save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, output / f.name)
    return {k: v for k, v in ids.items() if v is not None}


__all__ = ["save_merged"]
