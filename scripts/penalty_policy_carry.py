"""The demo, greedy, with and without repetition penalties: six requests in a row with MTP (adaptive, the draft
policy carried over between them, as mtpx.LLM does) against plain decoding, each MTP request's speedup and drafts.
BENCHMARKS.md section R.
    .venv/bin/python scripts/penalty_policy_carry.py
"""
from mtpx.llm import LLM
from mtpx.commands.demo import PROMPT
llm = LLM("demo")
for rp in (1.0, 1.1, 1.3):
    llm._policies.clear()
    g = lambda s: llm.generate(PROMPT, max_tokens=400, spec_type=s, repetition_penalty=rp, ignore_eos=True).stats
    g("none")
    line = []
    for i in range(6):
        n = g("none")["decode_tokens_per_s"]; m = g("mtp")
        line.append(f"{m['decode_tokens_per_s'] / n:.2f}x/{m['drafts']}")
    print("rp", rp, " ".join(line))
