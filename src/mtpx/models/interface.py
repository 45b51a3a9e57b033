"""What the engine, the drafters, the bench and the server use of a model family: every family implements it.

Hidden states are final-normed; `logits` applies the output head. `states` are per-sequence caches
(mtpx.state.SequenceState), advanced by the pass; `mode` is "prefill" (many positions at once) or "step" (decode /
verify / draft: every position computed as a one-token step would compute it, so its bits never depend on how many
positions the pass holds).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mtpx.config import ModelConfig
from mtpx.state import SequenceState


@runtime_checkable
class CausalLM(Protocol):
    cfg: ModelConfig
    lm_head: nn.Module  # the output head (a reduced draft head reads some of its rows)
    mtp: nn.Module | None  # the MTP module, None where the checkpoint has none

    def forward(self, tokens: torch.Tensor, states: list[SequenceState] | None = None,
                mode: str = "prefill") -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, H]; without states, a plain causal forward (no caches)."""

    def logits(self, hidden: torch.Tensor, step: bool = False) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V]; `step` for rows of a step pass (row-invariant)."""

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor,
                    states: list[SequenceState] | None = None, mode: str = "prefill") -> torch.Tensor:
        """The MTP module over pairs (h_i [B, T, H], t_{i+1} [B, T]): hidden whose logits predict t_{i+2}."""

    def mtp_greedy_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, state: SequenceState, k: int,
                          head=None, penalty: tuple | None = None) -> list[int] | torch.Tensor | None:
        """k greedy MTP drafts of one sequence from its n pending pairs (hidden [n, H], tokens [n]), advancing the
        MTP state, in one call where a runner provides one (a list, or a tensor left on the device); None otherwise
        (the drafter then loops over mtp_forward and logits, with the same drafts). `head`: a reduced draft head
        (speculative.drafters.DraftHead) or None for lm_head; `penalty`: (counts [V], seen [V], repetition,
        frequency, presence) to draft by penalised logits."""

    def new_state(self, max_len: int, device=None) -> SequenceState:
        """Empty caches of the main stack for a sequence of up to max_len tokens."""

    def new_mtp_state(self, max_len: int, device=None) -> SequenceState:
        """Empty caches of the MTP module."""
