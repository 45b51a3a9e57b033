"""`mtpx demo`: the bundled model continues a Python snippet, with MTP off and on, and shows what MTP gained."""
from __future__ import annotations

import argparse
import sys

from mtpx.commands.run import stats_line
from mtpx.llm import LLM

PROMPT = '''import os


def read_lines(path):
    """Return the lines of a text file, without trailing newlines."""
'''


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="demo")
    p.add_argument("--prompt", "-p", default=PROMPT)
    p.add_argument("--max-tokens", "-n", type=int, default=200)
    p.add_argument("--spec-draft-n-max", type=int, default=3)


def main(args: argparse.Namespace) -> int:
    llm = LLM(args.model)
    print(f"model: {llm.path} ({sum(p.numel() for p in llm.model.parameters()) / 1e6:.1f}M parameters, "
          f"{llm.dtype}, {llm.device})\n")
    llm.generate(args.prompt, max_tokens=16)  # warm-up, so neither run pays first-call costs
    results = {}
    for spec in ("none", "mtp"):
        out = llm.generate(args.prompt, max_tokens=args.max_tokens, spec_type=spec,
                           spec_draft_n_max=args.spec_draft_n_max)
        results[spec] = out
        print(f"--- spec_type={spec} " + "-" * 50)
        print(args.prompt + out.text)
        print(stats_line(out.stats), file=sys.stderr, flush=True)
        print()
    plain, mtp = results["none"].stats, results["mtp"].stats
    same = results["none"].token_ids == results["mtp"].token_ids
    print(f"MTP: {mtp['decode_tokens_per_s']:.1f} tok/s vs {plain['decode_tokens_per_s']:.1f} tok/s without "
          f"({mtp['decode_tokens_per_s'] / max(plain['decode_tokens_per_s'], 1e-9):.2f}x), "
          f"acceptance {mtp['acceptance_rate']:.1%}, mean acceptance length {mtp['mean_acceptance_length']:.2f}, "
          f"output {'identical' if same else 'DIFFERENT'} to plain decoding")
    return 0 if same else 1
