"""The training loss through lm_head — cross-entropy to tokens, or KL to a teacher — without the [tokens, vocab] logits.

A training batch of 16 × 256 tokens and an 8k vocabulary makes 134 MB fp32 logits, and the plain path allocates
several such tensors per loss (logits, log-softmax, their gradients). On CPU each is a fresh mmap whose pages fault
in on first touch; with torch's slow CPU log-softmax they took about a quarter of a demo-model training step
(3.1-3.6 s -> 2.35-2.53 s without them). Here the rows go through lm_head in blocks; since the loss is the last op,
each block's gradient (softmax − target distribution) is formed right away and folded into the gradients of the
hidden states and of the head weight, so only those survive to backward.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 512  # 512 × 8192 fp32 = 16 MB per block: reused from the heap, below glibc's mmap threshold


def _softmax_lse_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim, in place, and the rows' logsumexp (torch's log_softmax and logsumexp run 3-10x
    slower than these few vectorised passes on CPU)."""
    top = logits.amax(-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(-1, keepdim=True)
    return logits.div_(total), (top + total.log()).squeeze(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # matmuls in the autocast dtype when a mixed-precision step is running, softmax in fp32 (as F.cross_entropy
        # on .float() logits would)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        soft = targets.is_floating_point()
        with torch.autocast("cpu", enabled=False):
            w = weight.to(dtype)
            w_t = w.t().contiguous()  # [H, V]: MKL runs h @ w_t ~25 % faster than on the transposed view
            n = hidden.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            for start in range(0, n, BLOCK_ROWS):
                h = hidden[start:start + BLOCK_ROWS].to(dtype)
                t = targets[start:start + BLOCK_ROWS]
                logits = (h @ w_t).float()
                if soft:  # KL(p || q) = sum p (t - x) + lse(x) - lse(t), p the teacher's softmax through the same head
                    teacher = (t.to(dtype) @ w_t).float()
                    gap = teacher - logits
                    p, lse_p = _softmax_lse_(teacher)
                    q, lse_q = _softmax_lse_(logits)
                    total += torch.linalg.vecdot(p, gap).sum() + (lse_q - lse_p).sum()
                else:
                    picked = logits.gather(1, t[:, None]).squeeze(1)
                    q, lse_q = _softmax_lse_(logits)
                    total += (lse_q - picked).sum()
                if want_hidden or want_weight:
                    grad = q  # d loss / d logits = q - p (p one-hot for hard targets), in place
                    if soft:
                        grad -= p
                    else:
                        grad[torch.arange(len(t), device=t.device), t] -= 1.0
                    grad = grad.div_(n).to(dtype)
                    if want_hidden:
                        grad_hidden[start:start + BLOCK_ROWS] = (grad @ w).to(hidden.dtype)
                    if want_weight:
                        grad_weight += (grad.t() @ h).float()
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
