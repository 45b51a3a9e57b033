#!/usr/bin/env bash
# What issue #27 asks of a lent GPU, in one call, under a time budget:
#   for each shape in SHAPES (qwen3.6-27b with LAYERS_27B=16 of its 64 layers: 9.1B parameters, 17 GiB in bf16;
#   then qwen3.6-35b-a3b with LAYERS_35B=8 of its 40: 8.6B, 16 GiB, so both fit the 64 GiB disk at once):
#     - a random-weight body with its MTP layer (mtpx bench gen-checkpoint) and its Q4_K GGUF (mtpx convert
#       --outtype q4_k: Q4_K matrices, output head and embedding in Q6_K; quantized on the GPU);
#     - mtpx plan of bf16, int4 and the GGUF as stored (the planner's figures beside the measured ones);
#     - mtpx bench, plain and MTP k = 1..4 at synthetic acceptance 0.8, of int4 (mtpx's own quantization of the
#       checkpoint), of the GGUF loaded with its blocks as stored, and of bf16 (dense shape only), each with the
#       bandwidth roofline: weight bytes a step reads / step time, against the measured read roof;
#     - the peak GPU memory of mtp4 (python -m mtpx.bench.memory) for int4 and for the GGUF;
#   llama.cpp beside mtpx on the same GGUF, in the same sitting (mtpx bench --peers llamacpp, PEER_MODES): its
#   llama-server built with CUDA for this GPU alone, in the background from the start, where nvcc and a source tree
#   (LLAMA_CPP_SRC: scripts/fetch_llama_cpp.sh's archive, carried) are there; skipped with the reason otherwise;
#   exactness on the GPU last (scripts/cuda_check.py on the bundled model, bf16 and int4; CHECKS=0 skips it).
# Every step has a time limit, and the whole run BUDGET_S (under a device call's 600 s): a step that would start
# with too little left is skipped and named so. Big files go to WORK, outside OUT; the results are packed into
# $OUT/gpu-session.tar.gz beside $OUT/summary.txt (a device call brings back at most 8 files). In one call:
#   run(command="bash scripts/gpu_session.sh", carry=["third_party/llama.cpp.tar.xz", "third_party/wheels"],
#       timeout_s=600)
# after scripts/fetch_llama_cpp.sh here (llama.cpp's source, and gguf-py's wheel, which the GPU image lacks)
# and SHAPES=qwen3.6-35b-a3b (say) in a second call for what the first left; STEPS picks and orders the steps (default
# "plan int4 q4_k peak bf16 peer check"); each is named in the summary with its time, or with why it did not run.
# DEVICE=cpu SHAPE=tiny LAYERS=4 CHECKS=0 runs the same steps on the CPU, small, as a dry run (no peer build there;
# tests/bench/test_gpu_session.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out} DEVICE=${DEVICE:-cuda} PY=${PY:-python3} BUDGET_S=${BUDGET_S:-550}
WORK=${WORK:-${TMPDIR:-/tmp}/mtpx-gpu-session}
SHAPES=${SHAPES:-${SHAPE:-qwen3.6-27b qwen3.6-35b-a3b}} LAYERS=${LAYERS:-}
LAYERS_27B=${LAYERS_27B:-16} LAYERS_35B=${LAYERS_35B:-8}
MODES=${MODES:-none,mtp1,mtp2,mtp3,mtp4} RATES=${RATES:-0.8,0.8,0.8,0.8}
MAX_PROMPTS=${MAX_PROMPTS:-3} MAX_TOKENS=${MAX_TOKENS:-128}
STEPS=${STEPS:-plan int4 q4_k peak bf16 peer check}  # what to run, in this order per shape (CHECKS=0: no check)
[ "${CHECKS:-1}" = 0 ] && STEPS=${STEPS//check/}
LLAMA_CPP_SRC=${LLAMA_CPP_SRC:-third_party/llama.cpp.tar.xz} PEER_MODES=${PEER_MODES:-none,mtp3}
WHEELS=${WHEELS:-third_party/wheels}
CUDA_ARCH=${CUDA_ARCH:-native} PEER_JOBS=${PEER_JOBS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))}
MIN_STEP_S=20 RESERVE_S=10  # a step gets at least this long or is skipped; kept back for packing up
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$DEVICE" = cpu ] && export TRITON_INTERPRET=1  # the GPU's Triton kernels, interpreted (cuda_check)
# nothing here runs on the CPU kernels: no minutes of compiling them on first use
[ "$DEVICE" = cuda ] && export MTPX_ROWGEMM=${MTPX_ROWGEMM:-0}
T0=$(date +%s) RES="$WORK/results"
rm -rf "$RES" && mkdir -p "$RES" "$OUT" || exit 1
if ! "$PY" -c "import gguf" 2> /dev/null && compgen -G "$WHEELS/*.whl" > /dev/null; then  # carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl &&
    export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
