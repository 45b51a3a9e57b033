"""Process-wide CPU settings of mtpx.llm."""
import torch

from mtpx.llm import tune_cpu_process


def test_tune_cpu_process_flushes_subnormals_only():
    tiny = torch.full((100_000,), 1e-30)  # large enough to be split across the intra-op threads
    tune_cpu_process()
    # 1e-40 is below the smallest normal fp32 (1.2e-38): zero once flushing is on; 1e-37 is normal and stays
    assert torch.count_nonzero(tiny * 1e-10) == 0
    assert torch.count_nonzero(tiny * 1e-7) == tiny.numel()


def test_unset_sampling_values_come_from_the_models_generation_config(dense_ckpt, tmp_path):
    """As vLLM does: a generation config's temperature / top_k / ... fill what a call leaves unset."""
    import json
    import shutil

    import mtpx
    from mtpx.serve.app import Body, Server
    path = tmp_path / "m"
    shutil.copytree(dense_ckpt, path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.9, "top_k": 5}))
    llm = mtpx.LLM(path)
    assert llm.sampling_defaults == {"temperature": 0.9, "top_k": 5}
    prompt = [5, 6, 7]
    sampled = llm.generate(prompt, max_tokens=12, seed=3, ignore_eos=True, spec_type="none").token_ids
    assert sampled == llm.generate(prompt, max_tokens=12, seed=3, ignore_eos=True, temperature=0.9,
                                   top_k=5, spec_type="none").token_ids
    greedy = llm.generate(prompt, max_tokens=12, ignore_eos=True, temperature=0, spec_type="none").token_ids
    assert sampled != greedy
    plain = mtpx.LLM(path, generation_config=False)
    assert plain.sampling_defaults == {}
    assert plain.generate(prompt, max_tokens=12, seed=3, ignore_eos=True, spec_type="none").token_ids == greedy
    assert llm.sampling_params(top_k=0).top_k == 0  # an explicit value wins, 0 included
    # the API: a request that leaves temperature out gets the model's, not OpenAI's 1.0
    server = Server(llm)
    params = server.sampling(Body({"max_tokens": 4}), 3, chat=False)["params"]
    assert (params.temperature, params.top_k, params.top_p) == (0.9, 5, 1.0)
    assert server.sampling(Body({"temperature": 0.2}), 3, chat=False)["params"].temperature == 0.2


def test_the_draft_policy_carries_over_between_requests_with_the_same_settings(dense_ckpt):
    """Like the server's shared policy: what the adaptive policy measured in one request (acceptance per position,
    round costs) is where the next one with the same drafter and settings starts; other settings get their own."""
    import mtpx
    llm = mtpx.LLM(dense_ckpt)
    prompt = [5, 6, 7, 8]
    plain = llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="none").token_ids
    first = llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="mtp")
    assert first.token_ids == plain and len(llm.engine.policies) == 1
    policy = next(iter(llm.engine.policies.values()))
    rounds, tried = policy.rounds, sum(policy.tried)
    assert rounds > 0
    second = llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="mtp")
    assert second.token_ids == plain
    assert list(llm.engine.policies.values()) == [policy] and policy.rounds > rounds and sum(policy.tried) >= tried / 2
    llm.generate(prompt, max_tokens=8, ignore_eos=True, spec_type="mtp", spec_draft_n_max=2)
    llm.generate(prompt, max_tokens=8, ignore_eos=True, spec_type="mtp", repetition_penalty=1.2)
    assert len(llm.engine.policies) == 3


def test_generate_speculates_with_mtp_by_default_where_the_model_has_it(dense_ckpt, tmp_path):
    """As `mtpx run` does: MTP with the adaptive policy unless spec_type says otherwise; a model without an MTP layer
    decodes plainly. The output is plain decoding's either way."""
    import mtpx
    from checkpoints import make_checkpoint
    llm = mtpx.LLM(dense_ckpt)
    default = llm.generate([5, 6, 7], max_tokens=24, ignore_eos=True)
    plain = llm.generate([5, 6, 7], max_tokens=24, ignore_eos=True, spec_type="none")
    assert default.token_ids == plain.token_ids
    assert default.stats["drafts"] > 0 and plain.stats["drafts"] == 0
    no_mtp = mtpx.LLM(make_checkpoint(tmp_path / "no-mtp", mtp=False))
    assert no_mtp.generate([5, 6, 7], max_tokens=4).stats["drafts"] == 0
