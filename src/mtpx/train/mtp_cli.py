"""`mtpx train-mtp`: give an existing checkpoint a (new) MTP layer by self-distillation.

The base model is frozen. For every position i of the corpus, the MTP layer sees (h_i, t_{i+1}) and learns the base
model's own next-token distribution at position i + 1 — exactly what its drafts are verified against. The result is
written in the standard layout (`mtp.*` next to the base tensors), so other engines can load it too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mtpx.llm import resolve_model_path
from mtpx.loading import build_model, load_checkpoint
from mtpx.models.qwen3_5 import Qwen35Model
from mtpx.train.cli import corpus_file
from mtpx.train.trainer import batch_at, fresh_mtp, tokenize_file


@torch.no_grad()
def teacher_forced_acceptance(model: Qwen35Model, data: torch.Tensor, batches: int = 4, seq_len: int = 256) -> float:
    """Fraction of positions where the MTP's argmax at (h_i, t_{i+1}) equals the base model's argmax at i + 1:
    the k = 1 acceptance of greedy MTP drafting on this text, with the text as the accepted tokens."""
    hits = total = 0
    for i in range(batches):
        x = batch_at(data, i, 777, 8, seq_len)
        hidden = model(x)
        target = model.logits(hidden[:, 1:]).argmax(-1)
        draft = model.logits(model.mtp_forward(hidden[:, :-1], x[:, 1:])).argmax(-1)
        hits += (draft == target).sum().item()
        total += target.numel()
    return hits / total


def distill(model: Qwen35Model, data: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float, seed: int,
            time_budget_s: float | None = None, log=print) -> list[float]:
    """Train only model.mtp: KL(base distribution at i+1 || MTP distribution at (h_i, t_{i+1}))."""
    model.requires_grad_(False)
    model.mtp.requires_grad_(True)
    params = list(model.mtp.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="train-mtp", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        x = batch_at(data, step, seed, batch, seq_len)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(x)
            target = F.log_softmax(model.logits(hidden[:, 1:]).float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            draft = model.logits(model.mtp_forward(hidden[:, :-1].float(), x[:, 1:]))
        logq = F.log_softmax(draft.float(), -1)
        loss = F.kl_div(logq.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(kl=f"{loss.item():.3f}")
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            log(f"time budget reached after {step + 1} steps")
            break
    model.requires_grad_(False)
    return history


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="checkpoint directory (or 'demo')")
    p.add_argument("--corpus", required=True, type=Path, help="training text (file or directory)")
    p.add_argument("--val", type=Path, default=None, help="held-out text for the before/after acceptance")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--replace", action="store_true", help="replace an existing MTP layer")


def main(args: argparse.Namespace) -> int:
    src = resolve_model_path(args.model)
    ckpt = load_checkpoint(src)
    if ckpt.tokenizer is None:
        raise SystemExit(f"{src} has no tokenizer.json")
    if any(n.startswith("mtp.") for n in ckpt.shapes) and not args.replace:
        print("the checkpoint already has an MTP layer; pass --replace to train a new one", file=sys.stderr)
        return 2
    model = build_model(ckpt, torch.float32, with_mtp=False).float()
    train_data = tokenize_file(ckpt.tokenizer, corpus_file(args.corpus, args.out / "work"))
    val_data = tokenize_file(ckpt.tokenizer, args.val) if args.val else train_data[-200_000:]
    fresh_mtp(model, args.seed)
    before = teacher_forced_acceptance(model, val_data)
    print(f"held-out teacher-forced acceptance (k=1) before: {before:.1%}", file=sys.stderr)
    budget = args.time_budget_min * 60 if args.time_budget_min else None
    distill(model, train_data, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, budget,
            log=lambda m: print(m, file=sys.stderr))
    after = teacher_forced_acceptance(model, val_data)
    print(f"held-out teacher-forced acceptance (k=1) after: {after:.1%}", file=sys.stderr)
    write_with_mtp(src, model, args.out)
    (args.out / "train_mtp.json").write_text(json.dumps({"before": before, "after": after, "steps": args.steps,
                                                         "base": str(src)}, indent=1))
    print(f"saved {args.out}", file=sys.stderr)
    return 0


def write_with_mtp(src: Path, model: Qwen35Model, out: Path) -> None:
    """Copy the base checkpoint's files and write its tensors plus the new `mtp.*` ones (base dtype)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    base = {}
    for f in sorted(src.glob("*.safetensors")):
        base.update({k: v for k, v in load_file(str(f)).items() if not k.startswith("mtp.")})
    dtype = next(iter(base.values())).dtype
    base.update({f"mtp.{k}": v.detach().to(dtype).contiguous() for k, v in model.mtp.state_dict().items()})
    save_file(base, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    target = cfg.get("text_config", cfg)
    target["mtp_num_hidden_layers"] = len(model.mtp.layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
