"""Train variants of the demo model's recipe side by side on one GPU, to choose the recipe a 2-core CPU then runs.

Each run is `mtpx train --device cuda` with a shape (preset `demo` plus overrides) and a step count; a run's steps are
what its measured CPU step time allows within the CPU budget, so the GPU compares recipes at equal CPU minutes.
Per run it records the validation losses and greedy continuations of held-out code prompts, with two repetition
measures: the share of repeated 4-grams among the continuation's tokens, and of non-blank lines that repeat an earlier
line. BENCHMARKS.md section V.

    python scripts/train_sweep.py runs.json --corpus build/corpus --tokenizer models/demo \
        --prompts prompts.json --out OUT [--parallel 8]

runs.json: {"name": {"preset": {...overrides of preset demo}, "args": ["--steps", "1120", "--lr", "3e-3", ...]}}.
prompts.json: a list of prompt strings (held-out code; `--write-prompts FILE` writes it where the stdlib is the one the
corpus was built from, since the device's interpreter may be another version).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_tokens: int, device: str) -> list[int]:
    """Plain greedy decoding by full recomputation (no cache: the model as trained, nothing else in the way)."""
    from mtpx.train.trainer import mixed_precision
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    eos = set(model.cfg.eos_token_id)
    for _ in range(max_tokens):
        x = torch.tensor([ids + out], device=device)
        with mixed_precision("auto", device):
            h = model(x)[:, -1]
        nxt = int((h.float() @ model.lm_head.weight.float().t()).argmax())
        if nxt in eos:
            break
        out.append(nxt)
    return out


def one(name: str, spec: dict, a: argparse.Namespace) -> None:
    from mtpx.tokenizer import Tokenizer
    from mtpx.train import cli as train_cli
    import mtpx.train.trainer as trainer
    from mtpx.train.evaluate import repetition

    train_cli.PRESETS[name] = dict(train_cli.PRESETS["demo"], **spec.get("preset", {}))
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    out = a.out / name
    args = p.parse_args(["--corpus", str(a.corpus), "--out", str(out), "--preset", name,
                         "--tokenizer", str(a.tokenizer), "--device", a.device, "--save-every", "0",
                         *spec.get("args", [])])
    models = []
    real_train = trainer.train

    def keep(model, *rest, **kw):  # the trained model, for the samples below
        models.append(model)
        return real_train(model, *rest, **kw)
    train_cli.train = keep
    t = time.perf_counter()
    train_cli.main(args)
    minutes = (time.perf_counter() - t) / 60
    model = models[0].eval()
    tok = Tokenizer.from_dir(a.tokenizer)
    samples = []
    for prompt in json.loads(a.prompts.read_text()):
        ids = greedy(model, tok, prompt, a.max_tokens, a.device)
        text = tok.decode(ids)
        samples.append({"prompt": prompt, "continuation": text, **repetition(ids, text)})
    vals = [ln for ln in (out / "README.md").read_text().splitlines() if "val loss" in ln]
    result = {"name": name, "spec": spec, "minutes": minutes, "val": vals,
              "rep4": sum(s["rep4"] for s in samples) / len(samples),
              "repeated_lines": sum(s["repeated_lines"] for s in samples) / len(samples), "samples": samples}
    (a.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: {minutes:.1f} min, {vals[-1] if vals else ''}, rep4 {result['rep4']:.3f}, repeated lines "
          f"{result['repeated_lines']:.3f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="?")
    p.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    p.add_argument("--tokenizer", type=Path, default=Path("models/demo"))
    p.add_argument("--prompts", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--only", help="run this one run in this process (what the parent starts)")
    p.add_argument("--write-prompts", type=Path,
                   help="write held-out code prompts (this interpreter's stdlib) and exit")
    a = p.parse_args()
    if a.write_prompts:
        from mtpx.train.evaluate import held_out_files, heldout_prompts
        prompts = heldout_prompts(held_out_files(a.corpus / "recipe.json"), "code", 12)
        a.write_prompts.write_text(json.dumps(prompts, indent=1))
        print(f"wrote {len(prompts)} prompts to {a.write_prompts}")
        return 0
    runs = json.loads(a.runs.read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    if a.only:
        one(a.only, runs[a.only], a)
        return 0
    pending, running = list(runs), []
    while pending or running:
        while pending and len(running) < a.parallel:
            name = pending.pop(0)
            log = open(a.out / f"{name}.log", "w")
            cmd = [sys.executable, __file__, str(a.runs), "--only", name, "--corpus", str(a.corpus), "--tokenizer",
                   str(a.tokenizer), "--prompts", str(a.prompts), "--out", str(a.out), "--device", a.device,
                   "--max-tokens", str(a.max_tokens)]
            env = dict(os.environ, TQDM_MININTERVAL="15")  # a progress line per 15 s in the run's log, not per step
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for r in [r for r in running if r[1].poll() is not None]:
            running.remove(r)
            r[2].close()
            tail = (a.out / f"{r[0]}.log").read_text(errors="replace").splitlines()[-1:]
            print(f"[{time.strftime('%T')}] {r[0]} rc={r[1].returncode}: {tail[0] if tail else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
