"""Loading checkpoints: HF safetensors directories, Meta's `consolidated.*.pth`, GGUF files, hub repo ids.

Every format is turned into HF tensor names first (one naming to check and report errors in),
then mapped onto our modules. The model is built on the meta device and each tensor is
materialised once, straight into the target device and dtype, so peak host memory stays near one
copy of the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llama3.checks import CheckpointError, read_json_object
from llama3.model.config import ModelArgs
from llama3.model.functional import rope_inv_freq
from llama3.quant.dynamic import make_linear
from llama3.quant.weight_only import (
    DEFAULT_GROUP_SIZE,
    QuantizedWeight,
    QuantizeError,
    is_quantized_layer,
    mode_for,
)
from llama3.quant.weight_only import check_settings as check_quantize_settings
from llama3.quant.weight_only import quantize as quantize_weight
from llama3.weights.hub import parse_device, resolve
from llama3.weights.meta import _open_meta
from llama3.weights.safetensors import HFTensors, _read_safetensors, _safetensors_header, check_finite

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_model(
    src: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    progress: bool = True,
    group_size: int = DEFAULT_GROUP_SIZE,
    keep_output: bool = False,
    shard: Any = None,
    *,
    model_cls: Callable[[ModelArgs], nn.Module],
    kernel: str | None = None,
) -> nn.Module:
    """Builds a `model_cls` (`llama3.Transformer`) from a checkpoint; `Transformer.from_pretrained` calls this.

    Defaults: CUDA if present else CPU; bfloat16, except float32 for GGUF files, whose dequantized
    weights (scale x small integer) are exact in float32 and would be rounded a second time in bfloat16
    (as transformers does, which loads GGUF in float32 too). `quantize` ("int8" or "int4", with int4's
    `group_size`) quantizes every projection as it is read (see `llama3.quant.weight_only`); activations are then
    bfloat16 by default. `keep_output` leaves the output projection float (tied: the embedding itself).
    `shard` (a `llama3.parallel.tp.TensorParallel`): this rank's part of a tensor-parallel model, read slice
    by slice.

    `quantize="auto"`: a GGUF file on the CPU, with no dtype asked for, loads into the quantized CPU kernels
    measured fastest on this machine among those that keep its perplexity within 1% of float32's
    (`llama3.quant.choice`); anything else loads as with None. `kernel` ("int4", "int4-fbgemm", "int8",
    "fbgemm"; `llama3.quant.choice.KERNELS`) forces one of those plans, and with it the quantization. The plan
    that ran is the model's `kernel_choice` (None for a float model).
    """
    device = parse_device(device)
    choice = None
    if kernel not in (None, "auto"):
        from llama3.quant.choice import forced

        choice = forced(kernel, quantize)  # an unknown name, or one at odds with quantize, is refused here
        quantize = choice.quantize
    auto, quantize = quantize == "auto", None if quantize == "auto" else quantize
    int8_kernel = choice.kernel if choice else "torch"
    if quantize is not None:  # refused before anything is downloaded or read
        check_quantize_settings(
            quantize, group_size, device, _default_dtype(dtype, quantize, int8_kernel), None, int8_kernel
        )
    path = resolve(src)
    stored = stored_quantization(path)
    if stored is not None:  # a checkpoint written by save_quantized: its scheme, read as it is
        if quantize not in (None, stored["mode"]):
            raise CheckpointError(f"{path} holds {stored['mode']} weights; it cannot be loaded as {quantize}")
        quantize, group_size = stored["mode"], stored.get("group_size") or DEFAULT_GROUP_SIZE
        keep_output = stored.get("keep_output") is True
        check_quantize_settings(quantize, group_size, device, _parse_dtype(dtype))
    if auto and stored is None and dtype is None and device.type == "cpu" and shard is None and gguf_file(path):
        from llama3.quant.choice import choose

        choice = choose()
        quantize, int8_kernel = choice.quantize, choice.kernel
    if dtype is None and gguf_file(path) is not None and quantize is None:
        dtype = torch.float32
    dtype = _default_dtype(dtype, quantize, int8_kernel)
    int4_native = quantize == "int4" and group_size == 32
    entry = cached = None
    if quantize is not None and device.type == "cpu" and shard is None and gguf_file(path) is not None:
        from llama3.weights import cache

        settings = {"quantize": quantize, "group_size": group_size, "keep_output": keep_output, "kernel": int8_kernel,
                    "dtype": str(dtype), "model": f"{model_cls.__module__}.{model_cls.__qualname__}"}  # fmt: skip
        entry = cache.entry_for(gguf_file(path), settings)
        cached = entry and cache.read(*entry)  # before the header: fbgemm's prepack starts at once (in a thread)
    args, tensors, count = open_checkpoint(path, progress, int4_native, mapped=shard is not None)
    if cached:
        model = assemble(args, *cached, device, model_cls=model_cls)
        model.kernel_choice = choice
        return model
    model = build_model(
        args,
        tensors,
        count,
        device,
        dtype,
        progress,
        str(path),
        quantize,
        group_size,
        keep_output,
        shard,
        model_cls=model_cls,
        kernel=int8_kernel,
    )
    if entry:
        cache.write(*entry, model)
    model.kernel_choice = choice
    return model


def _default_dtype(dtype: torch.dtype | str | None, quantize: str | None, kernel: str) -> torch.dtype:
    """The activations' dtype: as asked, else float32 where fbgemm or the dot-product kernels run every projection,
    else bfloat16."""
    if dtype is None and ((quantize == "int8" and kernel == "fbgemm") or (quantize and kernel == "dot")):
        return torch.float32
    return _parse_dtype(dtype)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(names)}")
        dtype = names[dtype]
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; choose float32, float16 or bfloat16")
    return dtype


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` stands for: the file itself, or the one .gguf in a directory without an HF/Meta layout."""
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise CheckpointError(f"{path}: expected a directory or a .gguf file")
    if any((path / f).exists() for f in ("config.json", "params.json", "original/params.json")):
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one")
    return ggufs[0] if ggufs else None


