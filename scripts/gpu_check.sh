#!/usr/bin/env bash
# The CUDA checks, in one go, on a GPU machine with torch preinstalled (no pip install of the
# project: its torch pin is for CPU CI). Writes logs/JSON under ${OUT:-gpu-out}.
# Usage: bash scripts/gpu_check.sh          (docs/design.md: what it ran and what it saw)
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for packages the machine lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py \
  tests/data/test_loader_device.py tests/sync/test_sync_timing.py \
  tests/test_launch_unit.py::test_nccl_layouts_that_cannot_run_are_config_errors \
  2>&1 | tee "$OUT/pytest.log" | tail -40
# Per-step in-memory checkpoint cost on the GPU: the same short run with and without it.
for every in 1 0; do
  timeout $([ $every = 1 ] && echo 90 || echo 45) python3 -m zentrain.cli run --nproc 1 --set train.steps=40 \
    --set checkpoint.memory_every=$every --set checkpoint.every=0 \
    --set train.eval_every=0 --run-dir "$OUT/cost$every" >"$OUT/cost$every.log" 2>&1
  python3 - "$OUT/cost$every/metrics.jsonl" "$every" <<'PY'
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
t = [r["step_time_s"] for r in rows[10:]]
print(f"memory_every={sys.argv[2]}: median step {statistics.median(t)*1e3:.1f} ms over {len(t)} steps")
PY
done
timeout 60 python3 -m zentrain.cli bench data configs/deepfm.toml --device cuda --workers 2 --steps 30 \
  --warmup 10 --json "$OUT/data_cuda.json" 2>&1 | tail -25
