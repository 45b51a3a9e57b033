"""Logits processing: repetition, presence and frequency penalties."""
import pytest
import torch

from mtpx.errors import RequestError
from mtpx.sampling import PenaltyHistory, SamplingParams, apply_penalties, penalty_history


def reference_row(logits, params, history, n_prompt):
    """One row, written the obvious way: vLLM's semantics."""
    out = logits.clone()
    generated = history[n_prompt:]
    for t in set(history):
        if params.repetition_penalty != 1:
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(generated):
        out[t] -= params.presence_penalty + params.frequency_penalty * generated.count(t)
    return out


def test_rows_follow_the_history_plus_earlier_drafts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g) * 3
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.5)
    tokens, n_prompt, drafts = [3, 4, 5, 4, 9, 9, 1], 3, [9, 2, 5]
    got = apply_penalties(logits, params, tokens, n_prompt, drafts)
    for j in range(4):
        torch.testing.assert_close(got[j], reference_row(logits[j], params, tokens + drafts[:j], n_prompt))


def test_a_kept_history_counts_what_a_rebuilt_one_does():
    """PenaltyHistory, updated with each round's new tokens (the prompt first, then generated ones one or several at
    a time), gives penalty_history's tensors at every step, and apply_penalties the same logits with either."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 30, (60,), generator=g).tolist()
    n_prompt, history = 7, PenaltyHistory()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3)
    logits = torch.randn(3, 30, generator=g)
    for end in (7, 8, 9, 13, 14, 30, 31, 60):
        counts, seen = history.of(tokens[:end], n_prompt, 30, "cpu")
        ref_counts, ref_seen = penalty_history(tokens[:end], n_prompt, 30, "cpu")
        assert torch.equal(counts, ref_counts) and torch.equal(seen, ref_seen)
        assert torch.equal(apply_penalties(logits, params, tokens[:end], n_prompt, [4, 5], history),
                           apply_penalties(logits, params, tokens[:end], n_prompt, [4, 5]))
    counts, _ = history.of(tokens[:5], 2, 30, "cpu")  # another, shorter sequence: counted afresh
    assert torch.equal(counts, penalty_history(tokens[:5], 2, 30, "cpu")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
                                       dict(repetition_penalty=1.0, frequency_penalty=-0.5),
                                       dict(repetition_penalty=0.8)])
def test_the_one_pass_kernel_gives_the_pytorch_path_bits(dtype, penalties, monkeypatch):
    """kernels.penalize_rows (CPU) and the PyTorch ops it replaces: the same bits, drafts repeating ids included."""
    from mtpx import kernels
    if not kernels.rowgemm_available():
        pytest.skip("no CPU kernels here")
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(5, 300, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 300, (80,), generator=g).tolist()
    params = SamplingParams(**penalties)
    drafts = [7, 7, tokens[-1], 299]
    fused = apply_penalties(logits, params, tokens, 20, drafts)
    monkeypatch.setattr(kernels, "penalize_rows", lambda *args: None)
    assert torch.equal(fused, apply_penalties(logits, params, tokens, 20, drafts))


def test_defaults_change_nothing_and_bad_values_are_named():
    assert not SamplingParams().penalized
    logits = torch.randn(2, 10)
    torch.testing.assert_close(apply_penalties(logits, SamplingParams(), [1, 2, 3], 1, [4]), logits)
    for kw, name in ((dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency"),
                     (dict(repetition_penalty=0), "repetition_penalty")):
        with pytest.raises(RequestError, match=name):
            SamplingParams(**kw)
