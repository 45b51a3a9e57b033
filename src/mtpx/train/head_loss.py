"""The training loss through lm_head — cross-entropy to tokens, or KL to a teacher — without the [tokens, vocab] logits.

A training batch of 16 × 256 tokens and an 8k vocabulary makes 134 MB fp32 logits, and the plain path allocates
several such tensors per loss (logits, log-softmax, their gradients). On CPU each is a fresh mmap whose pages fault
in on first touch; with torch's slow CPU log-softmax they took about a quarter of a demo-model training step.
Here the rows go through lm_head in blocks; since the loss is the last op,
each block's gradient (softmax − target distribution) is formed right away and folded into the gradients of the
hidden states and of the head weight, so only those survive to backward.
"""
from __future__ import annotations

import contextlib

import torch

BLOCK_ROWS = 512  # 512 × 8192 fp32 = 16 MB per block: reused from the heap, below glibc's mmap threshold


def _softmax_lse_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim, in place, and the rows' logsumexp (torch's log_softmax and logsumexp run 3-10x
    slower than these few vectorised passes on CPU)."""
    top = logits.amax(-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(-1, keepdim=True)
    return logits.div_(total), (top + total.log()).squeeze(-1)


def _block(h: torch.Tensor, w: torch.Tensor, w_t: torch.Tensor, t: torch.Tensor, n: int, want_hidden: bool,
           want_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One block of rows of the n in the loss: (summed loss, its gradient for the hidden rows, for the head weight)."""
    logits = (h @ w_t).float()
    soft = t.is_floating_point()
    if soft:  # KL(p || q) = sum p (t - x) + lse(x) - lse(t), p the teacher's softmax through the same head
        teacher = (t.to(h.dtype) @ w_t).float()
        gap = teacher - logits
        p, lse_p = _softmax_lse_(teacher)
        q, lse_q = _softmax_lse_(logits)
        total = torch.linalg.vecdot(p, gap).sum() + (lse_q - lse_p).sum()
    else:
        picked = logits.gather(1, t[:, None]).squeeze(1)
        q, lse_q = _softmax_lse_(logits)
        total = (lse_q - picked).sum()
    if not (want_hidden or want_weight):
        return total, None, None
    grad = q  # d loss / d logits = q - p (p one-hot for hard targets), in place
    if soft:
        grad -= p
    else:
        grad[torch.arange(len(t), device=t.device), t] -= 1.0
    grad = grad.div_(n).to(h.dtype)
    return (total, grad @ w if want_hidden else None, (grad.t() @ h).float() if want_weight else None)


_compiled_block = None  # set inside compiled_blocks()


@contextlib.contextmanager
def compiled_blocks(enabled: bool = True):
    """Within this context the blocks run through torch.compile: their ~10 elementwise passes over [512, vocab]
    logits fuse into a few (see trainer.TrainConfig.compile)."""
    global _compiled_block
    before = _compiled_block
    if enabled:
        _compiled_block = _compiled_block or torch.compile(_block, dynamic=False)
    try:
        yield
    finally:
        _compiled_block = before


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # matmuls in the autocast dtype when a mixed-precision step is running, softmax in fp32 (as F.cross_entropy
        # on .float() logits would)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        block = _compiled_block or _block
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            w_t = w.t().contiguous()  # [H, V]: MKL runs h @ w_t ~25 % faster than on the transposed view
            n = hidden.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            for start in range(0, n, BLOCK_ROWS):
                rows = slice(start, start + BLOCK_ROWS)
                loss, g_h, g_w = block(hidden[rows].to(dtype), w, w_t, targets[rows], n, want_hidden,
                                       want_weight)
                total += loss
                if want_hidden:
                    grad_hidden[rows] = g_h.to(hidden.dtype)
                if want_weight:
                    grad_weight += g_w
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the loss of `logits = hidden [N, H] @ weight [V, H].T` against `targets`, without the full
    logits:
    - token ids [N]: cross-entropy, `F.cross_entropy(F.linear(hidden, weight).float(), targets)`;
    - a teacher's hidden states [N, H] (no gradient): KL(teacher || model), both distributions through `weight`,
      `F.kl_div(log_softmax(logits), log_softmax(teacher logits), log_target=True, reduction="batchmean")`."""
    if targets.is_floating_point() and targets.requires_grad:
        raise ValueError("soft targets (teacher hidden states) must not require grad")
    return _LinearCrossEntropy.apply(hidden, weight, targets)
