"""Sampled decoding on the demo model, plain and MTP (fixed k = 3, 2048-row draft head), under three sampling
settings; the median decode tok/s of 3 runs (after one warm-up), 300 tokens of `mtpx demo`'s prompt each.
To compare two versions, run it from a worktree of each (BENCHMARKS.md section Y.6):

    git worktree add /tmp/old <commit>; PYTHONPATH=/tmp/old/src python scripts/sampling_ab.py
    python scripts/sampling_ab.py
"""
import statistics

import mtpx
from mtpx.commands.demo import PROMPT
from mtpx.llm import LLM

SETTINGS = {"T 0.7": dict(temperature=0.7), "T 0.7, top-k 20, top-p 0.8": dict(temperature=0.7, top_k=20, top_p=0.8),
            "T 0.7, repetition penalty 1.1": dict(temperature=0.7, repetition_penalty=1.1)}


def main() -> None:
    print(mtpx.__file__)
    llm = LLM("demo")
    for name, kw in SETTINGS.items():
        speeds: dict[str, list[float]] = {}
        for rep in range(4):
            for spec in ("none", "mtp"):
                c = llm.generate(PROMPT, max_tokens=300, ignore_eos=True, seed=rep, spec_type=spec,
                                 spec_draft_n_max=3, spec_draft_policy="fixed", spec_draft_vocab=2048, **kw)
                if rep:  # the first round warms up
                    speeds.setdefault(spec, []).append(c.stats["decode_tokens_per_s"])
        plain, mtp = statistics.median(speeds["none"]), statistics.median(speeds["mtp"])
        print(f"{name}: plain {plain:.0f} tok/s, MTP k = 3 {mtp:.0f} tok/s, {mtp / plain:.2f}x")


if __name__ == "__main__":
    main()
