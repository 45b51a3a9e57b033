"""`mtpx train`: train a Qwen3.5-architecture model from scratch with its MTP layer."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from mtpx.config import ModelConfig
from mtpx.errors import MtpxError
from mtpx.tokenizer import Tokenizer
from mtpx.train.corpus import DOC_SEPARATOR
from mtpx.train.trainer import TrainConfig, new_model, save_checkpoint, tokenize_file, train, train_tokenizer

PRESETS = {
    # the bundled demo model: both layer types, one MTP layer; key and value head dims equal (llama.cpp needs it)
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=64, linear_value_head_dim=64,
                 layer_types=["linear_attention", "linear_attention", "full_attention"] * 2),
    "demo-draft": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, linear_num_key_heads=1, linear_num_value_heads=2,
                       linear_key_head_dim=64, linear_value_head_dim=64,
                       layer_types=["linear_attention", "full_attention"]),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2,
                 linear_key_head_dim=32, linear_value_head_dim=32, layer_types=["linear_attention", "full_attention"]),
}


def corpus_file(path: Path, work: Path) -> Path:
    """A file is used as is; a directory's text files are joined into one corpus file."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise MtpxError(f"corpus {path} does not exist")
    if (path / "train.txt").exists():
        return path / "train.txt"
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".txt", ".py", ".md", ".rst"))
    if not files:
        raise MtpxError(f"corpus directory {path} has no .txt/.py/.md/.rst files")
    work.mkdir(parents=True, exist_ok=True)
    joined = work / "corpus.txt"
    with open(joined, "w", encoding="utf-8") as fh:
        for f in files:
            fh.write(f.read_text(encoding="utf-8", errors="ignore") + DOC_SEPARATOR)
    return joined


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, type=Path, help="text file or directory (train.txt, or all text files)")
    p.add_argument("--val", type=Path, default=None, help="held-out text file (default: <corpus>/val.txt if present)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", type=Path, default=None, help="directory with tokenizer.json to reuse")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--no-mtp", action="store_true", help="train without an MTP layer")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the saved weights")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    for f in fields(TrainConfig):
        kind = type(f.default)
        parse = (lambda v: v.lower() in ("1", "true", "yes", "on")) if kind is bool else kind
        p.add_argument("--" + f.name.replace("_", "-"), type=parse, default=f.default,
                       choices=f.metadata.get("choices"))


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_path = corpus_file(args.corpus, out / "work")
    val_path = args.val or (args.corpus / "val.txt" if args.corpus.is_dir() and (args.corpus / "val.txt").exists() else None)
    tok_dir = args.tokenizer or out
    if args.tokenizer is None and not (out / "tokenizer.json").exists():
        print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on {train_path}", file=sys.stderr)
        train_tokenizer([train_path], args.vocab_size, out)
    tokenizer = Tokenizer.from_dir(tok_dir)
    train_data = tokenize_file(tokenizer, train_path)
    val_data = tokenize_file(tokenizer, val_path) if val_path else None
    print(f"corpus: {len(train_data):,} training tokens" + (f", {len(val_data):,} held-out" if val_data is not None else ""),
          file=sys.stderr)
    eos = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    cfg = ModelConfig(model_type="qwen3_5_text", vocab_size=tokenizer.vocab_size, tie_word_embeddings=True,
                      max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25,
                      eos_token_id=eos, **PRESETS[args.preset])
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model = new_model(cfg, 0 if args.no_mtp else 1, tc.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters", file=sys.stderr)
    val_log: list[str] = []

    def log(m: str) -> None:
        if m.startswith("step "):
            val_log.append(m)
        print(m, file=sys.stderr, flush=True)
    started = time.perf_counter()
    history = train(model, train_data, val_data, tc, out, resume=args.resume, log=log)
    minutes = (time.perf_counter() - started) / 60
    command = invocation("train", args)
    card = model_card(out.name, command, args, cfg, n_params, tc, history, val_log, minutes, len(train_data),
                      recipe=args.corpus / "recipe.json" if args.corpus.is_dir() else None)
    if (out / "README.md").exists() and CARD_MARK not in (out / "README.md").read_text(encoding="utf-8"):
        card = None  # keep a hand-written model card
    save_checkpoint(model, tok_dir, out, torch.bfloat16 if args.dtype == "bf16" else torch.float32, card)
    (out / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    print(f"saved {out}", file=sys.stderr)
    return 0


def invocation(command: str, args: argparse.Namespace) -> str:
    """The command line as typed when run as `mtpx <command>`, else rebuilt from the parsed options."""
    if len(sys.argv) > 1 and sys.argv[1] == command and Path(sys.argv[0]).name in ("mtpx", "cli.py", "__main__.py"):
        return f"mtpx {command} " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    opts = []
    for k, v in vars(args).items():
        if k.startswith("_") or callable(v) or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        opts.append(flag if v is True else f"{flag} {shlex.quote(str(v))}")
    return f"mtpx {command} " + " ".join(opts)


CARD_MARK = "<!-- model card written by mtpx train -->"


def model_card(name: str, command: str, args: argparse.Namespace, cfg: ModelConfig, n_params: int, tc: TrainConfig,
               history: list[float], val_log: list[str], minutes: float, n_tokens: int, recipe: Path | None) -> str:
    """README.md for a checkpoint `mtpx train` wrote: architecture, data recipe, the exact command, losses."""
    lines = [CARD_MARK, f"# {name}", "", "A Qwen3.5-architecture model (`Qwen3_5ForCausalLM`, model_type `qwen3_5_text`) trained "
             "from scratch by mtpx" + (", jointly with one MTP layer (`mtp.*`)" if not args.no_mtp else "") + ".", "",
             "## Command", "", "```", command, "```", "",
             "## Architecture", "",
             f"- {n_params / 1e6:.2f}M parameters (preset `{args.preset}`), vocab {cfg.vocab_size}, hidden "
             f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers: {', '.join(cfg.layer_types)}",
             f"- tied embeddings; saved as {args.dtype}", "",
             "## Training", "",
             f"- {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, AdamW lr {tc.lr} (cosine, warmup "
             f"{tc.warmup}), loss = CE(next token) + {tc.mtp_weight} x CE(MTP, token after next)",
             f"- corpus: {n_tokens:,} tokens; this run took {minutes:.1f} min"
             + (f"; final training loss {history[-1]:.3f}" if history else "")]
    lines += [f"- {m}" for m in val_log[-3:]]
    if recipe is not None and recipe.exists():
        r = json.loads(recipe.read_text())
        held = r.pop("held_out_files", [])
        lines += ["", "## Data recipe", "", "```json", json.dumps(r, indent=1), "```", "",
                  f"Held out (never trained on, used for evaluation): {len(held)} stdlib files: "
                  + ", ".join(f"`{h}`" for h in held)]
    return "\n".join(lines) + "\n"