MTPX=("$PY" -m mtpx.cli) PEERED="" LLAMA_SERVER=${LLAMA_SERVER:-}  # LLAMA_SERVER: a llama-server already built

want() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
note() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$RES/summary.txt" >&2; }

# step NAME LIMIT_S CMD...: CMD with its stdout in $RES/NAME.out and stderr in $RES/NAME.log, for at most LIMIT_S
# and what the budget leaves; its outcome goes to the summary
step() {
  local name=$1 limit=$2 left rc=0 t
  shift 2
  left=$(( BUDGET_S - RESERVE_S - $(date +%s) + T0 ))
  if (( left < MIN_STEP_S )); then note "$name: skipped (${left}s of the budget left)"; return 99; fi
  (( limit > left )) && limit=$left
  t=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$RES/$name.out" 2> "$RES/$name.log" || rc=$?
  [ -s "$RES/$name.out" ] || rm -f "$RES/$name.out"
  case $rc in
    0) note "$name: ok ($(( $(date +%s) - t ))s)" ;;
    124|137) note "$name: TIMED OUT after ${limit}s (see $name.log)" ;;
    *) note "$name: FAILED, exit $rc ($(( $(date +%s) - t ))s): $(tail -c 400 "$RES/$name.log" | tr '\n' ' ')" ;;
  esac
  return $rc
}

table() {  # the measured figures in brief, for the summary (every figure is in the files beside it)
  "$PY" - "$RES" <<'PYEOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
for f in sorted(res.glob("*/results.json")):
    r = json.loads(f.read_text())
    print(f"{f.parent.name}: {r['meta'].get('dtype')}")
    for x in r["records"] + r.get("peers", []):
        gbps, roof, acc = x.get("achieved_GBps"), x.get("bandwidth_fraction"), x.get("acceptance_rate") or 0
        print(f"  {x.get('engine', 'mtpx'):9} {x['mode']:5} {x.get('decode_tokens_per_s') or 0:9.1f} tok/s"
              f"  x{x.get('speedup') or 1:.2f}" + (f"  accepted {100 * acc:.0f} %" if x["mode"] != "none" else "")
              + (f"  weights {gbps:.1f} GB/s ({100 * roof:.0f} % of roof)" if gbps and roof else ""))
for f in sorted(res.glob("peak-*.out")):
    m = json.loads(f.read_text().splitlines()[-1])
    print(f"{f.stem}: {m['mode']} peak {m['peak_bytes'] / 2**30:.2f} GiB, loaded {m['loaded_bytes'] / 2**30:.2f} GiB")
PYEOF
}

pack() {
  [ -n "${BUILD_PID:-}" ] && kill "$BUILD_PID" 2>/dev/null
  [ -n "${PREGEN_PID:-}" ] && kill "$PREGEN_PID" 2>/dev/null
  table >> "$RES/summary.txt" 2>&1
  note "done in $(( $(date +%s) - T0 ))s; files: $(cd "$RES" && find . -type f ! -name summary.txt | sort |
    tr '\n' ' ')"
  cp "$RES/summary.txt" "$OUT/summary.txt"
  tar -C "$WORK" -czf "$OUT/gpu-session.tar.gz" results
}
trap pack EXIT

# the checkpoint of a shape: a function, exported, for `step` (timeout) and the background generation to run
layers_of() {
  if [ -n "$LAYERS" ]; then echo "$LAYERS"; return; fi
  case $1 in qwen3.6-27b) echo "$LAYERS_27B" ;; qwen3.6-35b-a3b) echo "$LAYERS_35B" ;; *) echo "" ;; esac
}
model_of() { echo "$WORK/model-$1-$(layers_of "$1")"; }
gen() {  # gen SHAPE: the random-weight checkpoint (kept if a previous call of this machine left it)
  local model; model=$(model_of "$1")
  [ -f "$model/model.safetensors" ] && return 0
  local layers; layers=$(layers_of "$1")
  "$PY" -m mtpx.cli bench gen-checkpoint --shape "$1" ${layers:+--layers "$layers"} --out "$model.tmp" &&
    rm -rf "$model" && mv "$model.tmp" "$model"
}
export -f layers_of model_of gen
export PY WORK LAYERS LAYERS_27B LAYERS_35B

# ---------------------------------------------------------------- the machine, and what runs in the background
{ nvidia-smi; nvcc --version; "$PY" -c "import torch, sys; print(sys.version, torch.__version__, torch.version.cuda)"
  df -h "$WORK"; free -g; nproc; git rev-parse HEAD; } > "$RES/machine.txt" 2>&1
note "budget ${BUDGET_S}s, device $DEVICE, shapes: $SHAPES, work in $WORK"

