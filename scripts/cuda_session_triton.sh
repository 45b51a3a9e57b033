#!/usr/bin/env bash
# One device call (BENCHMARKS.md, section "CUDA-2"): the CUDA tests, then a change against the path it replaced,
# alternated in the same call (AB: an environment variable whose value 0 turns the change off; first call
# MTPX_TRITON_GDN, the Triton recurrence kernel; second MTPX_PACK, fused projections): step pass times, exactness
# (scripts/cuda_check.py) and `mtpx bench` on the demo model and a random-weight Qwen3.5-0.8B body ("full": every
# MTP depth with the change on, and the bandwidth roof). Results go to OUT as they come, so a call stopped at its
# limit still returns them.
# Usage: [AB=MTPX_PACK] [SECTIONS="tests steps check bench full"] scripts/cuda_session_triton.sh OUT [TOKENIZER_DIR]
# (a tokenizer for the 0.8B body saves training one)
set -uo pipefail
OUT=${1:?output directory}
TOK=${2:-}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=python3
bench_roof=($py -m mtpx.cli bench --device cuda --temperature 0 --no-memory --no-costs --no-plots)
bench=("${bench_roof[@]}" --no-roofline)
SECTIONS=${SECTIONS:-tests steps check bench}  # a subset reruns part of it
AB=${AB:-MTPX_TRITON_GDN}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
step() { echo "== $(date +%T) $*"; }
{
  step env
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  ($py -m mtpx.cli bench gen-checkpoint --shape qwen3.5-0.8b --out /tmp/q08b ${TOK:+--tokenizer-from $TOK} \
    > /tmp/gen.log 2>&1; echo "gen-checkpoint rc=$?" >> /tmp/gen.log) &
  if want tests; then
    step "CUDA tests"
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_gdn_triton.py tests/models/test_graphs.py -k cuda \
      2>&1 | grep -v DEBUG | tail -25
    echo "tests rc=$?"
  fi
  want steps && for model in demo /tmp/q08b; do
    [ "$model" = /tmp/q08b ] && { wait; cat /tmp/gen.log | tail -2; }
    for on in 1 0; do
      step "step times $model $AB=$on"
      json="$OUT/steps-$(basename $model)-$AB$on.json"
      env $AB=$on timeout 90 $py scripts/cuda_check.py --model $model --steps-only 2>/dev/null > "$json"
      $py -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['paths'], d['step_times'])" "$json"
    done
  done
  if want check; then
    step "exactness, demo, Triton kernel"
    timeout 120 $py scripts/cuda_check.py --prompts 2 --max-tokens 96 --no-eager > "$OUT/check-demo.json"
    echo "cuda_check rc=$?"; $py -c "import json; d=json.load(open('$OUT/check-demo.json')); print(d['lossless'])"
  fi
  want bench && for on in 1 0; do
    step "bench demo $AB=$on"
    env $AB=$on timeout 100 "${bench[@]}" --model demo --workloads code --modes none,mtp3,mtp4 --max-prompts 4 \
      --repeat 1 --out /tmp/b-demo-$on 2>&1 | grep -E "^\| code" | head -8
  done
  want bench && wait && for on in 1 0; do
    step "bench 0.8B $AB=$on"
    env $AB=$on timeout 100 "${bench[@]}" --model /tmp/q08b --workloads code --modes none,mtp3 \
      --spec-synth-rates 0.8 --max-prompts 2 --repeat 1 --out /tmp/b-q08b-$on 2>&1 | grep -E "^\| code" | head -8
  done
  if want full; then
    wait
    step "bench demo, code and chat"
    timeout 100 "${bench[@]}" --model demo --workloads code,chat --modes none,mtp3,mtp4 --max-prompts 4 --repeat 1 \
      --out /tmp/b-demo-full 2>&1 | grep -E "^\| (code|chat)" | head -8
    step "bench 0.8B, k = 1..4, roof"
    timeout 150 "${bench_roof[@]}" --model /tmp/q08b --workloads code --modes none,mtp1,mtp2,mtp3,mtp4 \
      --spec-synth-rates 0.8 --max-prompts 3 --repeat 1 --out /tmp/b-q08b-full 2>&1 | grep -E "^\| code|roof" | head -12
  fi
  step done
} 2>&1 | tee "$OUT/log.txt"
tar -C /tmp -czf "$OUT/reports.tar.gz" $(cd /tmp && ls -d b-* 2>/dev/null)
