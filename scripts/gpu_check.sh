#!/usr/bin/env bash
# One run on a GPU machine: the CUDA-only tests (bf16 kernels, CUDA-graph replay, triton vs torch
# backend) and the GPU benchmark (Llama-3-8B shape, random weights, transformers in the same run).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # results and logs go to OUT_DIR (default benchmarks/results)
#
# Offline machines: the project is installed without build isolation (setuptools must be present), and
# the tests need the llama-models package for the real tokenizer file; carry its wheel if it is missing
# (pip download --no-deps llama-models==0.3.0) and install it with --no-deps first.
# gpt-fast joins the benchmark when third_party/gpt-fast holds its model.py and generate.py (an ignored
# folder: carry it to the GPU machine, never commit it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -q -x tests/test_kernels.py tests/test_backends.py tests/test_generation.py 2>&1 | tee "$out/gpu-tests.log"
python3 scripts/kernel_report.py 2>&1 | tee "$out/kernel-report.log"  # compiled for this GPU's toolchain
gpt_fast=()
[ -f third_party/gpt-fast/generate.py ] && gpt_fast=(--gpt-fast third_party/gpt-fast)
python3 benchmarks/bench_generate.py --device cuda "${gpt_fast[@]}" --out "$out/generate-cuda" 2>&1 | tee "$out/gpu-bench.log"
