"""Greedy decoding with penalties on the demo model: plain decoding against MTP drafting with the one-call draft chain
applying the penalties (kernels/layer_step.cpp, "new") and with the step-by-step drafting loop it replaced there
("old": the chain used to be skipped when a request had penalties), alternated in one process; outputs checked
identical to plain decoding. BENCHMARKS.md section R. Every request starts with a fresh draft policy, as requests
did when this was measured (one policy carried across both paths would mix their costs).
    .venv/bin/python scripts/penalty_chain_ab.py
"""
import statistics
from mtpx.llm import LLM
from mtpx.commands.demo import PROMPT
from mtpx.speculative import drafters
llm = LLM("demo")
new_chain = drafters.MTPDrafter._greedy_chain
def old_chain(self, seq, k):
    return None if seq.params.penalized else new_chain(self, seq, k)
def run(path, spec, rp, **kw):
    drafters.MTPDrafter._greedy_chain = new_chain if path == "new" else old_chain
    llm._policies.clear()
    out = llm.generate(PROMPT, max_tokens=400, spec_type=spec, repetition_penalty=rp, ignore_eos=True, **kw)
    return out
for rp in (1.1, 1.3):
    ref = run("new", "none", rp).token_ids
    for _ in range(2):
        run("new", "mtp", rp); run("old", "mtp", rp)  # warm-up
    res = {}
    for rep in range(4):
        for key, (path, spec, kw) in {"none": ("new", "none", {}), "old adaptive": ("old", "mtp", {}),
                                      "new adaptive": ("new", "mtp", {}),
                                      "old k2": ("old", "mtp", dict(spec_draft_n_max=2, spec_draft_policy="fixed")),
                                      "new k2": ("new", "mtp", dict(spec_draft_n_max=2, spec_draft_policy="fixed"))}.items():
            out = run(path, spec, rp, **kw)
            assert out.token_ids == ref, key
            res.setdefault(key, []).append(out.stats)
    base = statistics.median(s["decode_tokens_per_s"] for s in res["none"])
    for key, stats in res.items():
        tps = statistics.median(s["decode_tokens_per_s"] for s in stats)
        acc = stats[-1]
        print(f"rp {rp} {key:13s} {tps:7.1f} tok/s {tps / base:.2f}x  acceptance {acc['acceptance_rate']:.1%} "
              f"mean acc len {acc['mean_acceptance_length']:.2f} drafts {acc['drafts']}")
