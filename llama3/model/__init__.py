"""The model: its configuration, the textbook math, the Transformer, and the backends that run it fast.

Read in this order: `config` (ModelArgs and the presets), `functional` (RoPE frequencies and rotation,
grouped-query attention, SwiGLU), `transformer` (RMSNorm, KVCache, Attention, FeedForward, TransformerBlock,
Transformer), `hooks` (what the model's named hook points call: captured activations, patching, the logit lens),
`backends` (the faster forms of the same math, chosen in one place), `lora` (low-rank adapters
on the projections, in PEFT's file format).

`from llama3.model import Transformer` keeps working (the names of the old `llama3.model` module load lazily).
"""

from __future__ import annotations

from llama3.lazy import lazy_exports

_EXPORTS = {
    "Attention": "llama3.model.transformer",
    "FeedForward": "llama3.model.transformer",
    "KVCache": "llama3.model.transformer",
    "RMSNorm": "llama3.model.transformer",
    "Transformer": "llama3.model.transformer",
    "TransformerBlock": "llama3.model.transformer",
    "apply_rope": "llama3.model.functional",
    "attention": "llama3.model.functional",
    "rope_inv_freq": "llama3.model.functional",
    "rope_tables": "llama3.model.functional",
    "swiglu": "llama3.model.functional",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)  # the names load on first use
