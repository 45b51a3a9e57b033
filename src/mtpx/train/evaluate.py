"""Acceptance of a model's MTP layer on held-out text: teacher-forced (fast, no engine) and real speculative decoding.

Held-out prompts come from the stdlib files the demo corpus never trains on (`recipe.json`'s `held_out_files`):
code (the first lines of a function or class), prose (a held-out docstring's opening, formatted as in training) and
chat (a question about a held-out function, in the chat template).

    python -m mtpx.train.evaluate --model demo --k 1 3
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

import torch

from mtpx.models.qwen3_5 import Qwen35Model
from mtpx.train.corpus import QUESTIONS, chat


@torch.no_grad()
def teacher_forced_acceptance(model: Qwen35Model, data: torch.Tensor, k: int = 1, windows: int = 16,
                              seq_len: int = 256, seed: int = 777) -> list[float]:
    """Per draft step j = 1..k: the fraction of positions where the j-th chained MTP draft equals the base model's
    greedy prediction, with the held-out text standing in for the accepted tokens (teacher forcing).

    Step 1 at position i sees (h_i, t_{i+1}) and is compared with the base argmax at i + 1. Step j > 1 feeds back the
    MTP's own output (after mtp.norm) with t_{i+j}, as drafting does. The rates are unconditional (step j counts as a
    hit even when step j - 1 missed)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data) - seq_len - 1
    starts = torch.randint(0, max(1, n), (windows,), generator=g).tolist()
    hits, total = [0] * k, [0] * k
    for s0 in range(0, windows, 8):
        x = torch.stack([data[s:s + seq_len] for s in starts[s0:s0 + 8]]).long()
        hidden = model(x)
        target = model.logits(hidden).argmax(-1)  # base greedy prediction of t_{p+1} at every p
        h = hidden
        for j in range(1, k + 1):
            T = x.shape[1] - j
            if T <= 0:
                break
            h = model.mtp_forward(h[:, :T], x[:, j:j + T])  # position i: predicts t_{i+j+1}
            draft = model.logits(h).argmax(-1)
            ref = target[:, j:j + T]
            hits[j - 1] += (draft == ref).sum().item()
            total[j - 1] += ref.numel()
    return [a / b if b else 0.0 for a, b in zip(hits, total)]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_files(recipe: Path | None = None) -> list[Path]:
    if recipe is not None and recipe.exists():
        names = json.loads(recipe.read_text())["held_out_files"]
    else:
        from mtpx.train.corpus import is_held_out, stdlib_files
        return [f for f in stdlib_files() if is_held_out(f)]
    return [stdlib_root() / n for n in names if (stdlib_root() / n).exists()]


