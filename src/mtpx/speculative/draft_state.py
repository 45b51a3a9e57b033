"""The per-sequence state of the MTP and draft-model drafters (speculative/drafters.py)."""
from __future__ import annotations

import torch

from mtpx.state import SequenceState


class DraftState:
    """What a stateful drafter (MTP layer, draft model) holds for one sequence (`seq.draft`): its own caches, the
    length of them that is committed, and the positions it has not seen yet."""

    def __init__(self, state: SequenceState, hidden: torch.Tensor | None, tokens: list[int]):
        self.state = state
        self.committed = 0
        # MTP: main hidden states whose pairs the MTP cache has not seen, in pieces (joined when drafting: while the
        # policy is not drafting they pile up every round, and joining them each round would cost O(n^2))
        self._hidden: list[torch.Tensor] = [hidden] if hidden is not None else []
        self.pending_tokens = list(tokens)  # the token after each of those positions (draft model: not yet fed)

    @property
    def pending_hidden(self) -> torch.Tensor | None:
        if len(self._hidden) > 1:
            self._hidden = [torch.cat(self._hidden)]
        return self._hidden[0] if self._hidden else None

    def clear_pending(self):
        self._hidden, self.pending_tokens = [], []

    def add_pending(self, hidden: torch.Tensor | None, tokens: list[int]):
        if hidden is not None:
            self._hidden.append(hidden)
        self.pending_tokens.extend(tokens)

    def trim(self, head: int, tail: int) -> None:
        """Drop the pending pairs between the first `head` and the last `tail` once more than 2 x tail lie beyond
        the head (so the lists are rebuilt once per `tail` pairs, not every round): at most head + 2 x tail stay."""
        n = len(self.pending_tokens)
        if n - head <= 2 * tail:
            return
        self.pending_tokens = self.pending_tokens[:head] + self.pending_tokens[n - tail:]
        kept, start = [], 0
        for h in self._hidden:  # whole pieces where they fall inside a kept range; a copy of a straddling part
            end = start + len(h)
            for lo, hi in ((start, min(end, head)), (max(start, n - tail), end)):
                if lo < hi:
                    kept.append(h if hi - lo == len(h) else h[lo - start:hi - start].clone())
            start = end
        self._hidden = kept

    def nbytes(self) -> int:
        """Its caches and its pending hidden states."""
        return self.state.nbytes() + sum(h.numel() * h.element_size() for h in self._hidden)
