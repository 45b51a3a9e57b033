"""`mtpx demo`'s prompt, 200 tokens, plain decoding against MTP under several draft-length settings (BENCHMARKS.md
section U): a warm-up call each, then four alternated rounds; median decode tok/s and its ratio to plain decoding.

    python scripts/demo_prompt_ab.py
"""
import statistics

from mtpx.commands.demo import PROMPT
from mtpx.llm import LLM

llm = LLM("demo")
MTP = dict(spec_type="mtp", spec_draft_vocab=2048)
modes = {"none": dict(spec_type="none"),
         **{f"adaptive{k}": dict(MTP, spec_draft_n_max=k) for k in (3, 4, 6)},
         **{f"fixed{k}": dict(MTP, spec_draft_n_max=k, spec_draft_policy="fixed") for k in (2, 3, 4, 6)}}
speeds = {m: [] for m in modes}
for m, kw in modes.items():
    llm.generate(PROMPT, max_tokens=200, **kw)
for r in range(4):
    for m, kw in modes.items():
        speeds[m].append(llm.generate(PROMPT, max_tokens=200, **kw).stats["decode_tokens_per_s"])
base = statistics.median(speeds["none"])
for m, v in speeds.items():
    print(m, round(statistics.median(v)), round(statistics.median(v) / base, 2), [round(x) for x in v])
