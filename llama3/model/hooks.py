"""Hook points: look inside a forward, and change it, without editing the model.

The model's modules offer their activations under TransformerLens's names (`blocks.3.hook_resid_post`,
`blocks.3.attn.hook_pattern`, ...; `hook_names` lists them). With no hook set each point returns its
tensor untouched (a plain function call) and the backend runs as usual. While hooks are set
(`Transformer.hooks`, `Transformer.run_with_cache`), every hook point calls the functions set on it,
which may read the tensor or return a replacement, and the forward runs the reference ops (`ReferenceOps`)
whatever the model's backend: a fused kernel has no place to stop in the middle. Attention is then computed
as an explicit softmax wherever its probabilities are hooked, so that they exist (SDPA never forms them).

A hook function is `fn(x, hook) -> Tensor | None`, as in TransformerLens: `hook.name` is the point's name,
`hook.positions` (B, T) the position of each row's tokens (during generation a decode step's one token is
at position len(prompt) + n, not 0); returning None keeps `x`. `zero`, `add` and `replace` make the usual
patches: one head's output, one position's residual.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.backends import TorchOps
from llama3.model.functional import apply_rope, attention

# The points of each block, in the order a forward reaches them (TransformerLens's names, under blocks.{i}.).
BLOCK_POINTS = (
    "hook_resid_pre",  # the block's input, the residual stream (B, T, dim)
    "attn.hook_q",  # queries after RoPE (B, T, H, D)
    "attn.hook_k",  # keys after RoPE (B, T, KVH, D): this forward's tokens, before the cache write
    "attn.hook_v",  # values (B, T, KVH, D)
    "attn.hook_pattern",  # attention probabilities (B, H, T, S): query position, key position
    "attn.hook_z",  # each head's output, before the output projection wo (B, T, H, D)
    "hook_attn_out",  # attention's output after wo (B, T, dim)
    "hook_resid_mid",  # the residual stream between attention and the feed-forward (B, T, dim)
    "hook_mlp_out",  # the feed-forward's output (B, T, dim)
    "hook_resid_post",  # the block's output (B, T, dim): the next block's hook_resid_pre
)
FINAL_POINTS = ("ln_final.hook_normalized",)  # the final RMSNorm's output (weight applied), the input to the logits

HookFn = Callable[[Tensor, "Hook"], "Tensor | None"]


def hook_names(n_layers: int) -> list[str]:
    """Every hook point of a model of `n_layers` blocks, in the order a forward reaches them."""
    return [f"blocks.{i}.{p}" for i in range(n_layers) for p in BLOCK_POINTS] + list(FINAL_POINTS)


def no_hook(name: str, x: Tensor) -> Tensor:
    """A hook point with no hook set: `x` itself."""
    return x


@dataclass
class Hook:
    """What a hook function learns about the point calling it."""

    name: str
    positions: Tensor  # (B, T): each row's positions of the tokens in this forward


class ReferenceOps(TorchOps):
    """The reference form of every seam of `llama3.model.backends`: what a hooked forward runs on any backend."""

    name = "reference"

    @staticmethod
    def linear(x: Tensor, layer: nn.Module) -> Tensor:
        return F.linear(x, layer.weight) if isinstance(layer, nn.Linear) else layer(x)

    @staticmethod
    def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        if mask is not None:  # the slots the mask covers (kv_len: the rest of the cache is empty)
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
        return attention(q, keys, values, mask)


class LayerOps(ReferenceOps):
    """The reference ops of block `layer`, with its hook points: `rope_and_cache` and `attention` step by step."""

    def __init__(self, hooks: Hooks, layer: int):
        self.hooks, self.prefix = hooks, f"blocks.{layer}."
        self.pattern_hooked = self.prefix + "attn.hook_pattern" in hooks.fns

    def hook(self, name: str, x: Tensor) -> Tensor:
        """The block's hook point `name` (without the blocks.{i}. prefix)."""
        return self.hooks(self.prefix + name, x)

    def rope_and_cache(self, q, k, v, cos, sin, cache, input_pos):  # TorchOps.rope_and_cache, with q, k, v hooked
        q = self.hook("attn.hook_q", apply_rope(q, cos, sin))
        k = self.hook("attn.hook_k", apply_rope(k, cos, sin))
        v = self.hook("attn.hook_v", v)
        if cache is None:
            return q, k.transpose(1, 2), v.transpose(1, 2)
        return (q, *cache.update(input_pos, k, v))

    def attention(self, q, keys, values, mask, input_pos):
        if not self.pattern_hooked:
            return self.hook("attn.hook_z", ReferenceOps.attention(q, keys, values, mask, input_pos))
        # softmax(q k^T / sqrt(D) + mask) v written out, in fp32, so that the probabilities exist
        B, T, H, D = q.shape
        S = T if mask is None else mask.shape[-1]
        group = H // keys.shape[1]  # query heads per key/value head (GQA)
        keys = keys[:, :, :S].repeat_interleave(group, dim=1).float()  # (B, H, S, D)
        values = values[:, :, :S].repeat_interleave(group, dim=1).float()
        scores = q.transpose(1, 2).float() @ keys.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, S)
        if mask is None:  # causal within this forward's tokens
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        pattern = self.hook("attn.hook_pattern", scores.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        z = (pattern @ values).transpose(1, 2).to(q.dtype)  # (B, T, H, D)
        return self.hook("attn.hook_z", z)


class Hooks:
    """The hook functions set on a model, by hook-point name; the model calls it at each point."""

    def __init__(self, model: nn.Module, fns: Mapping[str, HookFn | Sequence[HookFn]]):
        names = set(hook_names(len(model.layers)))
        for name in fns:
            if name not in names:
                raise ValueError(
                    f"no hook point {name!r}: this model has blocks 0..{len(model.layers) - 1}, each with "
                    f"blocks.{{i}}.{', blocks.{i}.'.join(BLOCK_POINTS)}; and {', '.join(FINAL_POINTS)}"
                )
        self.fns = {name: [fn] if callable(fn) else list(fn) for name, fn in fns.items()}
        self.layer_ops = {layer: LayerOps(self, i) for i, layer in enumerate(model.layers)}
        self.positions: Tensor | None = None

    def __call__(self, name: str, x: Tensor) -> Tensor:
        for fn in self.fns.get(name, ()):
            out = fn(x, Hook(name, self.positions))
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"a hook on {name} returned shape {tuple(out.shape)}, not {tuple(x.shape)}")
                x = out
        return x

    def run_block(self, layer: nn.Module, x: Tensor, cos, sin, mask, input_pos, ops) -> Tensor:
        """The block's own forward with its hooked reference ops (in place of the backend's `run_block`)."""
        B, T, _ = x.shape
        self.positions = input_pos if input_pos is not None else torch.arange(T, device=x.device).expand(B, T)
        return layer(x, cos, sin, mask, input_pos, self.layer_ops[layer])