def _defs(path: Path) -> list[tuple[ast.AST, list[str]]]:
    src = path.read_text(encoding="utf-8", errors="ignore")
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    lines = src.splitlines()
    return [(n, lines) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def heldout_prompts(files: list[Path], kind: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompts of one kind (code / prose / chat) from held-out stdlib files, deterministic for a seed."""
    rng = random.Random(seed)
    out: list[str] = []
    pool = []
    for f in files:
        module = str(f.relative_to(stdlib_root()))[:-3].replace("/", ".").removesuffix(".__init__")
        for node, lines in _defs(f):
            doc = ast.get_docstring(node)
            pool.append((module, node, lines, doc))
    rng.shuffle(pool)
    for module, node, lines, doc in pool:
        if len(out) >= n:
            break
        if kind == "code":
            body = lines[node.lineno - 1: node.lineno - 1 + 8]
            if len(body) < 4 or len("\n".join(body)) > 600:
                continue
            out.append("\n".join(body) + "\n")
        elif kind == "prose":
            if node.name.startswith("_") or not doc or len(doc) < 80:
                continue
            words = doc.split("\n\n")[0].split()
            out.append(f"{module}.{node.name}\n\n" + " ".join(words[: max(4, len(words) // 3)]))
        elif kind == "chat":
            if node.name.startswith("_") or not doc or len(doc) < 40:
                continue
            q = rng.choice(QUESTIONS).format(name=node.name, module=module, kind="function or class")
            out.append(chat(q, "").split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n")
        else:
            raise ValueError(kind)
    return out


def repetition(ids: list[int], text: str) -> dict:
    """How much a continuation repeats itself: the share of its token 4-grams seen before in it, and of its
    non-blank lines that repeat an earlier line."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    seen, repeated = set(), 0
    for ln in lines:
        repeated += ln in seen
        seen.add(ln)
    return {"rep4": 1 - len(set(grams)) / len(grams) if grams else 0.0,
            "repeated_lines": repeated / len(lines) if lines else 0.0}


def speculative_acceptance(llm, prompts: list[str], k: int, max_tokens: int, spec_type: str = "mtp",
                           draft_model: str | None = None, decoding: dict | None = None) -> dict:
    """Greedy speculative decoding of every prompt with a fixed k (and the given penalties, `decoding`); pooled
    acceptance statistics and the continuations' mean repetition."""
    drafts = drafted = accepted = 0
    first_accepted = 0.0
    gen = 0
    reps = []
    for p in prompts:
        c = llm.generate(p, max_tokens=max_tokens, temperature=0.0, spec_type=spec_type, spec_draft_n_max=k,
                         spec_draft_n_min=k, spec_draft_policy="fixed", spec_draft_model=draft_model,
                         **(decoding or {}))
        s = c.stats
        drafts += s["drafts"]
        drafted += s["drafted_tokens"]
        accepted += s["accepted_tokens"]
        gen += s["generated_tokens"]
        if s["acceptance_by_position"]:  # accepted / drafted at each position; every draft has a first position
            first_accepted += s["acceptance_by_position"][0] * s["drafts"]
        reps.append(repetition(c.token_ids, c.text))
    return {"k": k, "prompts": len(prompts), "generated_tokens": gen, "drafts": drafts, "drafted_tokens": drafted,
            "accepted_tokens": accepted, "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
            "first_position_acceptance": first_accepted / drafts if drafts else 0.0,
            **{m: sum(r[m] for r in reps) / len(reps) if reps else 0.0 for m in ("rep4", "repeated_lines")}}


@torch.inference_mode()
def quantization_error(reference, quantized, files: list[Path], windows: int = 16, length: int = 256) -> dict:
    """Held-out next-token loss of two LLMs on the same text (the first `length` tokens of `windows` held-out files)
    and how often their greedy choices agree: the accuracy cost of a quantization."""
    nll = {"reference": 0.0, "quantized": 0.0}
    agree = total = 0
    for f in files[:windows]:
        ids = reference.tokenizer.encode(f.read_text(encoding="utf-8", errors="ignore"))[:length + 1]
        if len(ids) < 2:
            continue
        target = torch.tensor(ids[1:])
        ref, q = reference.logits(ids[:-1]), quantized.logits(ids[:-1])
        nll["reference"] += torch.nn.functional.cross_entropy(ref, target, reduction="sum").item()
        nll["quantized"] += torch.nn.functional.cross_entropy(q, target, reduction="sum").item()
        agree += (ref.argmax(-1) == q.argmax(-1)).sum().item()
        total += len(target)
    return {"tokens": total, "loss_reference": nll["reference"] / total, "loss_quantized": nll["quantized"] / total,
            "greedy_agreement": agree / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--recipe", type=Path, default=None, help="corpus recipe.json (default: the model's corpus_recipe.json)")
    p.add_argument("--kinds", nargs="+", default=["code", "prose", "chat"])
    p.add_argument("--k", nargs="+", type=int, default=[1, 3])
    p.add_argument("--n", type=int, default=16, help="prompts per kind")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--spec-type", default="mtp")
    p.add_argument("--draft-model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--samples", type=int, default=0, help="also print this many greedy code continuations")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="greedy with this repetition penalty")
    p.add_argument("--dry-multiplier", type=float, default=0.0, help="greedy with this DRY penalty (0 = off)")
    p.add_argument("--compare-dtype", default=None,
                   help="instead: held-out loss and greedy agreement of the model in this dtype (e.g. int8, int4) vs bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mtpx.llm import LLM, resolve_model_path
    path = resolve_model_path(args.model)
    recipe = args.recipe or path / "corpus_recipe.json"
    files = held_out_files(recipe)
    llm = LLM(args.model, generation_config=False)  # greedy, as the acceptance figures state
    if args.compare_dtype:
        r = quantization_error(llm, LLM(args.model, dtype=args.compare_dtype, generation_config=False), files)
        print(f"{args.compare_dtype} vs bf16 on {r['tokens']} held-out tokens: loss {r['loss_quantized']:.4f} vs "
              f"{r['loss_reference']:.4f}, greedy agreement {r['greedy_agreement']:.1%}")
        return 0
    decoding = dict(repetition_penalty=args.repetition_penalty, dry_multiplier=args.dry_multiplier)
    results = []
    for kind in args.kinds:
        prompts = heldout_prompts(files, kind, args.n)
        for k in args.k:
            r = speculative_acceptance(llm, prompts, k, args.max_tokens, args.spec_type, args.draft_model, decoding)
            r["kind"] = kind
            results.append(r)
            print(f"{kind:5s} k={k}: acceptance {r['acceptance_rate']:.1%}, "
                  f"first draft {r['first_position_acceptance']:.1%}, "
                  f"mean acceptance length {r['mean_acceptance_length']:.2f} ({r['prompts']} prompts, "
                  f"{r['generated_tokens']} tokens; repeated 4-grams {r['rep4']:.3f}, lines "
                  f"{r['repeated_lines']:.3f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for prompt in heldout_prompts(files, "code", args.samples, seed=1):
        plain = llm.generate(prompt, max_tokens=args.max_tokens, **decoding)
        spec = llm.generate(prompt, max_tokens=args.max_tokens, spec_type=args.spec_type, spec_draft_n_max=3,
                            spec_draft_policy="fixed", spec_draft_model=args.draft_model, **decoding)
        same = "identical" if spec.token_ids == plain.token_ids else "DIFFERENT"
        print(f"\n--- prompt\n{prompt}--- greedy continuation ({same} with MTP k=3; "
              f"{plain.stats['decode_tokens_per_s']:.0f} tok/s plain, {spec.stats['decode_tokens_per_s']:.0f} tok/s MTP, "
              f"mean acceptance length {spec.stats['mean_acceptance_length']:.2f})\n{plain.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
