"""Time demo-preset training steps (loss, backward, AdamW) on real corpus batches from a fresh model.

BENCHMARKS.md section S.1: run it alternately against an older checkout to compare trainers, e.g.
    .venv/bin/python scripts/time_train_step.py
    PYTHONPATH=/path/to/old/checkout/src .venv/bin/python scripts/time_train_step.py
Needs build/corpus (scripts/build_demo.sh makes it).
"""
import json
import sys
import time
from pathlib import Path

import torch

from mtpx.config import ModelConfig
from mtpx.tokenizer import Tokenizer
from mtpx.train.trainer import TrainConfig, batch_at, losses, make_optimizer, new_model, tokenize_file

try:
    from mtpx.llm import tune_cpu_process
except ImportError:  # checkouts before tune_cpu_process
    from mtpx.llm import retain_freed_memory as tune_cpu_process

STEPS, WARMUP = 12, 2
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
tune_cpu_process()
data = tokenize_file(Tokenizer.from_dir(Path("models/demo")), Path("build/corpus/val.txt"))
model = new_model(ModelConfig.from_hf_dict(json.loads(Path("models/demo/config.json").read_text())), 1, 0)
opt = make_optimizer(model, TrainConfig())
for i in range(STEPS):
    if i == WARMUP:
        start = time.perf_counter()
    main, mtp = losses(model, batch_at(data, i, 0, 16, 256), 1)
    opt.zero_grad(set_to_none=True)
    (main + 0.3 * mtp).backward()
    opt.step()
print(f"{(time.perf_counter() - start) / (STEPS - WARMUP):.2f} s per step (16 x 256 tokens, "
      f"{torch.get_num_threads()} threads)")
