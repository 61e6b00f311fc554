"""ggml's block-quantized tensor formats: their sizes, their dequantizers (torch), and the Q4 blocks kept as codes.

Every block type stores a few fp16 scales and packed small integers. `dequantize` turns a tensor's raw bytes
into float weights, bit for bit as gguf-py and llama.cpp compute them; `quantized_codes` turns Q4_0/Q4_1
bytes into our int4 group-32 format (`llama3.quant.weight_only`) without making a float weight.
`llama3.weights.gguf` reads the file and calls these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llama3.quant.weight_only import QuantizedWeight


class GGUFError(ValueError):
    """A GGUF file we cannot read or that does not describe a Llama model we can build."""


# ggml tensor type id -> (name, values per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


BLOCK_BYTES = {name: size for name, _, size in GGML_TYPES.values()}


QK_K = 256  # super-block size of the k-quants


def _f16(b: Tensor) -> Tensor:
    """fp16 values stored as byte pairs (n, 2k) -> fp32 (n, k)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, m, 32 | 16 bytes) -> low nibbles of each row, then high nibbles: (n, m, 2 * bytes)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(b: Tensor, n_bits: int) -> Tensor:
    """Bytes (..., k) -> their n_bits-wide fields (..., 8 // n_bits, k), lowest bits first."""
    width = 8 // n_bits
    shifts = torch.arange(0, 8, n_bits, dtype=torch.uint8, device=b.device).view(width, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << n_bits) - 1)


def _q8_0(b: Tensor) -> Tensor:  # d: f16, qs: int8[32]
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: Tensor) -> Tensor:  # d, qs[16]: element j < 16 in the low nibble of byte j, j >= 16 in the high
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: Tensor) -> Tensor:  # d, m, qs[16]: x = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_high_bits(qh: Tensor) -> Tensor:
    """The fifth bit of each of 32 values, packed little-endian in 4 bytes -> (n, 32) of 0/1 at bit 4."""
    return _bits(qh, 1).transpose(-1, -2).reshape(qh.shape[0], 32) << 4


def _q5_0(b: Tensor) -> Tensor:  # d, qh[4], qs[16]
    q = _nibbles(b[:, 6:]) | _q5_high_bits(b[:, 2:6])
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:  # d, m, qh[4], qs[16]
    q = _nibbles(b[:, 8:]) | _q5_high_bits(b[:, 4:8])
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q2_k(b: Tensor) -> Tensor:  # scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # two halves of 128 values; in each, 32 bytes hold four 2-bit planes of 32 values
    q = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:  # hmask[32], qs[64], scales[12] (16 6-bit signed), d
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(packed[:, :8].reshape(n, 1, 8), 4).reshape(n, 16)  # low 4 bits: bytes 0-7, low then high nibble
    high = _bits(packed[:, 8:].reshape(n, 1, 4), 2).reshape(n, 16)  # top 2 bits: bytes 8-11, 2 bits at a time
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # a set hmask bit means "no offset"; a clear one subtracts 4
    qh = _bits(hmask.reshape(n, 1, 32), 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes -> two (n, 8) uint8."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    minimum = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scale, minimum


def _q4_k(b: Tensor) -> Tensor:  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, x = d*sc*q - dmin*m
    n = b.shape[0]
    sc, m = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * m.float()).view(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:  # d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    sc, m = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * m.float()).view(n, 8, 1)
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), 1).reshape(n, 8, 32)  # bit i of byte l: sub-block i, value l
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:  # ql[128], qh[64], scales[16] int8, d
    n = b.shape[0]
    # two halves of 128 values: low nibbles of 64 bytes, then their high nibbles; 2 more bits from qh
    ql = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


# type name -> dequantizer; F32/F16/BF16 are plain views
_DEQUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


SUPPORTED_TYPES = (*_FLOATS, *_DEQUANTIZERS)


def dequantize(raw: Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The tensor of `shape` (PyTorch order) stored as `raw` bytes of ggml type `type_name`, as `dtype`.

    Quantized types are expanded in fp32 and then cast, so a bf16 result is the fp32 value rounded once.
    """
    raw = raw.reshape(-1).view(torch.uint8)
    if type_name in _FLOATS:
        return raw.view(_FLOATS[type_name]).reshape(shape).to(dtype)
    if type_name not in _DEQUANTIZERS:
        raise GGUFError(f"unsupported tensor type {type_name} (supported: {', '.join(SUPPORTED_TYPES)})")
    type_size = BLOCK_BYTES[type_name]
    return _DEQUANTIZERS[type_name](raw.view(-1, type_size)).reshape(shape).to(dtype)


# Q4 blocks are our int4 group-32 format already: the same 4-bit codes, w = (q - 8) * scale + zero.
# (type name -> byte offset of the nibbles in a block)
INT4_BLOCKS = {"Q4_0": 2, "Q4_1": 4}


def quantized_codes(raw: Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight:
    """A Q4_0 or Q4_1 tensor of `shape` (PyTorch order, 2-D) stored as `raw` bytes, as int4 group-32 codes.

    The file's own codes are kept; no float weight is made. Q4_0 (w = d * (q - 8)): scale d, zero 0.
    Q4_1 (w = d * q + m): scale d, zero m + 8d. Both d and m are fp16, so d * q and (q - 8) * d are exact
    in fp32, and so is m + 8d unless |m| and 8|d| are more than 2^12 apart (a block whose minimum is tiny
    against its range, or the reverse; none in SmolLM2's file). Where it is exact, `dequantize()` gives
    ggml's fp32 d * q + m bit for bit; where not, zero is rounded once to fp32.
    """
    if type_name not in INT4_BLOCKS:
        raise GGUFError(
            f"tensor type {type_name} has no int4 codes to keep (only {', '.join(INT4_BLOCKS)}); dequantize it instead"
        )
    block, size = 32, BLOCK_BYTES[type_name]
    if len(shape) != 2 or shape[1] % block or raw.numel() != shape[0] * shape[1] // block * size:
        raise GGUFError(
            f"{type_name} bytes ({raw.numel()}) do not hold a 2-D weight of shape {tuple(shape)} "
            f"in blocks of {block} values ({size} bytes each)"
        )
    n, k = shape
    b = raw.reshape(-1).view(torch.uint8).view(-1, size)
    d = _f16(b[:, :2])  # (blocks, 1)
    zeros = torch.zeros_like(d) if type_name == "Q4_0" else _f16(b[:, 2:4]) + 8 * d
    codes = _nibbles(b[:, INT4_BLOCKS[type_name] :]).reshape(n, k)
    return QuantizedWeight("int4", codes, d.reshape(n, k // block), zeros.reshape(n, k // block), block)
