"""`mtpx train-mtp`: give an existing checkpoint a (new) MTP layer by self-distillation.

The base model is frozen. For every position i of the corpus, the MTP layer sees (h_i, t_{i+1}) and learns the base
model's own next-token distribution at position i + 1 — exactly what its drafts are verified against. The result is
written in the family's own layout (`mtp.*` next to the base tensors for Qwen3.5 / Qwen3-Next, one more decoder layer
`model.layers.{L}.*` with enorm / hnorm / eh_proj / shared_head for GLM-4.5 / DeepSeek-V3), so other engines can load
it too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mtpx.errors import ModelLoadError, MtpxError
from mtpx.llm import resolve_model_path
from mtpx.runners.cpu import tune_cpu_process
from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.disk_layout import disk_tensors, is_mtp_disk_name, stores_per_expert
from mtpx.models.interface import CausalLM
from mtpx.train.cli import corpus_file, invocation
from mtpx.train.evaluate import teacher_forced_acceptance as tf_acceptance
from mtpx.train.head_loss import linear_cross_entropy
from mtpx.train.trainer import (COMPILE, PRECISIONS, batch_at, compiled_for_training, fresh_mtp, mixed_precision,
                                 mtp_chain, tokenize_file)


class TrainMTPError(MtpxError):
    """A train-mtp invocation that cannot work (conflicting options, missing files)."""


@torch.no_grad()
def teacher_forced_acceptance(model: CausalLM, data: torch.Tensor, batches: int = 4, seq_len: int = 256) -> float:
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


def distill(model: CausalLM, data: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float, seed: int,
            time_budget_s: float | None = None, log=print, chain: int = 1, objective: str = "kl",
            precision: str = "auto", compile: str = "off") -> list[float]:
    """Train only model.mtp to reproduce the frozen base model's own predictions.

    Draft step j (1..chain) at position i sees (h_i, t_{i+1}) for j = 1, or its own previous output with t_{i+j}, and
    learns the base model's next-token distribution at position i + j (objective "kl": KL(base || MTP)), or its argmax
    (objective "argmax": CE to the base's greedy token) — exactly what greedy drafts are verified against."""
    if objective not in ("kl", "argmax"):
        raise ValueError(f"objective must be 'kl' or 'argmax', got {objective!r}")
    tune_cpu_process()
    model.requires_grad_(False)
    model.mtp.requires_grad_(True)
    params = list(model.mtp.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, start = [], time.perf_counter()
    with compiled_for_training(model, compile, torch.device("cpu")):
        bar = tqdm(range(steps), desc="train-mtp", dynamic_ncols=True)
        for step in bar:
            # linear decay to 10% over the run; with a time budget, over whichever of steps / time runs out first
            progress = step / steps
            if time_budget_s:
                progress = max(progress, (time.perf_counter() - start) / time_budget_s)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * max(0.0, 1 - progress))
            x = batch_at(data, step, seed, batch, seq_len)
            with torch.no_grad(), mixed_precision(precision):
                hidden = model(x).float()  # the base's prediction of t_{p+1} at every p is lm_head(hidden[:, p])
                if objective == "argmax":
                    target = model.logits(hidden).argmax(-1)
            with mixed_precision(precision):
                drafts = mtp_chain(model, hidden, x, chain)
                rows = lambda t: t.reshape(-1, *t.shape[2:])
                terms = [linear_cross_entropy(rows(d), model.lm_head.weight,
                                              rows((hidden if objective == "kl" else target)[:, j:j + d.shape[1]]))
                         for j, d in enumerate(drafts, start=1)]
            loss = sum(terms) / len(terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
    p.add_argument("--compile", default="auto", choices=COMPILE,
                   help="torch.compile the layers and loss blocks (auto: on CPU; ~20-60 s of compiling first)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="matmul precision; auto: bf16 where the CPU has bf16 dot products, else fp32")
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--replace", action="store_true", help="replace an existing MTP layer with a fresh one")
    p.add_argument("--refine", action="store_true",
                   help="keep the existing MTP layer as the starting point and fine-tune it by self-distillation")
    p.add_argument("--chain", type=int, default=1,
                   help="chained draft steps trained (2-3 help k > 1 drafting, which feeds back the MTP's output)")
    p.add_argument("--objective", default="kl", choices=["kl", "argmax"],
                   help="match the base model's distribution (kl) or its greedy token (argmax)")
    p.add_argument("--threads", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    src = resolve_model_path(args.model)
    if not src.is_dir():
        raise TrainMTPError(f"train-mtp reads and writes checkpoint directories (config.json + safetensors); {src} is "
                            "not one")
    ckpt = load_checkpoint(src)
    if ckpt.tokenizer is None:
        raise ModelLoadError(f"{src} has no tokenizer.json")
    has_mtp = any(n.startswith("mtp.") for n in ckpt.shapes)
    if args.replace and args.refine:
        raise TrainMTPError("--replace and --refine exclude each other")
    if has_mtp and not (args.replace or args.refine):
        raise TrainMTPError(f"{src} already has an MTP layer: pass --replace to train a new one or --refine to tune it")
    if args.refine and not has_mtp:
        raise TrainMTPError(f"--refine needs a checkpoint with an MTP layer; {src} has none")
    if not args.corpus.exists():
        raise TrainMTPError(f"corpus {args.corpus} does not exist")
    if args.val is not None and not args.val.exists():
        raise TrainMTPError(f"held-out text {args.val} does not exist")
    model = build_model(ckpt, torch.float32, with_mtp=args.refine).float()
    train_data = tokenize_file(ckpt.tokenizer, corpus_file(args.corpus, args.out / "work"))
    val_data = tokenize_file(ckpt.tokenizer, args.val) if args.val else train_data[-200_000:]
    if not args.refine:
        fresh_mtp(model, args.seed)
    k = max(3, args.chain)
    before = tf_acceptance(model, val_data, k=k)
    print(f"held-out teacher-forced acceptance before: {fmt(before)}", file=sys.stderr)
    budget = args.time_budget_min * 60 if args.time_budget_min else None
    t0 = time.perf_counter()
    history = distill(model, train_data, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, budget,
                      log=lambda m: print(m, file=sys.stderr), chain=args.chain, objective=args.objective,
                      precision=args.precision, compile=args.compile)
    seconds = time.perf_counter() - t0
    after = tf_acceptance(model, val_data, k=k)
    print(f"held-out teacher-forced acceptance after:  {fmt(after)}  ({len(history)} steps, {seconds / 60:.1f} min)",
          file=sys.stderr)
    write_with_mtp(src, model, args.out)
    (args.out / "train_mtp.json").write_text(json.dumps({
        "base": str(src), "before": before, "after": after, "steps": len(history), "train_seconds": round(seconds, 1),
        "command": invocation("train-mtp", args),
        "note": "teacher-forced acceptance per chained draft step j: fraction of held-out positions where the j-th "
                "MTP draft equals the base model's greedy token"}, indent=1))
    print(f"saved {args.out}", file=sys.stderr)
    return 0


def fmt(rates: list[float]) -> str:
    return ", ".join(f"k={j}: {r:.1%}" for j, r in enumerate(rates, start=1))


def write_with_mtp(src: Path, model: CausalLM, out: Path) -> None:
    """Copy the base checkpoint's files and write its tensors (unchanged) plus the new MTP layer, in the family's
    on-disk names (`mtp.*` for Qwen3.5 / Qwen3-Next, `model.layers.{L}.*` for GLM-4.5 / DeepSeek-V3) and in the base
    checkpoint's dtype and expert layout. Any MTP layers the base had are replaced by the one trained."""
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    base = {}
    for f in sorted(src.glob("*.safetensors")):
        base.update({k: v for k, v in load_file(str(f)).items() if not is_mtp_disk_name(cfg, k)})
    embed = next((v for k, v in base.items() if k.endswith("embed_tokens.weight")), next(iter(base.values())))
    new = {f"mtp.{k}": v.detach() for k, v in model.mtp.state_dict().items()}
    if cfg.MTP_IN_LAYERS:
        # DeepSeek-V3 and GLM-4.5 store copies of the embedding and output head in the nextn layer, and vLLM's loader
        # of these MTP layers expects them; mtpx shares them with the main model at load
        new.setdefault("mtp.layers.0.embed_tokens.weight", model.model.embed_tokens.weight.detach())
        new["mtp.layers.0.shared_head.head.weight"] = model.lm_head.weight.detach()
    main_dtypes = {k.split(".", 3)[-1]: v.dtype for k, v in base.items() if k.startswith("model.layers.")}
    for name, t in disk_tensors(cfg, new, stores_per_expert(base)).items():
        # a tensor kept in fp32 by the base (e.g. e_score_correction_bias) stays fp32; the rest in the base's dtype
        dtype = main_dtypes.get(name.split(".", 3)[-1], embed.dtype)
        base[name] = t.to(dtype if dtype.is_floating_point and dtype.itemsize >= 2 else embed.dtype).contiguous()
    save_file(base, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    target = config.get("text_config", config)
    target[cfg.MTP_KEY] = len(model.mtp.layers)
    (out / "config.json").write_text(json.dumps(config, indent=1))
