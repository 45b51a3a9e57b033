"""Accepting a path of a draft tree after its verify pass.

Terms: row 0 of the pass is the last accepted token, row i + 1 the draft node i; a node's children are the rows
whose parent it is, likeliest first (speculative/tree.py). Walking from row 0, the target's distribution at the
current row decides which child, if any, is accepted; the walk ends at a row none of whose children is accepted, with
the token the target chose there (the correction, or the bonus token after a leaf).

- Greedy: the child whose token is the target's argmax (the longest path matching the target).
- Sampling: the drafts are the MTP layer's top tokens, i.e. deterministic (one-hot q), so the multi-draft rejection
  rule of SpecInfer / SpecTr takes the children in turn: child c is accepted with probability r(c) / sum(r), where r
  is the target distribution p with the children already rejected removed; if none is, the token is drawn from what
  is left of r. Each row's output is then distributed exactly as p (P(c_j) = p(c_j), P(other x) = p(x)), and each
  accepted row's distribution is the target's given its path, so the output is distributed as plain sampling's.

Penalties apply to each row for the history plain decoding has at it: the sequence plus the drafts along the row's
path (not its siblings').
"""
from __future__ import annotations

import torch

from mtpx import kernels
from mtpx.engine.sequence import Sequence
from mtpx.sampling import apply_penalties, choose, sample, target_probs


def children(parents: list[int]) -> dict[int, list[int]]:
    """Rows below each row, in row order (draft node i is row i + 1, its parent row parents[i])."""
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i + 1)
    return kids


def first_children(parents: list[int], path: list[int]) -> tuple[int, int]:
    """The chain of first (likeliest) children from row 0 (what chain drafting would have drafted): its length,
    and how many of its rows the accepted path `path` follows."""
    kids = children(parents)
    row, length, followed = 0, 0, 0
    while kids.get(row):
        row = kids[row][0]
        length += 1
        if followed == length - 1 and len(path) > length and path[length] == row:
            followed += 1
    return length, followed


def accept_tree(logits: torch.Tensor, tokens: list[int], parents: list[int],
                seq: Sequence) -> tuple[list[int], int, torch.Tensor]:
    """Walk the tree whose verify rows have target logits [1 + len(tokens), V]. Returns the accepted path's rows
    (row 0 first), the token emitted after it, and the processed target rows along the path [len(path), V] (what
    a plain decode step would have sampled each emitted token from)."""
    params = seq.params
    kids = children(parents)
    row_token = [None] + tokens
    path: list[int] = [0]
    targets: list[torch.Tensor] = []
    best = kernels.argmax_rows(logits) if params.greedy and not params.penalized else None
    depth = 0
    while True:
        row = path[-1]
        target = _processed(logits, path, row_token, seq)
        targets.append(target)
        below = kids.get(row, [])
        if seq.synthetic_rates is not None:  # benchmarking: coin flips along the likeliest children
            rates = seq.synthetic_rates
            if below and torch.rand((), generator=seq.gen).item() < rates[min(depth, len(rates) - 1)]:
                path.append(below[0])
                depth += 1
                continue
            return path, choose(target, params, seq.gen), torch.stack(targets)
        if params.greedy:
            token = best[row] if best is not None else kernels.argmax_rows(target[None])[0]
            nxt = next((c for c in below if row_token[c] == token), None)
        else:
            nxt, token = _multi_draft(target, [(c, row_token[c]) for c in below], seq)
        if nxt is None:
            return path, token, torch.stack(targets)
        path.append(nxt)
        depth += 1


def _processed(logits: torch.Tensor, path: list[int], row_token: list, seq: Sequence) -> torch.Tensor:
    """Row path[-1]'s logits after the penalties of its history (the drafts along the path before it)."""
    if not seq.params.penalized:
        return logits[path[-1]]
    drafts = [row_token[r] for r in path[1:]]
    return apply_penalties(logits[path], seq.params, seq.tokens, seq.n_prompt, drafts, seq.penalties)[-1]


def _multi_draft(target: torch.Tensor, kids: list[tuple[int, int]], seq: Sequence) -> tuple[int | None, int]:
    """Recursive rejection over sibling drafts (deterministic): (the accepted child's row or None, its token or
    the token drawn from the residual)."""
    p = target_probs(target[None], seq.params)[0]
    residual = p
    for row, token in kids:
        mass = float(residual.sum())
        q = float(residual[token])
        if q > 0 and torch.rand((), generator=seq.gen).item() < q / mass:
            return row, token
        if residual is p:
            residual = p.clone()
        residual[token] = 0.0
    if residual.sum() <= 0:  # the rejected children held all the mass (up to rounding): any draw from p is exact
        residual = p
    return None, sample(residual / residual.sum(), seq.gen)
