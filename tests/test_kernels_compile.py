"""Every Triton kernel compiled for an H100 (sm_90) at Llama-3-8B shapes, without a GPU.

The interpreter (test_kernels.py) checks what the kernels compute; it cannot check that they compile
for a real GPU, or how. `scripts/kernel_report.py` runs each wrapper on meta tensors with its launches
recorded and compiles every launch ahead of time with Triton's own compiler and ptxas, specialized as
the launcher would. Here each compiled kernel is held to what a memory-bound kernel needs: no
register spills, and the big streams (weights, KV cache) read in asynchronous or 16-byte vector
copies, not element by element. (A subprocess: the compiler cannot run beside the interpreter.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kernel_report.py"


def compile_all(batch: int, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--arch", "90", "--batch", str(batch), "--json", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module", params=[1, 8], ids=["batch1", "batch8"])
def kernels(request) -> list[dict]:
    return compile_all(request.param)


def test_every_kernel_compiles_for_sm90_without_register_spills(kernels: list[dict]) -> None:
    labels = {k["label"].split()[0] for k in kernels}
    assert labels == {"rms_norm+residual", "rope_and_cache", "swiglu", "decode_attention", "gemv"}
    for k in kernels:
        assert k["target"] == "sm_90a", k
        assert k["spilled_bytes"] == 0, k
        assert k["shared_bytes"] <= 227 * 1024, k  # an H100 block's shared memory


def test_large_streams_are_read_in_async_or_16_byte_copies(kernels: list[dict]) -> None:
    for k in kernels:
        label, loads = k["label"], k["loads"]
        main_kernel = "(kernel 2)" not in label
        if main_kernel and (label.startswith("gemv") or label == "decode_attention"):
            assert loads["cp.async"] > 0, f"{label}: weights / KV cache not pipelined through shared memory: {loads}"
        else:
            assert loads["v4"] > 0, f"{label}: no 16-byte vector loads: {loads}"


@pytest.fixture(scope="module")
def quantized_kernels() -> list[dict]:
    """Only the int8 / int4 kernels of `kernel_report.py --quantized` (decode GEMV, tiled prefill, dequantize)."""
    return [k for k in compile_all(1, "--quantized") if k["label"].startswith(("int8", "int4"))]


def test_quantized_kernels_compile_and_stream_their_codes(quantized_kernels: list[dict]) -> None:
    """The int8/int4 GEMV and tiled-prefill kernels pipeline their codes through shared memory (the first
    int4 version read them a byte at a time); the dequantize kernels write in 16-byte vectors."""
    labels = {k["label"] for k in quantized_kernels}
    for kind in ("int8 gemv", "int4/128 gemv", "int8 prefill", "int4/128 prefill", "int8 dequantize"):
        assert any(label.startswith(kind) for label in labels), (kind, sorted(labels))
    for k in quantized_kernels:
        label, loads = k["label"], k["loads"]
        assert k["target"] == "sm_90a" and k["spilled_bytes"] == 0, k
        if "(kernel 2)" in label or "dequantize" in label:
            assert loads["v4"] > 0, f"{label}: no 16-byte vector loads: {loads}"
        else:
            assert loads["cp.async"] > 0, f"{label}: codes not pipelined through shared memory: {loads}"
