"""n > 1 samples of one prompt (engine/fork.py): one pass of the prompt through the model, its caches copied to the
other samples, and each sample's output what a request of its own would give."""
from __future__ import annotations

import pytest
import torch

import mtpx
from mtpx.engine.params import SpecConfig

SPECS = {
    "none": SpecConfig(),
    "mtp": SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"),
    "ngram": SpecConfig(spec_type="ngram", spec_draft_n_max=3, spec_draft_policy="fixed"),
}
PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n"


class PrefillCounter:
    """Counts the main model's prefill passes and the prompt tokens they process (a forward pre-hook)."""

    def __init__(self, model):
        self.calls, self.tokens = 0, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        mode = args[2] if len(args) > 2 else kwargs.get("mode")
        if mode == "prefill":
            self.calls += 1
            self.tokens += args[0].shape[1]

    def remove(self):
        self.handle.remove()


def run_samples(llm, spec: SpecConfig, n: int, max_tokens: int, **sampling) -> list[list[int]]:
    """n samples of PROMPT through the engine (seed + i each, as the server derives them), decoded together."""
    with torch.inference_mode():  # as the scheduler's thread runs the engine
        return _run_samples(llm, spec, n, max_tokens, **sampling)


def _run_samples(llm, spec: SpecConfig, n: int, max_tokens: int, **sampling) -> list[list[int]]:
    eng = llm.engine
    ids = eng.encode_prompt(PROMPT)
    drafter, policy = eng.drafter(spec, batched=True), eng.new_policy(spec)
    seed = sampling.pop("seed", None)
    reqs = [eng.open(ids, max_tokens, eng.sampling_params(**sampling, seed=None if seed is None else seed + i),
                     ignore_eos=True) for i in range(n)]
    try:
        eng.start_shared(reqs, drafter)
        while any(not r.seq.finished for r in reqs):
            live = [r for r in reqs if not r.seq.finished]
            for r, new in zip(live, eng.decode_round(drafter, policy, [r.seq for r in live])):
                r.advance(new)
        return [list(r.seq.generated) for r in reqs]
    finally:
        for r in reqs:
            eng.release(r.seq)


@pytest.fixture(scope="module")
def llm(dense_ckpt):
    return mtpx.LLM(dense_ckpt)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_samples_share_one_prefill_and_equal_one_request(llm, name):
    spec = SPECS[name]
    single = llm.generate(PROMPT, max_tokens=20, ignore_eos=True, spec=spec).token_ids
    counter = PrefillCounter(llm.model)
    try:
        outs = run_samples(llm, spec, 3, 20)
    finally:
        counter.remove()
    n_prompt = len(llm.encode_prompt(PROMPT))
    assert (counter.calls, counter.tokens) == (1, n_prompt)  # the prompt ran through the model once
    assert outs == [single] * 3


@pytest.mark.parametrize("name", ["none", "mtp"])
def test_sampled_samples_equal_separate_requests_with_their_seeds(llm, name):
    spec = SPECS[name]
    outs = run_samples(llm, spec, 3, 16, temperature=1.0, seed=11)
    alone = [llm.generate(PROMPT, max_tokens=16, ignore_eos=True, spec=spec, temperature=1.0, seed=11 + i).token_ids
             for i in range(3)]
    assert outs == alone
    assert len({tuple(o) for o in outs}) > 1  # the seeds differ, and so do the samples


def test_static_states_are_copied_in_place(dense_ckpt):
    """Fixed-address caches (CUDA graphs on a GPU; here run eagerly) get the prompt copied into their own tensors."""
    llm = mtpx.LLM(dense_ckpt, static_steps=True)
    single = llm.generate(PROMPT, max_tokens=12, ignore_eos=True, spec=SPECS["mtp"]).token_ids
    assert run_samples(llm, SPECS["mtp"], 2, 12) == [single] * 2
