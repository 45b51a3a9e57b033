"""Acceptance of the demo model's MTP layer on held-out prompts (stdlib files never trained on), greedy.

usage: python scripts/eval_demo.py [--model demo] [--prompts 20] [--max-tokens 128]
Prints a markdown table: acceptance at k=1, mean acceptance length at k=3, tok/s none vs mtp, per workload.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sysconfig
from pathlib import Path

import mtpx
from mtpx.llm import resolve_model_path


def held_out_files(model_dir: Path) -> list[Path]:
    recipe = json.loads((model_dir / "corpus_recipe.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / rel for rel in recipe["held_out_files"] if (root / rel).exists()]


def workloads(files: list[Path], n: int) -> dict[str, list[str]]:
    code, prose, chat = [], [], []
    for f in files:
        src = f.read_text(encoding="utf-8", errors="ignore")
        lines = src.splitlines()
        for start in range(0, max(1, len(lines) - 40), 97):  # several openings per file
            code.append("\n".join(lines[start:start + 25]) + "\n")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 60:
                    prose.append(doc.split("\n\n")[0][:200])
                    chat.append(f"What does `{node.name}` do?")
    step = lambda xs: xs[:: max(1, len(xs) // n)][:n]
    return {"code": step(code), "prose": step(prose), "chat": step(chat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    llm = mtpx.LLM(args.model)
    sets = workloads(held_out_files(resolve_model_path(args.model)), args.prompts)
    print("| workload | prompts | acceptance k=1 | mean acceptance length k=3 | "
          "tok/s none | tok/s mtp k=3 | speedup | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, prompts in sets.items():
        if name == "chat":
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        acc1, acc3, len3, none_tps, mtp_tps, same = [], [], [], [], [], True
        for p in prompts:
            base = llm.generate(p, max_tokens=args.max_tokens)
            k1 = llm.generate(p, max_tokens=args.max_tokens, spec_type="mtp", spec_draft_n_max=1, spec_draft_policy="fixed")
            k3 = llm.generate(p, max_tokens=args.max_tokens, spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed")
            same &= base.token_ids == k1.token_ids == k3.token_ids
            acc1.append((k1.stats["accepted_tokens"], k1.stats["drafted_tokens"]))
            acc3.append((k3.stats["accepted_tokens"], k3.stats["drafts"]))
            none_tps.append(base.stats["decode_tokens_per_s"])
            mtp_tps.append(k3.stats["decode_tokens_per_s"])
        a1 = sum(a for a, _ in acc1) / max(1, sum(d for _, d in acc1))
        l3 = 1 + sum(a for a, _ in acc3) / max(1, sum(d for _, d in acc3))
        n, m = statistics.median(none_tps), statistics.median(mtp_tps)
        print(f"| {name} | {len(prompts)} | {a1:.1%} | {l3:.2f} | {n:.0f} | {m:.0f} | {m / n:.2f}x | {same} |")


if __name__ == "__main__":
    main()