peer_build() {  # llama-server with CUDA for this GPU's architecture only, from a directory or an archive
  local src=$LLAMA_CPP_SRC
  if [ -f "$src" ]; then tar -C "$WORK" -xJf "$src" && src="$WORK/llama.cpp" || return 1; fi
  # host code for AVX2, not -march=native: the GPU does the work, and a native build of this llama.cpp died of
  # illegal instructions on the project's virtual AMX Xeon (these machines are virtual Xeons too)
  configure() {
    cmake -S "$src" -B "$WORK/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$1" -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  }
  # "native" asks nvcc which GPU is there; an H100 / H200 is sm_90 where that fails
  configure "$CUDA_ARCH" || { rm -rf "$WORK/llama-build"; configure 90; } || return 1
  nice -n 19 cmake --build "$WORK/llama-build" --target llama-server -j "$PEER_JOBS"
}
if ! want peer; then
  note "peer: not asked for (STEPS=$STEPS)"
elif [ -n "$LLAMA_SERVER" ]; then
  note "peer: $LLAMA_SERVER ($("$LLAMA_SERVER" --version 2>&1 | grep -m1 version))"
elif [ -x "$WORK/llama-build/bin/llama-server" ]; then
  LLAMA_SERVER="$WORK/llama-build/bin/llama-server"
  note "peer: llama-server built by an earlier call on this machine"
elif [ "$DEVICE" != cuda ]; then
  note "peer: skipped (DEVICE=$DEVICE: llama.cpp is built with CUDA only)"
elif ! command -v nvcc > /dev/null && ! PATH=$PATH:/usr/local/cuda/bin command -v nvcc > /dev/null; then
  note "peer: skipped (no nvcc on PATH)"
elif [ ! -e "$LLAMA_CPP_SRC" ]; then
  note "peer: skipped (no llama.cpp source at $LLAMA_CPP_SRC: run scripts/fetch_llama_cpp.sh here and carry it)"
else
  command -v nvcc > /dev/null || export PATH=$PATH:/usr/local/cuda/bin
  # niced and a few cores short of all: mtpx's timings run beside it, and say so in the summary
  timeout -k 5 $(( BUDGET_S - 60 )) bash -c "$(declare -f peer_build); WORK='$WORK' LLAMA_CPP_SRC='$LLAMA_CPP_SRC' \
    CUDA_ARCH='$CUDA_ARCH' PEER_JOBS='$PEER_JOBS' peer_build" > "$RES/peer-build.log" 2>&1 &
  BUILD_PID=$!
  note "peer: building llama-server in the background (nice 19, -j $PEER_JOBS) beside the steps below"
fi
peer_ready() {  # the built server, once the build has ended; with WAIT, waiting for it as long as the budget allows
  [ -n "$LLAMA_SERVER" ] && return 0
  [ -z "${BUILD_PID:-}" ] && return 1
  if [ "${1:-}" = wait ]; then
    while kill -0 "$BUILD_PID" 2>/dev/null && (( BUDGET_S - RESERVE_S - $(date +%s) + T0 > 90 )); do sleep 5; done
  fi
  kill -0 "$BUILD_PID" 2>/dev/null && return 1
  if [ -x "$WORK/llama-build/bin/llama-server" ]; then
    LLAMA_SERVER="$WORK/llama-build/bin/llama-server"
    note "peer: llama-server built ($("$LLAMA_SERVER" --version 2>&1 | grep -m1 version))"
    return 0
  fi
  note "peer: the build failed (see peer-build.log): $(tail -c 300 "$RES/peer-build.log" | tr '\n' ' ')"
  BUILD_PID=""
  return 1
}