def open_checkpoint(
    path: Path, progress: bool = True, int4_native: bool = False, mapped: bool = False
) -> tuple[ModelArgs, HFTensors, int]:
    """Finds the format at `path`; returns its ModelArgs and a lazy stream of HF-named tensors.

    `mapped`: safetensors tensors come as views of the memory-mapped file, for a reader that copies only a
    slice of each (a tensor-parallel rank): nothing else of the file is read into the process's memory."""
    gguf = gguf_file(path)
    if gguf is not None:
        return _open_gguf(gguf, progress, int4_native)
    if (path / "config.json").exists():
        return _open_hf(path, mapped)
    if (path / "params.json").exists():
        return _open_meta(path)
    if (path / "original" / "params.json").exists():
        return _open_meta(path / "original")
    raise CheckpointError(
        f"{path}: no config.json (Hugging Face layout), params.json (Meta layout) or .gguf file found"
    )


def _open_hf(path: Path, mapped: bool = False) -> tuple[ModelArgs, HFTensors, int]:
    args = ModelArgs.from_hf_config(path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json"
            + (f" (found {', '.join(found)})" if found else "")
            + (" — .bin/.pt pickles are not loaded; convert them to safetensors" if list(path.glob("*.bin")) else "")
        )
    missing = [s for s in shards if not (path / s).exists()]
    if missing:
        raise CheckpointError(f"{path}: missing shard files {', '.join(missing)}")
    headers = {shard: _safetensors_header(path / shard) for shard in shards}
    stored = stored_quantization(path)

    def tensors() -> Iterator[tuple[str, Tensor | QuantizedWeight]]:
        stream = (item for shard in shards for item in _read_safetensors(path / shard, *headers[shard], mapped))
        yield from (_stored_weights(stream, stored, path) if stored else stream)

    return args, tensors, sum(len(entries) for entries, _ in headers.values())


QUANT_METHOD = "llama3-weight-only"  # config.json's quantization_config.quant_method for save_quantized's files


