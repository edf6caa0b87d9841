#!/usr/bin/env bash
# One prepared GPU session: versions, build, the kernel tests on CUDA (Triton backend),
# then the roofline benchmark. Logs and results go to $OUT (or benchmarks/results/gpu).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/versions.txt"
# the C++ extension too, so the CPU-vs-Triton noise test runs
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || echo "C++ build failed (see build.log)"
# one fixed Triton config in the tests: autotuning every test shape would dominate the run
VAE_FAST_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider --maxfail=20 \
  --timeout=100 -k "(triton or cuda) and not compile" tests/test_latent.py tests/test_likelihood.py tests/test_elbo.py tests/test_dmol.py \
  tests/test_contracts.py tests/test_heads.py tests/test_mse.py tests/test_laplace.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout ${BENCH_TIMEOUT:-170} python3 benchmarks/gpu_roofline.py --out "$OUT" 2>&1 | grep -v "^- \|Warning\|_warn_once" | tee "$OUT/roofline.txt"
# whole training steps on the GPU (quick subset: the MLPs, the RGB mixture VAE, conv Bernoulli; no compile)
timeout ${STEPS_TIMEOUT:-120} python3 -m benchmarks.bench_steps --quick --device cuda --out "$OUT" 2>&1 | tail -12 | tee "$OUT/steps.txt"
VAE_FAST_TRITON_AUTOTUNE=0 timeout ${COMPILE_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider --timeout=80 \
  -k "(triton or cuda) and compile" tests/test_latent.py tests/test_likelihood.py tests/test_elbo.py tests/test_dmol.py \
  2>&1 | tail -15 | tee "$OUT/tests_compile.txt"
