#!/usr/bin/env bash
# One run on a GPU machine: the CUDA tests (bf16 kernels, CUDA-graph replay, triton vs torch backend,
# the measured GEMV / cuBLAS choice), the kernels' compile report, and the GPU benchmark (`llama3 bench`
# on the Llama-3-8B shape with random weights, transformers and the weights-alone floor in the same run).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [all|tests|bench|quant|quant-generate|spec]   # logs, results go to
#                                                                   # OUT_DIR (default benchmarks/results, all)
# Each part fits one 10-minute device call: about 2 minutes of tests, a few of benchmark. Weight-only
# int8 / int4, not timed on a GPU yet (give each part a
# call of its own): `quant` runs the quantized kernels' tests (bf16, CUDA-graph capture) and bench_quant.py
# (our Triton kernels beside tinygemm, torch._weight_int8pack_mm and bf16 cuBLAS, per Llama-3-8B
# projection); `quant-generate` the decode benchmark at batch 1, Llama-3-8B in bf16 / int8 / int4, then
# Llama-3-70B in int4.
# `spec`: speculative decoding's verified step (Llama-3-8B shape drafted by a 1B shape) against plain steps,
# and the break-even acceptance rate (bench_speculative.py writes to benchmarks/results/).
#
# Offline GPU machines: put wheels in .whl/ (ignored), then carry it to the machine. From this repo:
#   pip download --no-deps -d .whl llama-models==0.3.0 pytest==9.2.0 pluggy==1.6.0 iniconfig==2.1.0
# and run `bash scripts/gpu_check.sh $OUT` with carry [".whl"]. The llama-models wheel
# holds the real tokenizer file the generation tests use; pytest is installed only where missing.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
part=${2:-all}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -d .whl ]; then
    python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl
    python3 -m pip install -q --no-deps --no-index .whl/llama_models-*.whl
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation -e .; then
    # kernels/ ships as llama3.kernels only when installed; for this run, a link does the same
    echo "pip install -e . failed; linking llama3/kernels for this run"
    ln -sfn ../kernels llama3/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$part" = all ] || [ "$part" = tests ]; then
    python3 -m pytest -q -rs tests/test_kernels.py tests/test_backends.py tests/test_generation.py 2>&1 | tee "$out/gpu-tests.log"
    python3 scripts/kernel_report.py 2>&1 | tee "$out/kernel-report.log"  # this machine's triton and ptxas
fi
if [ "$part" = all ] || [ "$part" = bench ]; then
    python3 -m llama3 bench --model random:llama-3-8b --device cuda --dtype bfloat16 -p 128,2048 -n 128 -b 1,8 \
        -r 5 --compare transformers,floor --json "$out/generate-cuda.json" 2> "$out/gpu-bench.log" \
        | tee "$out/generate-cuda.md"
fi
if [ "$part" = all ] || [ "$part" = quant ]; then
    python3 -m pytest -q -rs tests/test_kernels_quant.py 2>&1 | tee "$out/gpu-quant-tests.log"
    python3 scripts/kernel_report.py --quantized 2>&1 | tee "$out/kernel-report-quantized.log"
    python3 benchmarks/bench_quant.py --out "$out/quant-cuda" 2>&1 | tee "$out/gpu-quant-bench.log"
fi
if [ "$part" = all ] || [ "$part" = quant-generate ]; then
    python3 -m llama3 bench --model random:llama-3-8b --device cuda --dtype bfloat16 --quantize none,int8,int4 \
        --group-size 128 -p 2048 -n 128 -r 3 --compare floor --json "$out/generate-cuda-quantized.json" \
        2> "$out/gpu-quant-generate.log" | tee "$out/generate-cuda-quantized.md"
    python3 -m llama3 bench --model random:llama-3-70b --device cuda --quantize int4 --group-size 128 -p 0 -n 64 \
        -r 2 --json "$out/generate-cuda-70b-int4.json" 2> "$out/gpu-quant-generate-70b.log" \
        | tee "$out/generate-cuda-70b-int4.md"
fi
if [ "$part" = all ] || [ "$part" = spec ]; then
    python3 benchmarks/bench_speculative.py --device cuda 2>&1 | tee "$out/gpu-speculative.log"
fi