@contextlib.contextmanager
def set_hooks(model: nn.Module, fns: Mapping[str, HookFn | Sequence[HookFn]]) -> Iterator[Hooks]:
    """Sets `fns` (hook-point name -> function, or a list of them) on `model` for the `with` block.

    Nested blocks add to the hooks already set (the outer ones run first at a point)."""
    outer = model.hooked
    merged = {name: list(f) for name, f in outer.fns.items()} if outer is not None else {}
    for name, fn in fns.items():
        merged.setdefault(name, []).extend([fn] if callable(fn) else fn)
    active = Hooks(model, merged)
    saved = (model.hooked, model.ops, model.hook, [layer.hook for layer in model.layers])
    model.hooked, model.ops, model.hook = active, ReferenceOps, active
    for layer in model.layers:
        layer.hook = active.layer_ops[layer].hook
    try:
        yield active
    finally:
        model.hooked, model.ops, model.hook, layer_hooks = saved
        for layer, hook in zip(model.layers, layer_hooks, strict=True):
            layer.hook = hook


def run_with_cache(model: nn.Module, tokens: Tensor, names: Sequence[str] | None = None) -> tuple[Tensor, dict]:
    """(logits (B, T, vocab), {name: activation}) of one forward over `tokens`, capturing the hook points
    `names` (default: all). Hooks already set (patches) apply, and the cache holds what they made."""
    names = hook_names(len(model.layers)) if names is None else list(names)
    cache: dict[str, Tensor] = {}

    def save(x: Tensor, hook: Hook) -> None:
        cache[hook.name] = x.detach()

    with set_hooks(model, {name: save for name in names}):
        logits = model(tokens)
    return logits, cache


def logit_lens(model: nn.Module, tokens: Tensor) -> Tensor:
    """What the model would predict if it stopped after each block (nostalgebraist 2020): the residual stream
    after the embedding and after each block, through the final norm and the output projection.
    (n_layers + 1, B, T, vocab); the last entry is the model's logits."""
    L = len(model.layers)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    _, cache = run_with_cache(model, tokens, names)
    resid = torch.stack([cache[name] for name in names])  # (L + 1, B, T, dim)
    return ReferenceOps.linear(model.norm(resid), model.output)


# Patches: hook functions that change one head, one position, or the whole activation.


def _patch(edit: Callable[[Tensor], Tensor], pos: int | None, head: int | None) -> HookFn:
    def fn(x: Tensor, hook: Hook) -> Tensor:
        is_pattern = hook.name.endswith("hook_pattern")
        x = x.clone()
        y = x.transpose(1, 2) if is_pattern else x  # (B, T, ...): the token's position on axis 1, heads on 2
        if head is not None:
            if y.dim() != 4:
                raise ValueError(f"head={head}: {hook.name} has no heads (attn.hook_q/k/v/pattern/z have)")
            y = y[:, :, head]
        if pos is None:
            y.copy_(edit(y).expand_as(y))
        else:
            rows = hook.positions == pos  # (B, T): where a row's token at position `pos` is in this forward
            if rows.any():
                y[rows] = edit(y[rows]).expand_as(y[rows]).to(y.dtype)
        return x

    return fn


def zero(pos: int | None = None, head: int | None = None) -> HookFn:
    """Sets the activation to 0: at position `pos` only, head `head` only (default: everywhere)."""
    return _patch(torch.zeros_like, pos, head)


def add(delta: Tensor, pos: int | None = None, head: int | None = None) -> HookFn:
    """Adds `delta` (broadcast: e.g. a (dim,) direction to the residual stream) to the activation."""
    return _patch(lambda y: y + delta.to(y.device, y.dtype), pos, head)


def replace(value: Tensor, pos: int | None = None, head: int | None = None) -> HookFn:
    """Replaces the activation with `value` (broadcast), e.g. one from another prompt's `run_with_cache`."""
    return _patch(lambda y: value.to(y.device, y.dtype).expand_as(y), pos, head)
