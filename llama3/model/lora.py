"""LoRA: low-rank adapters on frozen projections (Hu et al., 2021), over float or int8/int4 weights (QLoRA).

A targeted projection computes `y = base(x) + B(A(dropout(x))) * scaling`, with A (r, in) Kaiming-uniform,
B (out, r) zero (so a fresh adapter leaves the model as it was), both float32 whatever the base's dtype,
and scaling = alpha / r (alpha / sqrt(r) with rsLoRA). Only A and B train; the base stays frozen.

Names are Hugging Face's (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), so the files are
PEFT's. Our fused projections hold several of them: `wqkv` = cat(q, k, v) rows and `w13` = cat(gate, up)
rows, in the HF row order (checkpoint.py loads HF rows unpermuted; Meta and GGUF rows are permuted to HF's
on load). So a fused layer gets one (A, B) pair per projection, and its weight update is
cat(B_q A_q, B_k A_k, B_v A_v) * scaling: exactly what PEFT's separate q/k/v adapters add.

QLoRA: over an `Int8Linear` / `Int4Linear` base the forward runs the quantized kernel and the gradient to
the input flows through the dequantized weight (PyTorch's int8/int4 CPU ops have no autograd).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.checks import CheckpointError
from llama3.model.transformer import Transformer
from llama3.quant.dot import DotLinear
from llama3.quant.dynamic import DynInt8Linear
from llama3.quant.weight_only import Int4Linear, Int8Linear, QuantizedWeight
from llama3.weights.safetensors import check_finite
from llama3.weights.save import save_safetensors, write_text

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# each HF projection: its HF parent (self_attn / mlp), our module under a block, and its slot in that module's rows
_PROJECTIONS = {
    "q_proj": ("self_attn", "attention.wqkv", 0),
    "k_proj": ("self_attn", "attention.wqkv", 1),
    "v_proj": ("self_attn", "attention.wqkv", 2),
    "o_proj": ("self_attn", "attention.wo", 0),
    "gate_proj": ("mlp", "feed_forward.w13", 0),
    "up_proj": ("mlp", "feed_forward.w13", 1),
    "down_proj": ("mlp", "feed_forward.w2", 0),
}


class LoRAError(ValueError):
    """A LoRA setting or adapter file that cannot be used: the setting, file or tensor is named."""


@dataclass
class LoRAConfig:
    """Rank `r`, `alpha`, dropout on the adapters' input, the HF projection names to adapt, and rsLoRA."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False  # scaling alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r
    base_model: str | None = field(default=None, compare=False)  # adapter_config.json's base_model_name_or_path

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise LoRAError(f"LoRA alpha must be a finite positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.target_modules if t not in _PROJECTIONS]
        if unknown or not self.target_modules:
            raise LoRAError(
                f"unknown LoRA target module(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"choose among {', '.join(TARGET_MODULES)}"
            )
        self.target_modules = tuple(t for t in TARGET_MODULES if t in self.target_modules)  # one order, no repeats

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it (the keys its `LoraConfig` reads; the rest take their defaults)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": True,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any], source: str = ADAPTER_CONFIG) -> LoRAConfig:
        """Reads a PEFT adapter_config.json, refusing the variants this library does not implement."""
        if config.get("peft_type") != "LORA":
            raise LoRAError(f"{source}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
        unsupported = {
            "use_dora": (False, None),
            "bias": ("none", None),
            "fan_in_fan_out": (False, None),
            "modules_to_save": (None, []),
            "layers_to_transform": (None, []),
            "rank_pattern": ({}, None),
            "alpha_pattern": ({}, None),
            "use_qalora": (False, None),
        }
        for key, allowed in unsupported.items():
            if config.get(key) not in allowed:
                raise LoRAError(f"{source}: {key}={config[key]!r} is not supported (only {allowed[0]!r})")
        targets = config.get("target_modules")
        if targets == "all-linear":  # PEFT: every linear layer except the output head
            targets = TARGET_MODULES
        elif isinstance(targets, str):
            raise LoRAError(f"{source}: target_modules as a regular expression ({targets!r}) is not supported")
        for key in ("r", "lora_alpha"):
            if key not in config:
                raise LoRAError(f"{source}: missing {key!r}")
        try:
            return cls(
                r=config["r"],
                alpha=config["lora_alpha"],
                dropout=config.get("lora_dropout", 0.0),
                target_modules=tuple(targets or ()),
                use_rslora=bool(config.get("use_rslora", False)),
                base_model=config.get("base_model_name_or_path"),
            )
        except LoRAError as e:
            raise LoRAError(f"{source}: {e}") from None


class _FrozenQuantizedLinear(torch.autograd.Function):
    """x @ W.T by the quantized kernel; the gradient to x is grad @ W with W dequantized (W itself is frozen).

    The backward product runs in float32 (CPUs without bf16 units emulate bfloat16 matmuls, 5-10x slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, frozen: FrozenQuantizedLinear) -> Tensor:
        ctx.frozen = frozen
        return frozen.base(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return (grad.float() @ ctx.frozen.weight()).to(grad.dtype), None


def dequantized_weight(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight a float or int8/int4 projection multiplies by, as `dtype`.

    Int4Linear keeps only the kernel's packed codes, so its weight is read back through the kernel itself:
    the rows of layer(I) are the columns of W (in the activation dtype, as its forward computes them).
    """
    if isinstance(layer, nn.Linear):
        return layer.weight.to(dtype)
    if isinstance(layer, Int8Linear):
        return (layer.weight.float() * layer.scales.float()[:, None]).to(dtype)
    if isinstance(layer, (DynInt8Linear, DotLinear)):  # fbgemm's packed int8 codes, or dot.c's, read back
        return layer.dequantize().to(dtype)
    if isinstance(layer, Int4Linear):
        act = layer.scales_and_zeros.dtype  # the kernel takes activations of its scales' dtype
        eye = torch.eye(layer.in_features, dtype=act, device=layer.packed.device)
        return layer(eye).t().to(dtype)
    raise LoRAError(f"cannot dequantize a {type(layer).__name__}")


def int4_codes(layer: Int4Linear) -> QuantizedWeight | None:
    """The 4-bit codes behind an Int4Linear, read back once through its kernel (`dequantized_weight`) with its
    own scales and zeros, and kept only if they give back exactly the weight the kernel multiplies by (None
    otherwise). Dequantizing them for each backward pass costs a few elementwise ops instead of a matmul of
    `in_features` rows through the kernel."""
    act = layer.scales_and_zeros.dtype
    w = dequantized_weight(layer, act)
    N, g = layer.out_features, layer.group_size
    scales, zeros = (layer.scales_and_zeros[:, :N, i].t().float() for i in (0, 1))  # (N, K // g)
    s, z = scales.repeat_interleave(g, dim=1), zeros.repeat_interleave(g, dim=1)
    codes = ((w.float() - z) / s.where(s != 0, 1) + 8).round().clamp(0, 15).to(torch.uint8)
    q = QuantizedWeight("int4", codes, scales, zeros, g)
    return q if torch.equal(q.dequantize().to(act), w) else None


def dropout_masks(n: int, shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """n independent dropout masks of `shape` as (n, *shape): each element 0 with probability p, else
    1 / (1 - p), independently of all others (what `F.dropout` multiplies by).

    On a CPU, torch draws one random number per element, serially (`bernoulli_`: 2.6 ms for a (488, 576)
    mask on the 2-core CI CPU, 17% of a LoRA training step at dropout 0.05). There the masks are drawn as
    the gaps between dropped elements, which are geometric (P(gap = k) = (1 - p)^k p): about p * size
    random numbers instead of size, the same distribution (4x faster at p = 0.05).
    """
    size = n * math.prod(shape)
    if device.type != "cpu":
        return torch.empty(n, *shape, device=device).bernoulli_(1 - p).div_(1 - p)
    keep = torch.full((size,), 1 / (1 - p))
    chunk = int(size * p + 8 * math.sqrt(size * p) + 16)  # enough gaps to cover `size` almost always
    start = 0  # the first element not yet decided
    while start < size:
        u = torch.rand(chunk, dtype=torch.float64)
        gaps = (torch.log1p(-u) / math.log1p(-p)).floor_().long()  # kept elements before each dropped one
        dropped = start + torch.cumsum(gaps + 1, 0) - 1
        keep[dropped[dropped < size]] = 0
        start = int(dropped[-1]) + 1
    return keep.view(n, *shape)


def _base_forward(base: nn.Module, x: Tensor) -> Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight)
    return base(x)


class FrozenQuantizedLinear(nn.Module):
    """An int8/int4 projection that passes the gradient to its input through its dequantized weight (the
    kernels have no autograd), so that training reaches the adapters before it. Holds no copy of the weight:
    int8 codes dequantize as they are; int4 keeps its codes two to a byte (`int4_codes`) beside the kernel's
    packing (half a byte per weight more), or without them reads the weight back through the kernel."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self._int4: dict[str, Tensor] | bool | None = None  # read at the first backward; False: not exact

    def weight(self) -> Tensor:
        """The float32 (out, in) weight of the base."""
        if self._int4 is None and isinstance(self.base, Int4Linear):
            q = int4_codes(self.base)
            self._int4 = False if q is None else q.stored()
        if self._int4:
            return QuantizedWeight.from_stored("int4", self.base.group_size, self._int4, "int4").dequantize()
        return dequantized_weight(self.base, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantizedLinear.apply(x, self)
        return self.base(x)


class LoRALinear(nn.Module):
    """A frozen projection (`nn.Linear`, `Int8Linear` or `Int4Linear`) plus one (A, B) pair per HF projection
    it holds (`rows`: name -> (first row, end row) of that projection in the base's output)."""

    def __init__(self, base: nn.Module, rows: dict[str, tuple[int, int]], config: LoRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        # a quantized base runs through a wrapper that gives its input a gradient (see FrozenQuantizedLinear),
        # held in a list so that the base is not registered twice (state_dict, .to())
        self._frozen = None if isinstance(base, nn.Linear) else [FrozenQuantizedLinear(base)]
        self.rows = rows
        self.out_features, self.in_features = base.out_features, base.in_features
        self.scaling = config.scaling
        self.dropout = config.dropout
        device = next(iter(base.state_dict().values())).device
        r = config.r
        self.lora_A = nn.ParameterDict(
            {n: torch.empty(r, self.in_features, dtype=torch.float32, device=device) for n in rows}
        )
        self.lora_B = nn.ParameterDict(
            {n: torch.zeros(e - s, r, dtype=torch.float32, device=device) for n, (s, e) in rows.items()}
        )
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's init: A Kaiming-uniform (as nn.Linear's default), B zero."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        out = _base_forward(self.base, x) if self._frozen is None else self._frozen[0](x)
        if self.merged:
            return out
        # float32 adapters on a float32 input, added in float32, rounded once to the output's dtype (as PEFT).
        # The projections of a fused module go through one product each way: every A on its projection's own
        # dropped-out input (its own mask, as in PEFT), then B as one block-diagonal matrix, zero on the rows
        # of a projection without an adapter (k_proj when only q and v are targeted).
        names = sorted(self.rows, key=self.rows.get)
        xf = x.float().reshape(-1, self.in_features)  # (M, in)
        A = torch.stack([self.lora_A[n] for n in names])  # (n, r, in)
        if self.training and self.dropout > 0:
            dropped = xf * dropout_masks(len(names), xf.shape, self.dropout, xf.device)  # (n, M, in)
            h = torch.bmm(dropped, A.transpose(1, 2)).transpose(0, 1).flatten(1)  # (M, n * r)
        else:
            h = F.linear(xf, A.flatten(0, 1))
        blocks, end = [], 0
        for name in names:
            s, e = self.rows[name]
            blocks += [xf.new_zeros(s - end, 0), self.lora_B[name]]
            end = e
        B = torch.block_diag(*blocks, xf.new_zeros(self.out_features - end, 0))  # (out, n * r)
        y = torch.addmm(out.float().reshape(-1, self.out_features), h, B.t(), alpha=self.scaling)
        return y.view(out.shape).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """The (out, in) float32 update the adapters add to the base weight: row blocks of B A * scaling."""
        A0 = next(iter(self.lora_A.values()))
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=A0.device)
        for name, (s, e) in self.rows.items():
            delta[s:e] = (self.lora_B[name] @ self.lora_A[name]) * self.scaling
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the update into a float base weight (computed in float32, rounded once to the weight's dtype)."""
        if self.merged:
            return
        w = self._float_base_weight("merge")
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the update again. Two roundings (merge's, then this one's) leave each weight within one
        unit in the last place of its dtype of the original (exact when the dtype holds the sums exactly)."""
        if not self.merged:
            return
        w = self._float_base_weight("unmerge")
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def _float_base_weight(self, what: str) -> Tensor:
        if not isinstance(self.base, nn.Linear):
            raise LoRAError(
                f"cannot {what} an adapter into a {type(self.base).__name__} base (quantized weights would be "
                "re-quantized); write a merged float checkpoint with llama3.train.merge.save_merged instead"
            )
        return self.base.weight

    def extra_repr(self) -> str:
        return (
            f"adapters={list(self.rows)}, r={next(iter(self.lora_A.values())).shape[0]}, scaling={self.scaling:g}, "
            f"dropout={self.dropout:g}"
        )


def _projection_rows(model: Transformer) -> dict[str, tuple[int, int]]:
    """Each HF projection's rows in our (possibly fused) module: wqkv = [q | k | v], w13 = [gate | up]."""
    a = model.args
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {
        "q_proj": (0, q),
        "k_proj": (q, q + kv),
        "v_proj": (q + kv, q + 2 * kv),
        "o_proj": (0, a.dim),
        "gate_proj": (0, a.ffn_dim),
        "up_proj": (a.ffn_dim, 2 * a.ffn_dim),
        "down_proj": (0, a.dim),
    }


def add_lora(model: Transformer, config: LoRAConfig) -> Transformer:
    """Freezes every weight of `model` and wraps the targeted projections of every block in `LoRALinear`,
    in place. A fresh adapter (B = 0) leaves the model's outputs exactly as they were."""
    if lora_layers(model):
        raise LoRAError("the model has LoRA adapters already")
    model.requires_grad_(False)
    rows = _projection_rows(model)
    for block in model.layers:
        by_module: dict[str, dict[str, tuple[int, int]]] = {}
        for name in config.target_modules:
            by_module.setdefault(_PROJECTIONS[name][1], {})[name] = rows[name]
        for path, module_rows in by_module.items():
            parent, _, attr = path.rpartition(".")
            base = block.get_submodule(path)
            setattr(block.get_submodule(parent), attr, LoRALinear(base, module_rows, config))
    kinds = (Int8Linear, Int4Linear, DynInt8Linear, DotLinear)
    quantized = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    for name in quantized:  # those left without adapters must still pass gradients back
        parent, _, attr = name.rpartition(".")
        if not isinstance(model.get_submodule(parent), LoRALinear):
            setattr(model.get_submodule(parent), attr, FrozenQuantizedLinear(model.get_submodule(name)))
    model.lora_config = config
    model.train(model.training)  # new modules start in training mode: an eval model's adapters must not drop out
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable parameters: every A and B, in a fixed order."""
    for layer in lora_layers(model).values():
        yield from layer.lora_A.values()
        yield from layer.lora_B.values()


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def _peft_name(block: int, proj: str, ab: str) -> str:
    return f"base_model.model.model.layers.{block}.{_PROJECTIONS[proj][0]}.{proj}.lora_{ab}.weight"


def _adapters(model: nn.Module) -> Iterator[tuple[int, str, LoRALinear]]:
    """(block index, HF projection name, its layer) for every adapter of the model."""
    for i, block in enumerate(model.layers):
        for m in block.modules():
            if isinstance(m, LoRALinear):
                for proj in m.rows:
                    yield i, proj, m


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters under PEFT's tensor names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`)."""
    out = {}
    for i, proj, m in _adapters(model):
        out[_peft_name(i, proj, "A")] = m.lora_A[proj].detach().float().contiguous().cpu()
        out[_peft_name(i, proj, "B")] = m.lora_B[proj].detach().float().contiguous().cpu()
    if not out:
        raise LoRAError("the model has no LoRA adapters")
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes adapter_model.safetensors and adapter_config.json as PEFT's `save_pretrained` does (each to a
    temporary name first, then renamed: see `llama3.weights.save.atomic_write`)."""
    directory = Path(directory)
    save_safetensors(lora_state_dict(model), directory / ADAPTER_WEIGHTS)
    write_text(directory / ADAPTER_CONFIG, json.dumps(model.lora_config.to_peft(), indent=2) + "\n")
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """An adapter directory's config and tensors (PEFT names), checked to be readable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llama3.checks import read_json_object

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    config = LoRAConfig.from_peft(
        read_json_object(directory / ADAPTER_CONFIG, LoRAError), str(directory / ADAPTER_CONFIG)
    )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise LoRAError(f"{directory}: no {ADAPTER_WEIGHTS} (found {found}; .bin adapters are not read)")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{weights}: not a readable safetensors file: {e}") from None
    for name, t in tensors.items():
        try:
            check_finite(t, name, str(weights))
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
    return config, tensors


def load_adapter(model: Transformer, directory: str | os.PathLike) -> Transformer:
    """Adds the adapter saved in `directory` (by us or by PEFT) to `model`, unmerged; every tensor is checked."""
    config, tensors = read_adapter(directory)
    add_lora(model, config)
    set_adapter_weights(model, tensors, str(directory))
    return model


def set_adapter_weights(model: Transformer, tensors: dict[str, Tensor], source: str = "adapter") -> None:
    """Copies PEFT-named adapter tensors into the model's adapters: every one present, shapes checked."""
    config = model.lora_config
    expected = {}
    for i, proj, m in _adapters(model):
        expected[_peft_name(i, proj, "A")] = m.lora_A[proj]
        expected[_peft_name(i, proj, "B")] = m.lora_B[proj]
    # PEFT versions differ on whether the adapter name ("default") stays in the tensor names
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [
            f"{source}: the adapter does not match the model ({len(model.layers)} layers, {config.target_modules}):"
        ]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise LoRAError(" ".join(parts))
    with torch.no_grad():
        for name, p in expected.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise LoRAError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t)


def lora_deltas(model: nn.Module) -> dict[str, Tensor]:
    """HF weight name -> the float32 update the adapters add to it (`model.layers.0.self_attn.q_proj.weight`)."""
    out = {}
    for i, proj, m in _adapters(model):
        delta = (m.lora_B[proj] @ m.lora_A[proj]) * m.scaling
        out[f"model.layers.{i}.{_PROJECTIONS[proj][0]}.{proj}.weight"] = delta.detach().float().cpu()
    return out
