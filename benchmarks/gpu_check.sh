#!/usr/bin/env bash
# The GPU check of issue #2, as one script for a lent GPU machine (no network, its own python3 with
# torch; our package is used from the source tree, open-mythos from a wheel carried in .whl/):
#   1. the model unit tests with CUDA as the default device (tests/conftest.py: MYTHOS_TEST_DEVICE)
#   2. the CUDA-only tests (tests/gpu, marker `cuda`: CPU-vs-GPU equality, bf16 grouped GEMM, bf16 training)
#   3. benchmarks/bench_moe.py on CUDA in fp32 and bf16, beside open-mythos 0.5.0
# Logs go to $OUT (default ./gpu_out). Prepare here: pip download --no-deps open-mythos==0.5.0 -d .whl
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/open_mythos-*.whl || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import torch; from mythos_dist.model.moe import _grouped_mm_works as w
print('F.grouped_mm usable: fp32', w('cuda', torch.float32), 'bf16', w('cuda', torch.bfloat16))"
} 2>&1 | tee "$OUT/env.txt"
MODEL_TESTS="tests/unit/test_model.py tests/unit/test_moe.py tests/unit/test_stability.py tests/unit/test_config.py"
echo "== 1. model unit tests, default device cuda"
MYTHOS_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider $MODEL_TESTS >"$OUT/tests_model_cuda.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|error" "$OUT/tests_model_cuda.log" | tail -12
echo "== 2. CUDA-only tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu >"$OUT/tests_gpu.log" 2>&1
echo "rc=$?"; grep -E "passed|failed|error|Error" "$OUT/tests_gpu.log" | tail -12
for dtype in fp32 bf16; do
  echo "== 3. bench_moe on cuda, $dtype"
  timeout 240 python3 benchmarks/bench_moe.py --device cuda --dtype "$dtype" --repeats 7 \
    --tokens 512 4096 65536 --batch 128 4096 >"$OUT/bench_$dtype.log" 2>&1
  echo "rc=$?"; tail -14 "$OUT/bench_$dtype.log"
done