# the second shape's checkpoint generated on the CPU while the first is measured, where the disk holds both
set -- $SHAPES
if [ $# -gt 1 ] && [ "$(df -Pk "$WORK" | awk 'NR == 2 {print int($4 / 1048576)}')" -ge 48 ]; then
  (nice -n 5 bash -c 'gen "$1"' _ "$2" > "$RES/pregen-$2.log" 2>&1; echo "exit $?" >> "$RES/pregen-$2.log") &
  PREGEN_PID=$!
  note "gen-$2: generating in the background (CPU) beside the first shape's steps"
fi

# ---------------------------------------------------------------- per shape
bench() {  # bench NAME MODEL LABEL [ARGS]: plain and MTP k = 1..4 at synthetic acceptance, with the roofline
  local name=$1 model=$2 label=$3
  shift 3
  step "$name" 300 "${MTPX[@]}" bench --model "$model" --device "$DEVICE" --workloads code --modes "$MODES" \
    --temperature 0 --spec-synth-rates "$RATES" --max-prompts "$MAX_PROMPTS" --max-tokens "$MAX_TOKENS" --repeat 1 \
    --no-plots --no-memory --no-costs --label "$label" --out "$RES/$name" "$@"
}
peak() {  # peak NAME MODEL [ARGS]: the peak GPU memory of the widest mode, in a fresh process
  local name=$1 model=$2
  shift 2
  step "$name" 150 "$PY" -m mtpx.bench.memory --model "$model" --device "$DEVICE" --mode "${MODES##*,}" \
    --prompt "def fibonacci(n):" --max-tokens "$MAX_TOKENS" --spec-synth-rates "$RATES" "$@"
}
for shape in $SHAPES; do
  model=$(model_of "$shape") gguf="$(model_of "$shape")-q4_k.gguf" layers=$(layers_of "$shape")
  what="random-weight $shape body${layers:+, $layers layers}"
  if [ -n "${PREGEN_PID:-}" ] && [ "$shape" = "${2:-}" ]; then  # as long as the budget allows
    while kill -0 "$PREGEN_PID" 2>/dev/null && (( BUDGET_S - RESERVE_S - $(date +%s) + T0 > MIN_STEP_S )); do
      sleep 2
    done
    kill "$PREGEN_PID" 2>/dev/null && note "gen-$shape: background generation stopped (budget)"
    PREGEN_PID=""
  fi
  step "gen-$shape" 300 bash -c 'gen "$1"' _ "$shape" || continue
  if [ ! -f "$gguf" ]; then
    step "convert-$shape" 240 "${MTPX[@]}" convert --to gguf "$model" "$gguf.tmp" --outtype q4_k &&
      mv "$gguf.tmp" "$gguf"
    rm -f "$gguf.tmp"
  fi
  if want plan; then
    for dtype in bf16 int4; do
      step "plan-$shape-$dtype" 60 "${MTPX[@]}" plan "$model" --device "$DEVICE" --dtype "$dtype" --ctx 1024 --json
    done
    [ -f "$gguf" ] && step "plan-$shape-q4_k" 60 "${MTPX[@]}" plan "$gguf" --device "$DEVICE" --ctx 1024 --json
  fi
  want int4 && bench "bench-$shape-int4" "$model" "$what, int4" --dtype int4
  if want q4_k && [ -f "$gguf" ]; then
    peer=()
    if want peer && peer_ready; then  # llama.cpp on the same file, in the same sitting
      peer=(--peers llamacpp --peer-modes "$PEER_MODES" --llama-server "$LLAMA_SERVER" --gguf "$gguf")
      PEERED="$PEERED $shape"
    fi
    bench "bench-$shape-q4_k" "$gguf" "$what, Q4_K GGUF as stored" "${peer[@]}"
  fi
  if want peak; then  # each a fresh process, so a load more
    want q4_k && [ -f "$gguf" ] && peak "peak-$shape-q4_k" "$gguf"
    want int4 && peak "peak-$shape-int4" "$model" --dtype int4
  fi
  case $shape in *-a3b|*moe*) ;; *) want bf16 && bench "bench-$shape-bf16" "$model" "$what, bf16" --dtype bf16 ;; esac
  rm -rf "$model"  # random weights: regenerated by the step above; the GGUF stays for the peer
done

# ---------------------------------------------------------------- llama.cpp, where it was not ready in time above
for shape in $SHAPES; do
  gguf="$(model_of "$shape")-q4_k.gguf" layers=$(layers_of "$shape")
  case " ${PEERED:-} " in *" $shape "*) continue ;; esac
  want peer && [ -f "$gguf" ] || continue
  if ! peer_ready wait; then
    [ -n "${BUILD_PID:-}" ] && note "peer-$shape: skipped (llama-server still building as the budget ran short)"
    continue
  fi
  step "peer-$shape" 240 "${MTPX[@]}" bench --model "$gguf" --device "$DEVICE" --workloads code --modes "$PEER_MODES" \
    --temperature 0 --spec-synth-rates "$RATES" --max-prompts "$MAX_PROMPTS" --max-tokens "$MAX_TOKENS" --repeat 1 \
    --no-plots --no-memory --no-costs --no-roofline --peers llamacpp --peer-modes "$PEER_MODES" \
    --llama-server "$LLAMA_SERVER" --gguf "$gguf" \
    --label "random-weight $shape body${layers:+, $layers layers}, Q4_K GGUF" \
    --out "$RES/peer-$shape"
done

# ---------------------------------------------------------------- exactness on the GPU
if want check; then
  checks="bf16 int4"
  [ "$DEVICE" = cpu ] && checks=bf16  # int4's Triton kernels interpreted would take many minutes here
  for dtype in $checks; do
    step "cuda_check-$dtype" 120 "$PY" scripts/cuda_check.py --device "$DEVICE" --dtype "$dtype" --prompts 2 \
      --max-tokens 64 --no-eager
  done
fi
