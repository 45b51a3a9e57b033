"""The MTP drafter's reduced-vocabulary output head (`spec_draft_vocab`)."""
from __future__ import annotations

import torch

from mtpx.models.interface import CausalLM
from mtpx.models.linear import QuantizedWeight, linear, nbytes, row_invariant


class DraftHead:
    """lm_head restricted to the first `size` token ids (plus the given always-kept ids, e.g. eos) for drafting, as
    SGLang's reduced draft vocabulary: a draft step reads size / V of the full head's weights (Qwen3.5's head is
    248k x H, a third of the 0.8B model). BPE ids follow merge order, so the first ids are the frequent tokens.
    Outputs stay exact: drafts are only proposals, and verification uses the full head. Logits of the other ids
    are -inf, so greedy and sampled drafts (q) are over the kept ids only, which rejection sampling allows."""

    def __init__(self, model: CausalLM, size: int, keep: set[int] = frozenset()):
        vocab = model.cfg.vocab_size
        if size <= 0 or size > vocab:
            from mtpx.errors import RequestError
            raise RequestError(f"spec_draft_vocab must be in 1..{vocab} (the vocabulary), got {size}")
        head = model.lm_head
        weight = head.quantized if head.quantized is not None else head.weight.detach()
        self.ids = torch.tensor(sorted(set(range(size)) | {t for t in keep if size <= t < vocab}),
                                device=head.weight.device)
        self.weight = weight.rows(self.ids) if isinstance(weight, QuantizedWeight) else weight[self.ids].contiguous()
        self.vocab = vocab

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept(x)
        logits = kept.new_full((*kept.shape[:-1], self.vocab), float("-inf"))
        logits[..., self.ids] = kept
        return logits

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy draft tokens (full-vocabulary ids, on x's device) for x [R, H], without forming the full logits."""
        return self.ids[self._kept(x).float().argmax(-1)]

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        with row_invariant(True):
            return linear(x, self.weight)

    def nbytes(self) -> int:
        return nbytes(self.weight)
