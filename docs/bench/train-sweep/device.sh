#!/usr/bin/env bash
# One device call (BENCHMARKS.md section V): the CUDA tests alongside a sweep of demo-model training recipes
# (scripts/train_sweep.py; steps per run from CPU step times, so runs compare at equal CPU minutes).
# Usage: docs/bench/train-sweep/device.sh OUT RUNS CORPUS PROMPTS [SECONDS]
set -uo pipefail
OUT=${1:?} RUNS=${2:?} CORPUS=${3:?} PROMPTS=${4:?} LIMIT=${5:-420}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 RAYON_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
[ -n "${SKIP_TESTS:-}" ] || (timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gdn_triton.py tests/models/test_graphs.py \
  tests/train/test_train.py -k cuda > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log") &
timeout "$LIMIT" python3 scripts/train_sweep.py "$RUNS" --corpus "$CORPUS" --prompts "$PROMPTS" --out /tmp/sweep \
  --parallel ${PARALLEL:-9}
echo "sweep rc=$?"
wait
[ -n "${SKIP_TESTS:-}" ] || grep -E "passed|failed|error|rc=" "$OUT/tests.log" | tail -5
for f in /tmp/sweep/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -E "val loss|train:|Error|error" | tail -3; done
tar -C /tmp -czf "$OUT/sweep.tar.gz" --exclude="*.safetensors" --exclude=train_state --exclude="*.log" sweep
