"""Random-weights models of a preset's shape for `llama3 bench --model random:PRESET` (no download, no file):
the speed of a Llama-3-8B or 70B shape depends on its shapes and dtypes, not on what its weights say.

Weights are drawn N(0, 0.02) (norms 1) straight on the device in the target dtype; a quantized model is
quantized projection by projection as each is drawn, so the float model never exists whole (a 70B model's bf16
weights alone would fill a GPU that holds its int4 copy several times over). `hf_model_like` gives transformers'
`LlamaForCausalLM` the same shapes and weights, for `--compare transformers`.
"""

from __future__ import annotations

import torch

from llama3.generate.llama import Llama
from llama3.model.backends import get_ops
from llama3.model.config import ModelArgs
from llama3.model.functional import rope_inv_freq
from llama3.model.transformer import Transformer
from llama3.quant.weight_only import is_quantized_layer, mode_for, quantize, quantized_linear


class NullTokenizer:
    """Generation on random weights needs no text: just the vocabulary size and no stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: an 8B model in fp32 would not fit twice
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.set_ops(get_ops(backend, device))
    return model.eval()


@torch.no_grad()
def random_quantized_model(
    args: ModelArgs, device: torch.device, mode: str, group_size: int = 32, backend: str = "auto"
) -> Transformer:
    """A random bf16-activation model whose projections are quantized as each is made (int4 keeps the output
    projection at int8, as `quantize="int4"` loads a checkpoint)."""
    with torch.device("meta"):
        model = Transformer(args)
    for name in [n for n, _ in model.named_modules() if is_quantized_layer(n)]:
        layer = model.get_submodule(name)
        w = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
        q = quantize(w, mode_for(name, mode), group_size, name)
        del w
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, quantized_linear(q, torch.bfloat16, device))
    for name, p in list(model.named_parameters()):  # what is left: the embedding and the norms
        value = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        value.normal_(0, 0.02) if p.dim() > 1 else value.fill_(1.0)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, torch.nn.Parameter(value, requires_grad=False))
    model.inv_freq = rope_inv_freq(args, device)
    model.set_ops(get_ops(backend, device))
    return model.eval()


def random_llama(preset: str, device: str | torch.device | None, config) -> Llama:
    """`Llama` over a random model of `preset`'s shape (`ModelArgs.from_name`), loaded as `config` (a
    `llama3.eval.bench.Config`) asks: dtype (default bfloat16), quantize "int8" / "int4" (anything else: float,
    as the library loads a non-GGUF checkpoint), backend, compile."""
    from llama3.weights.hub import parse_device

    try:
        args = ModelArgs.from_name(preset)
    except (KeyError, ValueError) as e:  # name the form the user typed: random:PRESET
        raise ValueError(f"--model random:{preset}: {e.args[0] if e.args else e}") from None
    dev = parse_device(device)
    torch.manual_seed(0)
    if config.quantize in ("int8", "int4"):
        model = random_quantized_model(args, dev, config.quantize, config.group_size, config.backend)
    else:
        model = random_model(args, dev, getattr(torch, config.dtype or "bfloat16"), config.backend)
    return Llama(model, NullTokenizer(args.vocab_size), compile=config.compile)


def hf_model_like(model: Transformer):
    """transformers' LlamaForCausalLM with the same shapes and weights as `model` (float weights only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(**a.to_hf_config())
    w = model.tok_embeddings.weight
    default = torch.get_default_dtype()
    torch.set_default_dtype(w.dtype)  # allocate in the target dtype: an fp32 8B copy would not fit beside ours
    try:
        with torch.device("meta"):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    hf = hf.to_empty(device=w.device)
    hf.model.rotary_emb.inv_freq = model.inv_freq.clone()  # to_empty left the buffers uninitialised
    hf.model.rotary_emb.original_inv_freq = model.inv_freq.clone()
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(w)
        hf.model.norm.weight.copy_(model.norm.weight)
        if not a.tie_embeddings:
            hf.lm_head.weight.copy_(model.output.weight)
        D = a.head_dim
        for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
            q, k, v = ours.attention.wqkv.weight.split([a.n_heads * D, a.n_kv_heads * D, a.n_kv_heads * D])
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(ours.attention.wo.weight)
            gate, up = ours.feed_forward.w13.weight.chunk(2)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(ours.feed_forward.w2.weight)
            theirs.input_layernorm.weight.copy_(ours.attention_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.ffn_norm.weight)
    return hf.eval()
