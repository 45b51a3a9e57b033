#!/usr/bin/env bash
# Speed of two git revisions side by side in one sitting: `mtpx bench` runs alternately on each (ROUNDS rounds), each
# revision from its own (temporary) worktree and kernel build directory, in this checkout's .venv. Prints decode tok/s per mode and
# round, and each revision's median per mode.
#   scripts/compare_revisions.sh BASE_REV NEW_REV OUT_DIR [ROUNDS] -- <mtpx bench arguments>
# e.g. scripts/compare_revisions.sh 1182a4e HEAD /tmp/ab 2 -- --model demo --workloads code --modes none,mtp3 --threads 1
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1 new=$2 out=$3 rounds=${4:-2}
shift 4 2>/dev/null || shift 3
[ "${1:-}" = "--" ] && shift
python=$PWD/.venv/bin/python
mkdir -p "$out"
for rev in "$base" "$new"; do
  tree="$out/tree-$rev"
  [ -d "$tree" ] || git worktree add --detach -f "$tree" "$rev" >/dev/null
done
trap 'for rev in "$base" "$new"; do git worktree remove --force "$out/tree-$rev" 2>/dev/null || true; done' EXIT
for round in $(seq 1 "$rounds"); do
  for rev in "$base" "$new"; do
    echo "round $round: $rev" >&2
    (cd "$out/tree-$rev" && PYTHONPATH="$PWD/src" TORCH_EXTENSIONS_DIR="$out/ext-$rev" \
      "$python" -m mtpx.cli bench "$@" --out "$out/$rev-$round" >/dev/null)
  done
done
"$python" - "$out" "$base" "$new" "$rounds" <<'PY'
import json, statistics, sys
out, base, new, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
table = {}
for rev in (base, new):
    for r in range(1, rounds + 1):
        for rec in json.load(open(f"{out}/{rev}-{r}/results.json"))["records"]:
            key = (rec["workload"], rec["mode"], rec["temperature"])
            table.setdefault(key, {}).setdefault(rev, []).append(rec["decode_tokens_per_s"])
print(f"{'workload':10} {'mode':12} {'T':>4}  {base:>12} {new:>12}  new/base   (decode tok/s, median of {rounds})")
for (w, m, t), runs in table.items():
    a, b = statistics.median(runs[base]), statistics.median(runs[new])
    print(f"{w:10} {m:12} {t:4}  {a:12.1f} {b:12.1f}  {b / a:8.3f}   base {[round(x, 1) for x in runs[base]]} "
          f"new {[round(x, 1) for x in runs[new]]}")
PY
