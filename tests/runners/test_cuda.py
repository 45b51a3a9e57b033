"""The CUDA runner's static step passes (runners/cuda.py, runners/static.py): the same values as the ordinary step path, rows bit-identical whatever the
pass width, rollback, the state pool, and speculation token-identical to plain decoding. On the CPU the passes run
eagerly; where a GPU is present the same tests run on it too, with CUDA graphs and compiled small ops
(scripts/cuda_check.py does the same on the bundled model and bench prompts). The "cpu-triton" variant runs the
recurrence as the CUDA path does, in one Triton kernel (kernels/gdn_triton.py), here in Triton's interpreter."""
import pytest
import torch

import mtpx
from mtpx.errors import RequestError
from mtpx.runners import RunnerConfig
from mtpx.runners.static import WIDTH, StaticState


try:
    import triton
    HAS_INTERPRETER = triton.knobs.runtime.interpret
except ImportError:
    HAS_INTERPRETER = False
DEVICES = ["cpu",
           pytest.param("cpu-triton", marks=pytest.mark.skipif(not HAS_INTERPRETER, reason="no Triton interpreter")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _interpreted(request) -> bool:
    """Whether this test runs the "cpu-triton" variant."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and "cpu-triton" in callspec.params.values()


def _static_llm(ckpt, param: str, **kw) -> mtpx.LLM:
    """An LLM on the CUDA runner's static passes; "cpu-triton" runs their recurrence in Triton's interpreter."""
    config = RunnerConfig.from_env(static_steps=True, triton_gdn="interpret" if param == "cpu-triton" else None)
    llm = mtpx.LLM(ckpt, device=param.removesuffix("-triton"), runner_config=config, **kw)
    assert llm.runner.name == "cuda" and llm.runner.triton_gdn == (param != "cpu")
    return llm


def _prefilled(llm, prompt, static: bool):
    model = llm.model
    state = llm.runner.new_static_state(model, "main", 96) if static else model.new_state(96)
    hidden = model(torch.tensor([prompt], device=state.device), [state], "prefill")
    return state, hidden


@pytest.fixture(scope="module", params=DEVICES)
def fp32(dense_ckpt, request):
    return _static_llm(dense_ckpt, request.param, dtype="fp32")


@pytest.fixture(scope="module", params=DEVICES)
def bf16(dense_ckpt, request):
    return _static_llm(dense_ckpt, request.param)


def test_static_passes_match_the_step_path(fp32):
    """Passes of every width with rollbacks in between: main stack and MTP layer, fp32, against run_stack's step
    mode (per-query attention over the cache prefix; the static pass masks the whole cache)."""
    model, g = fp32.model, torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (11,), generator=g).tolist()
    eager, h_e = _prefilled(fp32, prompt, static=False)
    static, h_s = _prefilled(fp32, prompt, static=True)
    torch.testing.assert_close(h_s, h_e)
    tol = dict(rtol=1e-5, atol=1e-5) if fp32.device.type == "cpu" else dict(rtol=1e-4, atol=1e-4)  # GPU sums vary
    mtp_eager, mtp_static = model.new_mtp_state(96), fp32.runner.new_static_state(model, "mtp", 96)
    for width, keep in [(1, 1), (4, 2), (WIDTH, 5), (3, 3), (2, 1), (5, 1), (1, 1)]:
        tokens = torch.randint(0, 300, (1, width), generator=g).to(fp32.device)
        for s in (eager, static):
            s.mark()
        out_e, out_s = model(tokens, [eager], "step"), model(tokens, [static], "step")
        torch.testing.assert_close(out_s, out_e, **tol)
        m_e = model.mtp_forward(out_e, tokens, [mtp_eager], "step")
        m_s = model.mtp_forward(out_s, tokens, [mtp_static], "step")
        torch.testing.assert_close(m_s, m_e, **tol)
        for s in (eager, static):
            s.rollback(s.length - width + keep)
        mtp_eager.rollback(mtp_eager.length - width + keep)
        mtp_static.rollback(mtp_static.length - width + keep)
        assert static.length == eager.length and mtp_static.length == mtp_eager.length
    for i in static.conv:  # the restored Gated DeltaNet states themselves
        torch.testing.assert_close(static.recurrent[i], eager.recurrent[i], **tol)
        torch.testing.assert_close(static.conv[i], eager.conv[i])


def test_static_rows_do_not_depend_on_the_pass_width(bf16):
    """bf16: a verify pass of 5 positions gives each position the bits that 5 one-token passes give it."""
    model = bf16.model
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 300, (9,), generator=g).tolist()
    state, _ = _prefilled(bf16, prompt, static=True)
    tokens = torch.randint(0, 300, (1, 5), generator=g).to(bf16.device)
    start = state.length
    wide = model(tokens, [state], "step")
    wide_logits = model.logits(wide, step=True)
    state.rollback(start)
    narrow = torch.cat([model(tokens[:, t:t + 1], [state], "step") for t in range(5)], dim=1)
    assert torch.equal(wide, narrow)
    assert torch.equal(wide_logits, model.logits(narrow, step=True))


def test_speculation_on_static_passes_is_token_identical_to_plain_decoding(bf16, request):
    g = torch.Generator().manual_seed(2)
    interpreted = _interpreted(request)  # ~30 ms a kernel call: fewer cases
    for n in (17,) if interpreted else (3, 17, 40):
        prompt = torch.randint(0, 300, (n,), generator=g).tolist()
        ref = bf16.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="none").token_ids
        for k in (3,) if interpreted else (1, 3, WIDTH - 1):
            for spec in ("mtp", "ngram"):
                out = bf16.generate(prompt, max_tokens=24, ignore_eos=True, spec_type=spec, spec_draft_n_max=k,
                                    spec_draft_policy="fixed")
                assert out.token_ids == ref, (n, k, spec)


def test_greedy_drafts_stay_on_the_device_for_the_verify_pass(bf16, monkeypatch):
    """The static MTP chain leaves its drafts on the device with the verify row beside them, so the verify pass is
    queued behind the drafting passes (no host wait between them); the drafts are read as a list afterwards, and
    the output stays plain decoding's."""
    from mtpx.speculative.drafters import MTPDrafter
    chain, drafts = MTPDrafter._greedy_chain, []

    def watched(self, seq, k):
        d = chain(self, seq, k)
        drafts.append((d, d is not None and d.verify_row is not None))
        return d
    monkeypatch.setattr(MTPDrafter, "_greedy_chain", watched)
    prompt = [5, 6, 7, 8, 9]
    ref = bf16.generate(prompt, max_tokens=16, ignore_eos=True, spec_type="none").token_ids
    out = bf16.generate(prompt, max_tokens=16, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed").token_ids
    assert out == ref and drafts and all(on_device for _, on_device in drafts)
    assert all(d.verify_row is None and isinstance(d.tokens, list) and len(d.tokens) <= 3 for d, _ in drafts)


def test_static_states_are_reused_and_released(bf16):
    pool = bf16.runner.state_pool(bf16.model)
    bf16.generate([5, 6, 7], max_tokens=4, spec_type="mtp")
    pooled = {key: list(states) for key, states in pool.free.items()}
    assert all(len(s) == 1 for s in pooled.values()) and {k[0] for k in pooled} == {"main", "mtp"}
    bf16.generate([5, 6, 7, 8], max_tokens=4, spec_type="mtp")
    assert {k: list(v) for k, v in pool.free.items()} == pooled  # the same objects came back
    stream = bf16.stream([5, 6, 7], max_tokens=50, ignore_eos=True, spec_type="none")
    next(stream)
    assert not pool.free[("main", 256)]  # held by the running request ...
    stream.close()
    assert pool.free[("main", 256)]  # ... and returned when its caller stops early


def test_static_pass_limits_are_named(bf16):
    with pytest.raises(RequestError, match="spec_draft_n_max is at most"):
        bf16.generate([1, 2, 3], max_tokens=4, spec_type="mtp", spec_draft_n_max=WIDTH)
    from mtpx.serve.scheduler import Scheduler, SpecConfig
    with pytest.raises(RequestError, match="spec_draft_n_max is at most"):
        Scheduler(bf16, SpecConfig(spec_type="mtp", spec_draft_n_max=WIDTH))
    state = bf16.runner.new_static_state(bf16.model, "main", 64)
    assert isinstance(state, StaticState)
    with pytest.raises(RequestError, match="wider than"):
        bf16.model(torch.zeros(1, WIDTH + 1, dtype=torch.long, device=bf16.device), [state], "step")


@pytest.mark.skipif(not HAS_INTERPRETER and not torch.cuda.is_available(), reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_weights_stay_quantized_and_speculation_stays_exact(dense_ckpt, dtype):
    """int8 / int4 on the CUDA runner: codes kept quantized on the device, matmuls on the Triton kernels (here in
    Triton's interpreter), rows invariant to the pass width, so greedy MTP output equals plain decoding's."""
    from mtpx.models.linear import quantized_weights
    from mtpx.runners.weights import GpuInt4Weight, GpuInt8Weight
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = mtpx.LLM(dense_ckpt, dtype=dtype, device=device,
                   runner_config=RunnerConfig.from_env(static_steps=True, triton_gdn="interpret"))
    weights = quantized_weights(llm.model)
    kinds = {type(w) for w in weights}
    assert weights and kinds <= {GpuInt8Weight, GpuInt4Weight} and (GpuInt4Weight in kinds) == (dtype == "int4")
    assert all(t.device.type == device for w in weights for t in w.tensors())
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="none").token_ids
    out = llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                       spec_draft_policy="fixed")
    assert out.token_ids == ref


@pytest.mark.skipif(not HAS_INTERPRETER and not torch.cuda.is_available(), reason="needs a GPU or Triton's interpreter")
def test_quantized_experts_on_the_device_and_speculation_stays_exact(moe_ckpt):
    """int4 routed experts on the CUDA runner (eager: MoE routing picks experts on the host; off a GPU the runner is
    chosen by its static passes): per-expert codes on the device, on the Triton kernels, greedy MTP output equal to
    plain decoding's."""
    from mtpx.models.qwen3_5 import Experts
    from mtpx.runners.weights import GpuInt4Weight
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = mtpx.LLM(moe_ckpt, dtype="int4", device=device,
                   runner_config=RunnerConfig.from_env(static_steps=None if device == "cuda" else True))
    assert llm.runner.name == "cuda"
    blocks = [w for m in llm.model.modules() if isinstance(m, Experts) for ws in m.quantized.values() for w in ws]
    assert blocks and all(type(w) is GpuInt4Weight and w.codes.device.type == device for w in blocks)
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=6, ignore_eos=True, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=6, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed").token_ids == plain
