"""Decode speed of long generations with incremental detokenization against a full decode every round.

BENCHMARKS.md section W: `.venv/bin/python scripts/detokenize_ab.py` (the demo model, 2000 generated tokens, plain
decoding and MTP with the 2048-row draft head, 3 alternations). "full" replaces IncrementalText.decode by a decode
of every token so far, which is what streaming did before.
"""
import statistics
from pathlib import Path

import mtpx.tokenizer as tokenizer
from mtpx.llm import LLM


def main() -> None:
    llm = LLM("demo")
    prompt = Path("/usr/lib/python3.11/json/decoder.py").read_text()[:1200]
    variants = {"full": lambda self, ids: self.tokenizer.decode(ids), "incremental": tokenizer.IncrementalText.decode}
    speeds: dict[tuple[str, str], list[float]] = {}
    for _ in range(3):
        for name, decode in variants.items():
            tokenizer.IncrementalText.decode = decode
            for spec in ("none", "mtp"):
                c = llm.generate(prompt, max_tokens=2000, ignore_eos=True, spec_type=spec,
                                 spec_draft_vocab=2048 if spec == "mtp" else 0)
                speeds.setdefault((spec, name), []).append(c.stats["decode_tokens_per_s"])
    tokenizer.IncrementalText.decode = variants["incremental"]
    for (spec, name), v in sorted(speeds.items()):
        print(f"{spec:5s} {name:12s} {statistics.median(v):7.0f} tok/s (runs: {', '.join(f'{x:.0f}' for x in v)})")


if __name__ == "__main__":
    main()
