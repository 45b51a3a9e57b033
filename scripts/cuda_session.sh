#!/usr/bin/env bash
# One device session's CUDA measurements (see BENCHMARKS.md, section "CUDA"): the correctness checks of
# scripts/cuda_check.py, then `mtpx bench` with CUDA graphs and eagerly, on the demo model and on a random-weight
# Qwen3.5-0.8B body (synthetic acceptance 0.8). Writes OUT/results.tar.gz and OUT/log.txt.
# Usage: scripts/cuda_session.sh OUT [TOKENIZER_DIR]   (a tokenizer for the 0.8B body saves training one)
set -uo pipefail
OUT=${1:?output directory}
TOK=${2:-}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/cuda
py=python3
bench() { $py -m mtpx.cli bench --device cuda --temperature 0 --no-memory --no-costs --no-plots "$@"; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $py -c "import torch; print('torch', torch.__version__)"
  $py scripts/cuda_check.py --prompts 4 > /tmp/cuda/check.json; echo "cuda_check rc=$?"
  cat /tmp/cuda/check.json
  bench --model demo --workloads code,chat --modes none,mtp1,mtp2,mtp3,mtp4,mtp3v2048 --max-prompts 6 --repeat 2 \
    --out /tmp/cuda/demo-graphs
  bench --model demo --workloads code --modes none,mtp3 --max-prompts 6 --repeat 1 --no-cuda-graphs \
    --out /tmp/cuda/demo-eager
  $py -m mtpx.cli bench gen-checkpoint --shape qwen3.5-0.8b --out /tmp/q08b ${TOK:+--tokenizer-from $TOK}
  bench --model /tmp/q08b --workloads code --modes none,mtp1,mtp2,mtp3 --spec-synth-rates 0.8 --max-prompts 4 \
    --repeat 2 --out /tmp/cuda/q08b-graphs
  bench --model /tmp/q08b --workloads code --modes none,mtp3 --spec-synth-rates 0.8 --max-prompts 4 --repeat 1 \
    --no-cuda-graphs --no-roofline --out /tmp/cuda/q08b-eager
} 2>&1 | tee "$OUT/log.txt"
tar -C /tmp/cuda -czf "$OUT/results.tar.gz" .
