"""Microbenchmark of the sampling path on the CPU: target_probs against the tests' full-sort reference, and
sample() against torch.multinomial, for the demo's vocabulary and Qwen3.5's (BENCHMARKS.md sections Y.4, Y.5).

    python scripts/bench_sampling.py [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_sampling import reference_target_probs  # noqa: E402  the definition the tests check against

from mtpx.sampling import SamplingParams, sample, target_probs  # noqa: E402

SETTINGS = [dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.8),
            dict(temperature=0.6, top_k=20, top_p=0.95)]


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(p.parse_args().threads)
    g = torch.Generator().manual_seed(0)
    for vocab in (8192, 248320):
        n = 20 if vocab > 10000 else 200
        logits = torch.randn(4, vocab, generator=g) * 3
        for kw in SETTINGS:
            params = SamplingParams(**kw)
            print(f"V={vocab} {kw}, 4 rows: full sort {best_us(lambda: reference_target_probs(logits, params), n):.0f}"
                  f" us, target_probs {best_us(lambda: target_probs(logits, params), n):.0f} us")
        probs = torch.softmax(logits[0], -1)
        print(f"V={vocab}, one draw: torch.multinomial "
              f"{best_us(lambda: torch.multinomial(probs, 1, generator=g), n):.0f} us, "
              f"sample {best_us(lambda: sample(probs, g), n):.0f} us")


if __name__ == "__main__":
    main()
