#!/usr/bin/env bash
# The GPU checks, in one go (run from the repo root on a machine with CUDA):
#   bash scripts/gpu_checks.sh OUT_DIR
# 1. the NumPy-vs-autograd comparisons on CUDA (float32 and float64),
# 2. the test suite (fast tests; the CUDA-only ones run instead of skipping),
# 3. the tiny and default pipelines on CUDA, timed,
# 4. SFT sample quality against training length (the default model, on CUDA).
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/env.txt"
python scripts/check_gpu.py --out "$out/check_gpu.json" | tee "$out/check_gpu.txt"
rc=${PIPESTATUS[0]}
python -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tail -25 | tee "$out/pytest.txt"
rc=$((rc | PIPESTATUS[0]))
runs=$(mktemp -d)
{ time python -m minidpo demo --preset tiny --device cuda --runs-dir "$runs" --name tiny ; } 2>&1 | grep -v "it/s" | tail -20 | tee "$out/demo_tiny.txt"
{ time python -m minidpo demo --device cuda --runs-dir "$runs" --name cpu_preset_on_gpu ; } 2>&1 | grep -v "it/s" | tail -25 | tee "$out/demo_default.txt"
for steps in 500 2000 5000; do
  python -m minidpo sft --device cuda --runs-dir "$runs" --name "steps$steps" --steps "$steps" 2>/dev/null
  python scripts/sft_report.py --run "$runs/steps$steps" --n 1000 --device cuda --out "$runs/steps$steps" \
    | python -c "import json,sys; t=sys.stdin.read(); r=json.loads(t[:t.rindex('}')+1]); print('sft steps $steps', json.dumps(r['sft_samples']))"
done 2>&1 | tee "$out/sft_steps.txt"
exit $rc
