#!/usr/bin/env bash
# One prepared GPU session: versions, build, the kernel tests on CUDA (Triton backend),
# then the roofline benchmark. Logs and results go to $OUT (or benchmarks/results/gpu).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")"
} 2>&1 | tee "$OUT/versions.txt"
# the C++ extension too, so the CPU-vs-Triton noise test runs
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || echo "C++ build failed (see build.log)"
timeout 200 python3 -m pytest -q -p no:cacheprovider --maxfail=20 --timeout=120 \
  tests/test_latent.py tests/test_likelihood.py tests/test_elbo.py -k "triton or cuda" \
  2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout 200 python3 benchmarks/gpu_roofline.py --out "$OUT" 2>&1 | tee "$OUT/roofline.txt"
