"""The model card's samples: `mtpx demo`'s prompt continued greedily, greedily with a repetition penalty, and
sampled, with MTP on, each also run without MTP to show whether the output is the same.

    python scripts/demo_samples.py demo [other checkpoint dirs...]
"""
import sys

from mtpx.commands.demo import PROMPT
from mtpx.llm import LLM

SETTINGS = [("greedy", {}), ("greedy, repetition_penalty 1.3", dict(repetition_penalty=1.3)),
            ("temperature 0.7, top_p 0.9, seed 1", dict(temperature=0.7, top_p=0.9, seed=1)),
            ("temperature 0.7, top_p 0.9, seed 2", dict(temperature=0.7, top_p=0.9, seed=2))]

for model in sys.argv[1:] or ["demo"]:
    llm = LLM(model)
    for name, kw in SETTINGS:
        mtp = llm.generate(PROMPT, max_tokens=120, spec_type="mtp", **kw)
        plain = llm.generate(PROMPT, max_tokens=120, spec_type="none", **kw)
        print(f"===== {model}: {name} (same tokens as without MTP: {mtp.token_ids == plain.token_ids})")
        print(PROMPT + mtp.text)
