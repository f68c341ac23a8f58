#!/usr/bin/env bash
# GPU check of the live SDE and the tracker (issue #10): at most 8 minutes on one GPU.
#
#   experiments/gpu_check.sh --prepare   # here, with pip: the wheels the GPU image lacks -> .whl/
#   experiments/gpu_check.sh             # on the GPU machine (carry .whl): benchmarks + CUDA tests
#
# Runs, on CUDA:
#   1. experiments/bench_live_sde.py: one Euler step of LipschitzSDE(model, data) against its
#      gradient evaluations by plain autograd (live/floor), the paper's MLP with n = 256 and
#      1,024 trajectories (M = 128) and the Table 1 ConvNet with n = 64 (M = 256);
#   2. experiments/bench_tracking.py: a tracked SGD step against a plain one (tracked/plain);
#   3. the CUDA tests of the suite (factored SDE engine against CPU, simulation front end).
# Everything it prints is also written to $OUT (default /tmp/gpu_check): live.json,
# tracking.json, log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torchsde==0.2.6 trampoline==0.1.2 mlxtend==0.25.0
    exit $?
fi

OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

echo "== live SDE (LipschitzSDE(model, data), one Euler step) =="
timeout 240 python3 experiments/bench_live_sde.py --device cuda --configs mlp256 mlp1024 convnet64 --repeats 2 \
    --no-memory --json "$OUT/live.json"
echo "== live SDE with the per-trajectory Gram route on the GPU =="
timeout 90 python3 experiments/bench_live_sde.py --device cuda --configs mlp256 --repeats 1 --no-memory \
    --decomposition fast --json "$OUT/live_fast.json"
echo "== tracking (tracked / plain SGD step) =="
timeout 120 python3 experiments/bench_tracking.py --device cuda --no-memory --steps 20 --json "$OUT/tracking.json"
echo "== CUDA tests =="
timeout 60 python3 -m pytest -q -p no:cacheprovider -k cuda tests/sde/test_sde_factored.py tests/sde/test_sde_reduced.py
