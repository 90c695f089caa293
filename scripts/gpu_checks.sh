#!/usr/bin/env bash
# The GPU checks, in one go, most important first (run from the repo root on a machine
# with CUDA and a CUDA build of torch; transformers is optional):
#   bash scripts/gpu_checks.sh OUT_DIR
# 1. the NumPy-vs-autograd comparisons on CUDA (float32 and float64);
# 2. the tests marked cuda (they skip on a machine without one), then the fast suite;
# 3. the training-step throughput at the gpu preset's shape (scripts/bench_steps.py):
#    tokens/s and MFU against the GPU's bf16 peak, fp32 / bf16 autocast / torch.compile,
#    beside transformers' GPT-2 with the same weights when transformers is installed;
# 4. DDP on CUDA: `torchrun --nproc-per-node G -m minidpo sft` (NCCL) at the tiny preset,
#    G = the GPUs present;
# 5. the whole pipeline at --preset gpu, timed.
# Each part writes its own files under OUT_DIR and has its own time limit, so a part
# that runs out of time still leaves the parts before it.
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
runs=$(mktemp -d)
rc=0
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$out/env.txt" 2>&1

# 1. NumPy reference against autograd on the GPU
timeout 120 python scripts/check_gpu.py --out "$out/check_gpu.json" | tee "$out/check_gpu.txt"
rc=$((rc | PIPESTATUS[0]))

# 2. the CUDA tests, then every fast test
timeout 180 python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -15 | tee "$out/pytest_cuda.txt"
rc=$((rc | PIPESTATUS[0]))

# 3. step throughput at the gpu preset's shape (a short SFT run makes the checkpoint)
timeout 120 python -m minidpo sft --preset gpu --device cuda --runs-dir "$runs" --name shape \
  --steps 20 --eval-every 20 --ckpt-every 20 > "$out/shape_sft.txt" 2>&1
for mode in "" "--bf16" "--compile" "--bf16 --compile"; do
  tag=$(echo "fp32 $mode" | tr -d '-' | tr ' ' '_')
  timeout 240 python scripts/bench_steps.py --checkpoint "$runs/shape/sft/checkpoint.pt" \
    --device cuda --seq 128 --repeat 20 --warmup 5 $mode --out "$out/steps_$tag.json" 2>&1 \
    | grep -v "Loading weights" | tee "$out/steps_$tag.txt"
done

# 4. DDP over the GPUs present, NCCL
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
{ time timeout 180 torchrun --standalone --nproc-per-node "$gpus" -m minidpo sft --preset tiny \
    --device cuda --runs-dir "$runs" --name ddp ; } > "$out/ddp_sft.txt" 2>&1
rc=$((rc | $?))

# 5. the whole pipeline at the gpu preset
{ time timeout 900 python -m minidpo pipeline --preset gpu --device cuda --runs-dir "$runs" \
    --name gpu ; } 2>&1 | grep -v "it/s" | tail -40 > "$out/pipeline_gpu.txt"
cp "$runs/gpu/eval/results.json" "$out/pipeline_gpu_results.json" 2>/dev/null
python - "$runs/gpu" > "$out/pipeline_gpu_stages.json" <<'EOF'
import json, sys
from pathlib import Path
stamps = sorted(Path(sys.argv[1], "stages").glob("*.json"))
print(json.dumps({p.stem: json.loads(p.read_text())["cost"] for p in stamps}, indent=2))
EOF
exit $rc
