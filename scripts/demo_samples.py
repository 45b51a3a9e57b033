"""The model card's samples (models/demo/README.md): `mtpx demo`'s prompt, 200 tokens, under `mtpx demo`'s decoding
(greedy, repetition penalty 1.1, DRY 0.8), with the repetition penalty alone, plain greedy, and sampled; each with
MTP on and off, to show whether the output is the same.

    python scripts/demo_samples.py [demo | checkpoint dirs...]
"""
import sys

from mtpx.commands.demo import PROMPT
from mtpx.llm import LLM

SETTINGS = [("greedy, repetition_penalty 1.1, dry_multiplier 0.8 (mtpx demo)",
             dict(repetition_penalty=1.1, dry_multiplier=0.8)),
            ("greedy, repetition_penalty 1.1", dict(repetition_penalty=1.1)),
            ("greedy", {}),
            ("temperature 0.7, top_p 0.9, seed 1", dict(temperature=0.7, top_p=0.9, seed=1))]

for model in sys.argv[1:] or ["demo"]:
    llm = LLM(model, generation_config=False)
    for name, kw in SETTINGS:
        mtp = llm.generate(PROMPT, max_tokens=200, spec_type="mtp", **kw)
        plain = llm.generate(PROMPT, max_tokens=200, spec_type="none", **kw)
        print(f"===== {model}: {name} (same tokens as without MTP: {mtp.token_ids == plain.token_ids})")
        print(PROMPT + mtp.text)
