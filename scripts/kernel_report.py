"""Compile every Triton kernel for a GPU without one, and report what the compiler made of it.

    python scripts/kernel_report.py                 # Llama-3-8B decode and prefill shapes, bf16, sm_90 (H100)
    python scripts/kernel_report.py --arch 80       # A100
    python scripts/kernel_report.py --quantized     # + the int8 / int4 weight-only kernels

Each kernel wrapper runs on meta tensors while its launches are recorded instead of executed; every
recorded launch is then compiled ahead of time for the chosen architecture with the same
specialization Triton's launcher would apply (16-byte-aligned pointers and integers divisible by 16
are marked so, integers equal to 1 become constants). That catches what the CPU interpreter cannot:
code that does not compile for a real GPU, register spills, and how the memory traffic was
vectorized (16-byte `ld.global.v4` loads or `cp.async` copies, against scalar loads).

Run it without TRITON_INTERPRET: the interpreter patches triton.language, which the compiler needs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "decode_attention", "gemv", "quant_gemv")
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclass
class Launch:
    """One kernel launch as the wrapper made it: the Python kernel function, its arguments, its options."""

    kernel: Callable
    args: tuple
    kwargs: dict
    label: str = ""


@dataclass
class Compiled:
    launch: Launch
    ptx: str
    registers: int
    spilled_bytes: int
    shared_bytes: int
    loads: dict[str, int] = field(default_factory=dict)


class _Recorder:
    def __init__(self, kernel, launches: list[Launch]):
        self.fn = getattr(kernel, "fn", kernel)  # the undecorated function of a JITFunction or interpreted one
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.fn, args, kwargs))


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, kernel launches in llama3.kernels are recorded, not run."""
    launches: list[Launch] = []
    saved = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"llama3.kernels.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("_") and attr.endswith("_kernel"):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(value, launches))
    try:
        yield launches
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _specialize(value) -> tuple[str, bool] | tuple[str, int]:
    """(type, divisible by 16), as Triton's launcher specializes an argument; ("constexpr", 1) for ints of 1."""
    if isinstance(value, torch.Tensor):
        aligned = value.storage_offset() * value.element_size() % 16 == 0  # allocations are 256-byte aligned
        return "*" + TRITON_TYPES[value.dtype], aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