def stored_quantization(path: Path) -> dict | None:
    """The quantization_config of a checkpoint directory written by `save_quantized`; None for a float one."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    config = read_json_object(path / "config.json").get("quantization_config")  # a ConfigError, as for any config.json
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else config
    if method != QUANT_METHOD or not isinstance(config, dict):
        raise CheckpointError(
            f"{path}: quantized with {method!r}, which this library does not read "
            f"(it reads float checkpoints and its own {QUANT_METHOD!r} int8/int4 ones)"
        )
    if config.get("mode") not in ("int8", "int4"):
        raise CheckpointError(f"{path}/config.json: quantization_config.mode must be 'int8' or 'int4'")
    return config


def _stored_weights(stream, config: dict, path: Path) -> Iterator[tuple[str, Tensor | QuantizedWeight]]:
    """Gathers each projection's qweight / scales / zeros into one QuantizedWeight. A weight's own mode is
    in its codes: int8 ones (int4 checkpoints keep the output projection at int8) have no zeros."""
    pending: dict[str, dict[str, Tensor]] = {}
    for name, t in stream:
        base, _, kind = name.rpartition(".")
        if kind not in ("qweight", "scales", "zeros"):
            yield name, t
            continue
        parts = pending.setdefault(base, {})
        parts[kind] = t
        if "qweight" not in parts or "scales" not in parts:
            continue
        mode = "int8" if parts["qweight"].dtype == torch.int8 else "int4"
        if mode == "int4" and "zeros" not in parts:
            continue
        try:
            yield f"{base}.weight", QuantizedWeight.from_stored(mode, config.get("group_size"), pending.pop(base), base)
        except QuantizeError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if pending:
        raise CheckpointError(f"{path}: incomplete quantized tensors: {', '.join(sorted(pending)[:5])}")


def _open_gguf(path: Path, progress: bool, int4_native: bool = False) -> tuple[ModelArgs, HFTensors, int]:
    from llama3.weights import gguf

    args = gguf.read_gguf_config(path)
    # dequantized one tensor at a time (build_model places each before the next is read), exact in fp32
    # with int4_native, Q4_0/Q4_1 projections arrive as their own 4-bit codes (our int4, group 32), never as floats
    tensors = lambda: gguf.iter_gguf_state_dict(path, progress=False, int4_native=int4_native)
    return args, tensors, len(args.hf_shapes())


def _fused_name(hf_name: str) -> tuple[str, int, int]:
    """Our parameter name for an HF tensor, its slot in that parameter and the number of slots.

    q, k, v are fused into `wqkv` (3 slots), gate and up into `w13` (2 slots).
    """
    simple = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in simple:
        return simple[hf_name], 0, 1
    i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name).groups()
    ours = {
        "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
        "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
        "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
        "self_attn.o_proj.weight": ("attention.wo.weight", 0),
        "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
        "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
        "mlp.down_proj.weight": ("feed_forward.w2.weight", 0),
        "input_layernorm.weight": ("attention_norm.weight", 0),
        "post_attention_layernorm.weight": ("ffn_norm.weight", 0),
    }[rest]
    n_slots = {"attention.wqkv.weight": 3, "feed_forward.w13.weight": 2}.get(ours[0], 1)
    return f"layers.{i}.{ours[0]}", ours[1], n_slots


def build_model(
    args: ModelArgs,
    tensors: HFTensors,
    count: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    source: str = "checkpoint",
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    keep_output: bool = False,
    shard: Any = None,
    *,
    model_cls: Callable[[ModelArgs], nn.Module],
    kernel: str = "torch",
) -> nn.Module:
    """Materialises a meta-device `model_cls` (`llama3.Transformer`) from HF-named tensors, checking names and shapes.

    With `quantize`, each projection weight is quantized as soon as it is read (a stream may also hand
    over weights already quantized, `QuantizedWeight`), so no float copy of the model is ever held.
    With `shard` (tensor parallelism, `llama3.parallel.tp`), the world size is checked before any tensor is read,
    and each tensor is cut to this rank's rows or columns before it is copied or quantized.
    `kernel`: what runs the int8 layers on the CPU ("torch" or "fbgemm", `llama3.quant.dynamic.make_linear`).
    """
    if shard is not None and kernel != "torch":
        raise QuantizeError("tensor parallelism runs PyTorch's quantized kernels; the fbgemm kernel is not supported")
    if shard is not None:
        shard.check(args, quantize, group_size)
    expected = args.hf_shapes()
    parts: dict[str, dict[int, Tensor | QuantizedWeight]] = {}
    state: dict[str, Tensor] = {}
    quantized: dict[str, torch.nn.Module] = {}  # module path -> its quantized layer, built once its weight is whole
    unexpected: list[str] = []
    big = args.num_params() * dtype.itemsize > 2**30  # a bar only for loads that take a while
    bar = tqdm(total=count, desc=f"loading {Path(source).name}", unit="tensor", disable=not (progress and big))
    for name, t in tensors():
        bar.update(1)
        if name not in expected:
            if not (name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_embeddings)):
                unexpected.append(name)
            continue
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]} for this config"
            )
        if isinstance(t, Tensor) and not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}; expected a floating-point tensor")
        if shard is not None:
            t = shard.slice(name, t, args)
        ours, slot, n_slots = _fused_name(name)
        mode = quantize and is_quantized_layer(ours) and mode_for(ours, quantize, keep_output)
        if isinstance(t, QuantizedWeight) and t.mode != mode:  # a GGUF Q4 output projection: int8, or float
            t = t.dequantize()
        if isinstance(t, QuantizedWeight):
            parts.setdefault(ours, {})[slot] = t
        elif mode:
            check_finite(t, name, source)
            parts.setdefault(ours, {})[slot] = _quantize(t, mode, group_size, f"{source}: {name}")
        else:
            kept = t.to(device=device, dtype=dtype, copy=shard is not None)  # not a view
            # checked once it is the contiguous tensor kept: a rank's strided slice would cost a copy to scan
            check_finite(kept, name, source)
            parts.setdefault(ours, {})[slot] = kept
        output_mode = quantize and args.tie_embeddings and mode_for("output", quantize, keep_output)
        if output_mode and ours == "tok_embeddings.weight":  # the output projection's own copy
            q = _quantize(t, output_mode, group_size, f"{source}: {name}")
            quantized["output"] = make_linear(q, dtype, device, kernel=kernel)
        if len(parts[ours]) == n_slots:  # fuse as soon as complete, so no second copy piles up
            done = parts.pop(ours)
            p = [done.pop(i) for i in range(n_slots)]
            if isinstance(p[0], QuantizedWeight):  # packed for its kernel at once: unpacked codes take 2x int4
                q = QuantizedWeight.cat(p) if n_slots > 1 else p[0]
                del p  # the parts' codes go before the packing allocates
                quantized[ours.removesuffix(".weight")] = make_linear(q, dtype, device, kernel=kernel)
            else:
                state[ours] = torch.cat(p) if n_slots > 1 else p[0]
            del done
        del expected[name]
    bar.close()
    if expected or unexpected:
        msg = [f"{source} does not match the Llama config:"]
        if expected:
            msg.append(f"missing tensors ({len(expected)}): {', '.join(sorted(expected)[:10])}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:10])}")
        raise CheckpointError(" ".join(msg))

    return assemble(args, state, quantized, device, shard, model_cls=model_cls)


def assemble(
    args: ModelArgs,
    state: dict[str, Tensor],
    quantized: dict[str, nn.Module],
    device: torch.device,
    shard: Any = None,
    *,
    model_cls: Callable[[ModelArgs], nn.Module],
) -> nn.Module:
    """A `model_cls` made on the meta device and given `state` (its float tensors) and `quantized` (module path ->
    the quantized layer replacing its nn.Linear), without a copy."""
    with torch.device("meta"):
        model = model_cls(args) if shard is None else shard.parallelize(model_cls(shard.local_args(args)))
    for path, module in quantized.items():  # quantized projections replace their nn.Linear
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
        state.update({f"{path}.{key}": value for key, value in module.state_dict().items()})
    tied = args.tie_embeddings and "output" not in quantized
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True made two Parameters; share one again
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args, device)
    return model.eval()


def _quantize(t: Tensor, mode: str, group_size: int, name: str) -> QuantizedWeight:
    try:
        return quantize_weight(t, mode, group_size, name)
    except QuantizeError as e:
        raise CheckpointError(str(e)) from None
