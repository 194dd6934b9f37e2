#!/usr/bin/env bash
# The GPU checks of the speed work, sized for 15 minutes of one H100/H200: the rollout bench on
# CUDA in bf16 (a Qwen2-0.5B-shaped model from its config; our step from CUDA graphs and eager,
# against HF generate), then 20 steps of `aha zero` on the
# embedded model with --device auto --bf16, then 12 more with --compile-train (the trainer's
# layers under torch.compile) against those. Run from the repository root on the GPU machine;
# it writes its logs to ${OUT:-runs/gpu}. Prepared, not yet run: no GPU was lent so far.
set -euo pipefail
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 AHAMOMENT_CACHE=${AHAMOMENT_CACHE:-$out/cache}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
# the image's torch stays; ahamoment and its pure-Python dependencies come from wheels in .whl
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
# the graphed step against the eager one, captured on this GPU (a failure is reported, not fatal)
if python3 -c "import pytest" 2>/dev/null; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tee "$out/graphs_test.txt" || true
fi
timeout 360 python3 bench/gpu_rollout.py --repeats 3 --hf-static 2>&1 | tee "$out/gpu_rollout.txt"
timeout 300 python3 -m ahamoment.cli zero --device auto --bf16 --steps 20 --heldout-n 100 \
  --eval-every 0 --no-real-eval --out "$out/zero" 2>&1 | tee "$out/zero.txt"
timeout 200 python3 -m ahamoment.cli zero --device auto --bf16 --steps 12 --heldout-n 100 \
  --eval-every 0 --no-real-eval --compile-train --out "$out/zero_compiled" 2>&1 | tee "$out/zero_compiled.txt"
python3 - "$out" <<'PY'
import json, statistics, sys
def step_s(run):  # median step time after two warm-up steps (the compile lands in the first)
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl") if '"step_s"' in l]
    return statistics.median(r["step_s"] for r in rows[2:])
eager, compiled = step_s("zero"), step_s("zero_compiled")
print(f"zero_gpu_step_s={eager:.3f}")
print(f"zero_gpu_compiled_step_s={compiled:.3f}")
print(f"compile_train_speedup={eager / compiled:.2f}")
PY