def compile_launch(launch: Launch, arch: int = 90):
    """The recorded launch compiled ahead of time for sm_<arch>: a triton CompiledKernel (ptx, cubin, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = JITFunction(launch.kernel)
    launch_options = ("num_warps", "num_stages")
    options = {k: v for k, v in launch.kwargs.items() if k in launch_options}
    kernel_kwargs = {k: v for k, v in launch.kwargs.items() if k not in launch_options}
    bound = dict(zip(jit.arg_names, launch.args, strict=False)) | kernel_kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = _specialize(value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes spilled to local memory) from cuobjdump, shipped with triton."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(local.group(1)) if local else 0


def _count_loads(ptx: str) -> dict[str, int]:
    return {
        "v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        "v2": len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.", ptx)),
        "scalar": len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b|u|f|s)\d+ ", ptx)),
        # asynchronous global -> shared copies of 16 bytes (the widest; smaller ones mean a misaligned stream)
        "cp.async": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\], (?:0x10|16)\b", ptx)),
    }


def compile_and_inspect(launch: Launch, arch: int = 90) -> Compiled:
    kernel = compile_launch(launch, arch)
    registers, spilled = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    return Compiled(launch, ptx, registers, spilled, kernel.metadata.shared, _count_loads(ptx))


def llama3_8b_launches(
    batch: int = 1, prompt_len: int = 2048, cache_len: int = 4096, quantized: bool = False
) -> list[Launch]:
    """The kernels' launches for a Llama-3-8B bf16 decode step and prefill, recorded on meta tensors; with
    `quantized`, those of the int8 / int4 weight kernels too (`quantized_cases`)."""
    from llama3.kernels.decode_attention import decode_attention
    from llama3.kernels.gemv import gemv
    from llama3.kernels.rms_norm import rms_norm
    from llama3.kernels.rope import rope_and_cache
    from llama3.kernels.swiglu import swiglu

    dim, ffn, H, KVH, D, vocab = 4096, 14336, 32, 8, 128, 128256
    bf16 = dict(dtype=torch.bfloat16, device="meta")
    cache = torch.empty(batch, KVH, cache_len, D, **bf16)
    cases: list[tuple[str, Callable[[], object]]] = []
    for phase, T in (("decode", 1), ("prefill", prompt_len)):
        x = torch.empty(batch, T, dim, **bf16)
        qkv = torch.empty(batch, T, (H + 2 * KVH) * D, **bf16)
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        cos = torch.empty(batch, T, D // 2, dtype=torch.float32, device="meta")
        pos = torch.empty(batch, T, dtype=torch.long, device="meta")
        w = torch.empty(dim, **bf16)
        cases += [
            (f"rms_norm+residual {phase}", lambda x=x, w=w: rms_norm(x, w, 1e-5, x)),
            (
                f"rope_and_cache {phase}",
                lambda q=q, k=k, v=v, cos=cos, pos=pos, T=T: rope_and_cache(
                    q.view(batch, T, H, D),
                    k.view(batch, T, KVH, D),
                    v.view(batch, T, KVH, D),
                    cos,
                    cos,
                    cache,
                    cache,
                    pos,
                ),
            ),
            (f"swiglu {phase}", lambda T=T: swiglu(torch.empty(batch, T, 2 * ffn, **bf16))),
        ]
    q1 = torch.empty(batch, H, D, **bf16)
    pos1 = torch.empty(batch, dtype=torch.long, device="meta")
    cases.append(("decode_attention", lambda: decode_attention(q1, cache, cache, pos1)))
    x1 = torch.empty(batch, dim, **bf16)
    for name, n, k in (
        ("qkv", (H + 2 * KVH) * D, dim),
        ("o", dim, H * D),
        ("gate+up", 2 * ffn, dim),
        ("down", dim, ffn),
        ("lm_head", vocab, dim),
    ):
        xk = x1 if k == dim else torch.empty(batch, k, **bf16)
        for block_n in (16, 64):
            cases.append(
                (
                    f"gemv {name} {n}x{k} /{block_n}",
                    lambda xk=xk, n=n, k=k, block_n=block_n: gemv(xk, torch.empty(n, k, **bf16), None, block_n),
                )
            )

    if quantized:
        cases += quantized_cases(batch, prompt_len)

    launches: list[Launch] = []
    for label, run in cases:
        with recorded_launches() as recorded:
            run()
        for j, launch in enumerate(recorded):
            launch.label = label + ("" if j == 0 else f" (kernel {j + 1})")
        launches += recorded
    return launches


def quantized_cases(batch: int, prompt_len: int, group_size: int = 128) -> list[tuple[str, Callable[[], object]]]:
    """The int8 / int4 kernels (`quant_gemv`) on the Llama-3-8B projections: the decode GEMV, the tiled prefill
    and the dequantize kernel of the other prefill path."""
    from llama3.kernels.quant_gemv import (
        dequantize_int4_weight,
        dequantize_int8_weight,
        int4_matmul,
        int8_matmul,
    )

    dim, ffn, vocab = 4096, 14336, 128256
    bf16 = dict(dtype=torch.bfloat16, device="meta")
    shapes = (("qkv", 6144, dim), ("o", dim, dim), ("gate+up", 2 * ffn, dim), ("down", dim, ffn))
    cases: list[tuple[str, Callable[[], object]]] = []
    for name, n, k in (*shapes, ("lm_head", vocab, dim)):
        codes = torch.empty(n, k, dtype=torch.int8, device="meta")
        scales = torch.empty(n, **bf16)
        x = torch.empty(batch, k, **bf16)
        cases.append((f"int8 gemv {name} {n}x{k}", lambda x=x, c=codes, s=scales: int8_matmul(x, c, s)))
    for name, n, k in shapes:
        packed = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
        scales = torch.empty(n, k // group_size, **bf16)
        x = torch.empty(batch, k, **bf16)
        cases.append(
            (
                f"int4/{group_size} gemv {name} {n}x{k}",
                lambda x=x, p=packed, s=scales: int4_matmul(x, p, s, s, group_size),
            )
        )
    n, k = 2 * ffn, dim
    x = torch.empty(batch * prompt_len, k, **bf16)
    codes = torch.empty(n, k, dtype=torch.int8, device="meta")
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
    scales8, scales4 = torch.empty(n, **bf16), torch.empty(n, k // group_size, **bf16)
    cases += [
        ("int8 prefill gate+up (tiled)", lambda: int8_matmul(x, codes, scales8)),
        (f"int4/{group_size} prefill gate+up (tiled)", lambda: int4_matmul(x, packed, scales4, scales4, group_size)),
        ("int8 dequantize gate+up", lambda: dequantize_int8_weight(codes, scales8)),
        (f"int4/{group_size} dequantize gate+up", lambda: dequantize_int4_weight(packed, scales4, scales4, group_size)),
    ]
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, 80: A100)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object per launch instead of the table")
    p.add_argument("--quantized", action="store_true", help="also the int8 / int4 weight kernels (quant_gemv)")
    a = p.parse_args()
    if a.json:
        for launch in llama3_8b_launches(a.batch, quantized=a.quantized):
            c = compile_and_inspect(launch, a.arch)
            target = re.search(r"^\.target (\w+)", c.ptx, re.M)
            row = dict(label=launch.label, target=target.group(1) if target else None, registers=c.registers)
            print(json.dumps(row | dict(spilled_bytes=c.spilled_bytes, shared_bytes=c.shared_bytes, loads=c.loads)))
        return
    print(f"sm_{a.arch}, Llama-3-8B shapes, bf16, batch {a.batch}")
    print(f"{'launch':<38} {'regs':>5} {'spill B':>8} {'smem B':>7}  global loads (v4 / v2 / scalar / cp.async)")
    for launch in llama3_8b_launches(a.batch, quantized=a.quantized):
        c = compile_and_inspect(launch, a.arch)
        ld = c.loads
        print(
            f"{launch.label:<38} {c.registers:>5} {c.spilled_bytes:>8} {c.shared_bytes:>7}  "
            f"{ld['v4']} / {ld['v2']} / {ld['scalar']} / {ld['cp.async']}"
        )


if __name__ == "__main__":
    main()
