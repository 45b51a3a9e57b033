"""The CPU runner (runners/cpu.py) against the family's reference code: fused step kernels compute the same function,
and the whole-layer, whole-stack and per-module levels of the runner give the same bits."""
import pytest
import torch

from mtpx import kernels
from mtpx.models.linear import TileWeight, quantized_weights
from mtpx.runners import Runner, RunnerConfig, select_runner
from mtpx.runners import cpu as cpu_runner
from mtpx.speculative.drafters import Draft, Drafter

from isa import LEVELS, isa_levels, running_on

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="rowgemm kernel could not be built here")


def _model(ckpt, runner: Runner):
    from mtpx.loading import build_model, load_checkpoint
    return runner.prepare(build_model(load_checkpoint(ckpt), torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("variant", [dict(), dict(moe=True)], ids=["dense", "moe"])
def test_fused_step_kernels_compute_what_the_reference_computes(ckpt_factory, variant):
    """Step passes of a bf16 model on the CPU runner (fused norms, attention, Gated DeltaNet, SwiGLU, whole layers)
    against the reference runner's op-by-op passes: the same function, up to bf16 rounding of intermediates."""
    ckpt = ckpt_factory(**variant)
    cpu = torch.device("cpu")
    fast = _model(ckpt, cpu_runner.CpuRunner(cpu, torch.bfloat16, None, RunnerConfig.from_env(), fused=True))
    reference = _model(ckpt, Runner(cpu, torch.bfloat16))
    x = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(5))

    def run(model) -> tuple[torch.Tensor, torch.Tensor]:
        state = model.new_state(64)
        with torch.no_grad():
            model(x[:, :20], [state], "prefill")
            logits = [model.logits(model(x[:, t:t + w], [state], "step"), step=True)
                      for t, w in ((20, 1), (21, 4), (25, 5))]
        return torch.cat(logits, 1).float()[0], state.recurrent[0]

    fused, fused_state = run(fast)
    ref, ref_state = run(reference)
    assert (fused - ref).abs().max() <= 0.03 * ref.abs().max()
    assert (fused.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8  # a random tiny model has near ties
    torch.testing.assert_close(fused_state, ref_state, rtol=1e-3, atol=1e-4 * ref_state.abs().max().item())


def test_the_runner_is_chosen_at_load(dense_ckpt):
    """bf16 / int8 / int4 on the CPU get the CPU runner with its fused kernels where they are built; fp32 runs the
    reference code on it."""
    from mtpx.loading import load_checkpoint
    cfg, cpu = load_checkpoint(dense_ckpt).config, torch.device("cpu")
    for dtype, quantization in ((torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4")):
        runner = select_runner(cpu, dtype, quantization, cfg, RunnerConfig())
        assert runner.name == "cpu" and runner.fused == kernels.rowgemm_available()
    fp32 = select_runner(cpu, torch.float32, None, cfg, RunnerConfig())
    assert fp32.name == "cpu" and not fp32.fused
    assert select_runner(cpu, torch.bfloat16, None, cfg, RunnerConfig(static_steps=True)).name == "cuda"


@needs_kernel
@pytest.mark.parametrize("dtype", ["bf16", "bf16-vector", "int8", "int4"])
def test_whole_stack_whole_layer_and_module_levels_give_the_same_bits(dense_ckpt, dtype, monkeypatch):
    """The whole-stack call (kernels.StackStep) chains the whole-layer kernels, which chain the kernels the per-module
    path calls: the same logits and caches bit for bit on all three, for the main stack and the MTP layer, across
    decode, verify and rollback. bf16 runs as AMX tiles where the CPU has them; bf16-vector on the vector kernel."""
    from mtpx.llm import LLM
    config = RunnerConfig.from_env(tiles=dtype != "bf16-vector")
    llm = LLM(dense_ckpt, dtype=dtype.removesuffix("-vector"), runner_config=config)
    model = llm.model
    tiled = sum(isinstance(w, TileWeight) for w in quantized_weights(model))
    assert (tiled > 0) == (dtype == "bf16" and kernels.amx_available())
    assert all(cpu_runner.layer_weights(layer) is not None for layer in [*model.model.layers, *model.mtp.layers])
    x = torch.randint(0, 300, (1, 31), generator=torch.Generator().manual_seed(9))

    def run() -> tuple[torch.Tensor, list]:
        state, mtp_state = model.new_state(64), model.new_mtp_state(64)
        out = []
        with torch.inference_mode():
            hidden = model(x[:, :20], [state], "prefill")
            model.mtp_forward(hidden[:, :-1], x[:, 1:20], [mtp_state], "prefill")
            for t, w in ((20, 1), (21, 4), (25, 5)):
                state.mark()
                hidden = model(x[:, t:t + w], [state], "step")
                out.append(model.logits(hidden, step=True))
                mtp_out = model.mtp_forward(hidden, x[:, t + 1:t + w + 1], [mtp_state], "step")
                out.append(model.logits(mtp_out, step=True))
                state.rollback(state.length - 1)  # keep all but the last position: a replayed state is used next
        return torch.cat(out, 1), [*state.recurrent.values(), *state.conv.values(), *state.kv[2], *mtp_state.kv[0]]

    assert cpu_runner.step_stack(model) is not None
    stack, stack_states = run()
    monkeypatch.setattr(cpu_runner, "step_stack", lambda model: None)
    layers, layer_states = run()
    monkeypatch.setattr(cpu_runner, "layer_weights", lambda layer: None)
    modules, module_states = run()
    assert torch.equal(stack, modules) and torch.equal(layers, modules)
    assert len(stack_states) == 10
    assert all(torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(stack_states, layer_states, module_states))


class _OracleDrafter(Drafter):
    """Proposes plain decoding's continuation with about a third of the tokens changed: verify passes of 1..k + 1
    rows, acceptances and rejections at every position."""
    name = "oracle"

    def __init__(self, reference: list[int], vocab: int):
        import random
        self.reference, self.vocab, self.rng = reference, vocab, random.Random(0)

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            toks = self.reference[len(seq.generated):len(seq.generated) + k]
            out.append(Draft([t if self.rng.random() > 0.3 else (t + 1) % self.vocab for t in toks]))
        return out


@needs_kernel
@pytest.mark.parametrize("level", isa_levels(tuple(l for l in LEVELS if l in ("scalar", "avx2", "neon"))))
def test_greedy_speculation_is_plain_decoding_on_each_instruction_set(dense_ckpt, level):
    """Lossless on every instruction set, not only the machine's best: MTP drafts and drafts with errors, verified
    k + 1 positions at a time, give exactly plain decoding's tokens."""
    import mtpx
    with running_on(level):
        llm = mtpx.LLM(dense_ckpt)
        vocab = llm.config.vocab_size
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            prompt = torch.randint(0, 300, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            plain = llm.generate(prompt, max_tokens=20, spec_type="none").token_ids
            spec = dict(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed", max_tokens=20)
            assert llm.generate(prompt, **spec).token_ids == plain, (level, prompt)
            llm.engine.drafter = lambda spec, batched=False: _OracleDrafter(plain, vocab)
            try:
                assert llm.generate(prompt, **spec).token_ids == plain, (level, prompt)
            finally:
                del llm.engine.drafter


@needs_kernel
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_tree_passes_give_each_row_the_bits_of_a_decode_along_its_path(dense_ckpt, dtype):
    """A verify pass over a draft tree runs on the per-module kernels, a call per chain of the tree (the whole-layer
    and whole-stack calls take chains only): each row's hidden state is that of one-token decodes along its path on
    the runner's fastest level, and after keep_path the caches are that path's."""
    from mtpx.llm import LLM
    from mtpx.speculative.tree import verify_rows
    model = LLM(dense_ckpt, dtype=dtype).model
    assert cpu_runner.step_stack(model) is not None
    prompt = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    tokens, parents = [100, 11, 21, 22, 12, 31, 31], [-1, 0, 1, 1, 0, 4, 4]  # the last row: padding

    def path(row: int) -> list[int]:
        return path(parents[row]) + [row] if row >= 0 else []

    def decoded(rows: list[int]):
        state = model.new_state(64)
        model(prompt, [state], "prefill")
        return [model(torch.tensor([[tokens[r]]]), [state], "step")[0, 0] for r in rows][-1], state

    with torch.inference_mode():
        state = model.new_state(64)
        model(prompt, [state], "prefill")
        start = state.length
        state.mark()
        state.tree = verify_rows(parents, start)
        hidden = model(torch.tensor([tokens]), [state], "step")[0]
        state.tree = None
        for row in range(len(tokens)):
            assert torch.equal(hidden[row], decoded(path(row))[0]), row
        state.keep_path(start, [0, 1, 3])
        ref = decoded([0, 1, 3])[1]
        assert state.length == ref.length
        for i in state.kv:
            assert all(torch.equal(a[:, :ref.length], b[:, :ref.length]) for a, b in zip(state.kv[i], ref.kv[i]))
        for i in state.conv:
            assert torch.equal(state.conv[i], ref.conv[i])
            assert torch.equal(state.recurrent[i], ref.recurrent[i])
        assert torch.equal(model(torch.tensor([[5]]), [state], "step"), model(torch.tensor([[5]]), [ref], "step"))
