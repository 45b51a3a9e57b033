"""The blockwise head loss against the plain full-logits computation: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from mtpx.train.head_loss import BLOCK_ROWS, linear_cross_entropy

ROWS = 2 * BLOCK_ROWS + 37  # several blocks and a ragged last one


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, 48, generator=g).requires_grad_()
    weight = (torch.randn(300, 48, generator=g) * 0.3).requires_grad_()
    return hidden, weight, g


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_hard_targets_match_cross_entropy():
    hidden, weight, g = _inputs()
    targets = torch.randint(0, 300, (ROWS,), generator=g)
    ours = linear_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grads(ours * 2.5, hidden, weight), _grads(ref * 2.5, hidden, weight)):
        torch.testing.assert_close(a, b)


def test_soft_targets_match_kl_to_teacher():
    hidden, weight, g = _inputs(1)
    teacher = torch.randn(ROWS, 48, generator=g)
    ours = linear_cross_entropy(hidden, weight, teacher)
    ref = F.kl_div(F.log_softmax(F.linear(hidden, weight), -1), F.log_softmax(F.linear(teacher, weight), -1),
                   log_target=True, reduction="batchmean")
    torch.testing.assert_close(ours, ref)
    # the teacher's distribution is a constant: the weight's gradient comes only through the student's logits
    ref_w = F.kl_div(F.log_softmax(F.linear(hidden, weight), -1),
                     F.log_softmax(F.linear(teacher, weight.detach()), -1), log_target=True, reduction="batchmean")
    for a, b in zip(_grads(ours, hidden, weight), _grads(ref_w, hidden, weight)):
        torch.testing.assert_close(a, b)


def test_frozen_weight_and_no_grad():
    hidden, weight, g = _inputs(2)
    targets = torch.randint(0, 300, (ROWS,), generator=g)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, targets)
    (grad,) = _grads(loss, hidden)
    torch.testing.assert_close(grad, _grads(F.cross_entropy(F.linear(hidden, frozen), targets), hidden)[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets),
                                   F.cross_entropy(F.linear(hidden, weight), targets))


def test_autocast_runs_matmuls_in_bf16():
    hidden, weight, g = _inputs(3)
    targets = torch.randint(0, 300, (ROWS,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    grad_w = _grads(ours, weight)[0]
    assert grad_w.dtype == torch.float32  # accumulated into the fp32 master weights' dtype


def test_soft_targets_must_be_constant():
    hidden, weight, _ = _inputs()
    with pytest.raises(ValueError, match="must not require grad"):
        linear_cross_entropy(hidden, weight, hidden)
