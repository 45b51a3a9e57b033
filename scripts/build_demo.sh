#!/usr/bin/env bash
# Rebuild the bundled demo models from scratch, offline: corpus → tokenizer → demo model (+ MTP) → draft model.
# Everything comes from the package registries: the interpreter's standard library and Debian's python3-doc.
set -euo pipefail
cd "$(dirname "$0")/.."
MTPX=${MTPX:-.venv/bin/mtpx}
PY=${PY:-.venv/bin/python}
BUILD=${BUILD:-build}
if [ ! -d /usr/share/doc/python3-doc/html ]; then
  (apt-get install -y -qq python3-doc >/dev/null 2>&1) || echo "python3-doc unavailable: prose comes from docstrings only"
fi
$PY -c "from pathlib import Path; from mtpx.train.corpus import build_corpus; build_corpus(Path('$BUILD/corpus'))"
# main model: ~25 min on 2 CPU cores with bf16 dot products (AMX / AVX512_BF16), where --precision auto trains under
# bf16 autocast (elsewhere it trains in fp32, ~1.4x slower per step), its layers compiled (--compile auto, ~1.5x)
$MTPX train --corpus "$BUILD/corpus" --out "$BUILD/demo-run" --preset demo --steps 1600 --warmup 60 --lr 3e-3 \
  --batch-size 16 --seq-len 256 --val-every 160 --save-every 160 --vocab-size 8192
# its MTP layer refined by self-distillation (~4 min, the main model frozen): trained on the main model's own greedy
# tokens, the drafts verification checks, rather than the corpus's (acceptance on held-out text: models/demo/README.md)
$MTPX train-mtp --model "$BUILD/demo-run" --refine --chain 3 --objective argmax --corpus "$BUILD/corpus/train.txt" \
  --val "$BUILD/corpus/val.txt" --out "$BUILD/demo-refined" --steps 380 --batch-size 16 --seq-len 128 --lr 1e-3 --threads 2
# draft model with the same tokenizer: ~2 min
$MTPX train --corpus "$BUILD/corpus" --out "$BUILD/draft-run" --preset demo-draft --tokenizer "$BUILD/demo-run" \
  --no-mtp --steps 250 --warmup 20 --lr 4e-3 --batch-size 16 --seq-len 256 --val-every 0 --save-every 250
for pair in "demo-refined:models/demo" "draft-run:models/demo-draft"; do
  src=$BUILD/${pair%%:*}; dst=${pair#*:}
  mkdir -p "$dst"
  cp "$src"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,generation_config.json} "$dst"/
done
cp "$BUILD/corpus/recipe.json" models/demo/corpus_recipe.json
echo "rebuilt models/demo and models/demo-draft (the model card models/demo/README.md is maintained by hand)"
# acceptance on held-out stdlib prompts: .venv/bin/python -m mtpx.train.evaluate --model demo --n 20 --max-tokens 128 --k 1 3
