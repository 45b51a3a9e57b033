#!/usr/bin/env bash
# One sitting: the same random-weight body on one process (every core), tensor parallel over 2 ranks and layer
# split over 2 stages (one core each on a 2-core machine), MTP at synthetic acceptance 0.8 beside plain decoding.
# usage: scripts/bench_parallel.sh CHECKPOINT OUT [extra mtpx bench flags]
set -euo pipefail
ckpt=$1 out=$2
shift 2
common=(--model "$ckpt" --workloads code --modes none,mtp3 --temperature 0 --spec-synth-rates 0.8,0.8,0.8
        --max-prompts 2 --max-tokens 64 --repeat 2 --no-memory --no-costs --no-plots --no-roofline "$@")
mtpx bench "${common[@]}" --label "one process" --out "$out/one"
mtpx bench "${common[@]}" --label "tensor parallel 2" --tensor-parallel 2 --out "$out/tp2"
mtpx bench "${common[@]}" --label "layer split 2" --split-layers 2 --out "$out/layers2"
