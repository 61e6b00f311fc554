"""The CPU's instruction sets, as the quantized kernels care about them.

PyTorch's own kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) dispatch on ATen's CPU capability
(`torch.backends.cpu.get_cpu_capability()`: DEFAULT, AVX2, AVX512, ..., lowered by `ATEN_CPU_CAPABILITY`);
fbgemm (`torch.ops.quantized.linear_dynamic`) picks its own code from the CPU (cpuinfo), whatever ATen does.
AVX512-VNNI matters to fbgemm: its dot products then add uint8 x int8 products straight into int32, where
AVX2's `vpmaddubsw` adds pairs in saturating int16 (so activations get 7 bits there, 8 with VNNI); fbgemm's own
FBGEMM_ENABLE_INSTRUCTIONS lowers its code as ATEN_CPU_CAPABILITY lowers ATen's (`fbgemm_vnni`). On ARM,
`_dyn_quant_matmul_4bit` runs KleidiAI's NEON / SVE kernels (on x86 it is a reference loop).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_model() -> str:
    """The CPU's name ("model name" in /proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def isa() -> dict[str, bool]:
    """Which of the instruction sets the kernels use this CPU has (PyTorch's cpuinfo answers)."""
    cpu = torch.cpu
    arm = platform.machine().lower() in ("arm64", "aarch64")
    return {
        "avx2": cpu._is_avx2_supported(),
        "avx512": cpu._is_avx512_supported(),
        "avx512_vnni": cpu._is_vnni_supported(),
        "avx512_bf16": cpu._is_avx512_bf16_supported(),
        "amx": cpu._is_amx_tile_supported(),
        "arm": arm,
    }


def fbgemm_vnni() -> bool:
    """Whether fbgemm's int8 GEMMs run VNNI code here: the CPU has AVX512-VNNI and FBGEMM_ENABLE_INSTRUCTIONS, which
    fbgemm reads at its first call, does not lower it to code without it ("AVX2", "AVX512", "AVX512_256"; "AVX512_E1"
    and "AVX512_E1_256" keep it, and fbgemm ignores any other value: fbgemm's src/Utils.cc, fbgemmEnvGetIsa).
    Setting it to AVX2 with ATEN_CPU_CAPABILITY=avx2 runs both libraries as on a CPU without AVX-512."""
    capped = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() in ("AVX2", "AVX512", "AVX512_256")
    return isa()["avx512_vnni"] and not capped


def aten_capability() -> str:
    """The instruction set ATen's CPU kernels dispatch to (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


def describe() -> str:
    """One line: the CPU, its instruction sets, ATen's dispatch and the torch version."""
    have = [name for name, ok in isa().items() if ok] or ["no SIMD extension PyTorch uses"]
    return f"{cpu_model()}; {', '.join(have)}; ATen dispatch {aten_capability()}; torch {torch.__version__}"
