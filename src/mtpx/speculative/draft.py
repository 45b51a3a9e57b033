"""A drafter's proposal for one sequence in one round."""
from __future__ import annotations

import torch


class Draft:
    """Draft tokens, and what verifying them needs besides.

    tokens: a list, or a tensor where the drafter left them on its device (a CUDA runner's greedy MTP chain, whose
    passes may still be running): read as a list on first use, which is where the host waits for them. Meanwhile
    `verify_row` (the last accepted token, then the drafts, on that device) lets the verify pass be queued behind
    the drafting passes, so the host does not sit between them.
    probs: [k, V] draft distribution q when sampling; None = deterministic drafter.
    source: the drafter that proposed it, where a chain picks one per round ("": the drafter itself).
    parents: for a draft tree (speculative/tree.py), the verify row of each token's parent (row 0: the last accepted
    token, row i + 1: tokens[i]), tokens depth first; None: a chain (token i follows token i - 1)."""

    __slots__ = ("_tokens", "probs", "source", "parents", "verify_row")

    def __init__(self, tokens: list[int] | torch.Tensor | None = None, probs: torch.Tensor | None = None,
                 source: str = "", parents: list[int] | None = None, verify_row: torch.Tensor | None = None):
        self._tokens = tokens if tokens is not None else []
        self.probs, self.source, self.parents, self.verify_row = probs, source, parents, verify_row

    @property
    def tokens(self) -> list[int]:
        if isinstance(self._tokens, torch.Tensor):
            self._tokens = self._tokens.tolist()
            self.verify_row = None
        return self._tokens

    def __repr__(self) -> str:
        return f"Draft({self.tokens!r}, source={self.source!r}, parents={self.parents!r})"
